"""``potq chat``: a conversation rendered with the model's template, answers streamed, Ctrl-C
stopping an answer (not the program), old turns dropped when the context is full."""

from __future__ import annotations

import pytest

import potq
from potq.chat import Sampling, chat
from potq.errors import PotqError
from tests.gguf_writer import write_gguf
from tests.test_chat_template import TEMPLATE


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> potq.LoadedModel:
    path = tmp_path_factory.mktemp("chat") / "m.gguf"
    write_gguf("qwen2", path, chat_template=TEMPLATE)
    return potq.load_model(str(path))


def scripted(lines: list[str | type]):  # noqa: ANN201
    """``read`` giving ``lines`` in turn (an exception class is raised), then end of input."""
    queue = list(lines)

    def read(_prompt: str) -> str:
        if not queue:
            raise EOFError
        line = queue.pop(0)
        if isinstance(line, type):
            raise line()
        return line

    return read


def test_each_answer_is_generated_from_the_whole_conversation(instruct):
    shown: list[str] = []
    conversation = chat(instruct, scripted(["Hi", KeyboardInterrupt, "", "And then?", "/exit", "never read"]),
                        shown.append, Sampling(max_new_tokens=6))
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    first = conversation.messages[1]["content"]
    expected = potq.eval.generate(instruct.model, instruct.tokenizer,
                                  instruct.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]),
                                  max_new_tokens=6)
    assert first == expected and first in "".join(shown)


def test_ctrl_c_stops_the_answer_not_the_conversation(instruct):
    shown: list[str] = []

    def interrupting(piece: str) -> None:  # Ctrl-C while the first answer's first piece is shown
        shown.append(piece)
        if len(shown) == 1:
            raise KeyboardInterrupt

    conversation = chat(instruct, scripted(["Hi", "Again"]), interrupting, Sampling(max_new_tokens=6))
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert " [stopped]" in shown and conversation.messages[1]["content"] == shown[0]


def test_old_turns_go_when_the_context_is_full(instruct):
    conversation = chat(instruct, scripted([f"message number {i} " * 8 for i in range(12)]), lambda _s: None,
                        Sampling(max_new_tokens=64))
    tokens = len(instruct.tokenizer.encode(conversation.prompt(None)))
    assert tokens <= instruct.model.config.max_position_embeddings - 64 and len(conversation.messages) < 24


def test_a_base_model_is_refused_in_one_line(stories_float):
    with pytest.raises(PotqError, match="no chat template"):
        chat(stories_float, scripted(["Hi"]))
