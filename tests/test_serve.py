"""``potq serve``: the OpenAI-compatible API, driven by the official ``openai`` client against a
server started on a free port — answers equal to ``potq.eval.generate``, streaming, 8 concurrent
streaming clients all served, one-line JSON errors for malformed requests, and a client that
disconnects stopping its generation."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn

import potq
from potq.serve import Server, build_app
from tests.gguf_writer import write_gguf
from tests.test_chat_template import TEMPLATE

NAME = "tiny-chat"


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # noqa: ANN201
    """(server, base URL, loaded model): a uvicorn server in a thread on a free local port."""
    path = tmp_path_factory.mktemp("serve") / "m.gguf"
    write_gguf("qwen2", path, chat_template=TEMPLATE)
    lm = potq.load_model(str(path))
    server = Server(lm, NAME, max_queue=16, max_tokens=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started and time.time() < deadline:
        time.sleep(0.05)
    yield server, f"http://127.0.0.1:{port}/v1", lm
    web.should_exit = True
    thread.join(10)


def client(base: str):  # noqa: ANN201
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)


def expected(lm, messages, tokens: int) -> str:  # noqa: ANN001
    return potq.eval.generate(lm.model, lm.tokenizer, lm.tokenizer.apply_chat_template(messages), max_new_tokens=tokens)


def test_models_chat_and_completions_match_generate(served):
    server, base, lm = served
    api = client(base)
    assert [m.id for m in api.models.list().data] == [NAME]
    messages = [{"role": "user", "content": "Hello there"}]
    answer = api.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == expected(lm, messages, 8)
    assert answer.usage.completion_tokens <= 8 and answer.choices[0].finish_reason in ("stop", "length")
    text = api.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert text.choices[0].text == potq.eval.generate(lm.model, lm.tokenizer, "Once upon a time", max_new_tokens=6)


def test_a_streamed_answer_is_the_same_text(served):
    _, base, lm = served
    messages = [{"role": "user", "content": "Tell me"}]
    pieces = [c.choices[0].delta.content or "" for c in client(base).chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == expected(lm, messages, 10)


def test_eight_concurrent_streaming_clients_all_complete(served):
    server, base, lm = served
    before = server.stats["completed"]

    def one(i: int) -> str:
        messages = [{"role": "user", "content": f"Question {i}"}]
        stream = client(base).chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                      stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert server.stats["completed"] - before == 8 and server.waiting == 0
    assert answers == [one(i) for i in range(8)] and all(answers)  # each as if it had been alone


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"model": NAME}).encode(), 400, "messages"),
    (json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
    (json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}).encode(),
     400, "max_tokens"),
    (json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(),
     400, "temperature"),
    (json.dumps({"model": NAME, "messages": [{"role": "user", "content": "word " * 400}]}).encode(), 400, "messages"),
])
def test_a_malformed_request_gets_a_json_error(served, body, status, param):
    _, base, _ = served
    request = urllib.request.Request(f"{base}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == status
    error = json.loads(caught.value.read())["error"]
    assert error["param"] == param and error["message"]


def test_a_client_that_disconnects_stops_its_generation(served):
    server, base, _ = served
    before = server.stats["cancelled"]
    server.max_tokens = 200  # long enough that the answer is still being written when the client leaves
    try:
        stream = client(base).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Go on"}],
                                                      max_tokens=200, temperature=1.0, seed=1, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.time() + 30
        while server.stats["cancelled"] == before and time.time() < deadline:
            time.sleep(0.05)
    finally:
        server.max_tokens = 64
    assert server.stats["cancelled"] == before + 1


def test_a_stop_string_ends_the_answer_before_it(served):
    _, base, lm = served
    prompt = "Once upon a time"
    full = potq.eval.generate(lm.model, lm.tokenizer, prompt, max_new_tokens=12)
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1) if full[i:i + 2].strip())
    for stream in (False, True):
        answer = client(base).completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                                 stream=stream)
        text = "".join(c.choices[0].text for c in answer) if stream else answer.choices[0].text
        assert text == full[:full.find(stop)]
