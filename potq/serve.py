"""``potq serve MODEL``: an OpenAI-compatible HTTP server for a (packed) model.

``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, each answer whole
or streamed as server-sent events, on Starlette + uvicorn. One model decodes one request at a
time with all its threads (batching requests would not make a CPU decode faster), so requests
wait their turn in arrival order — none starves — behind a bounded queue (``429`` when it is
full), and every request's prompt and output are bounded by the model's context. A malformed
request gets a ``4xx`` with an OpenAI-style JSON error; a client that disconnects has its
generation stopped at the next token. Bound to 127.0.0.1 unless told otherwise: the model is
served to this machine, not the network.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from potq.errors import PotqError
from potq.eval.generate import generate
from potq.eval.perplexity import max_positions
from potq.models import LoadedModel

MAX_REQUEST_BYTES = 1 << 20  # a request body larger than this is refused before it is parsed


class RequestError(Exception):
    """A request the server refuses: its HTTP status and the OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status)


class _Cancelled(Exception):
    """Raised from the token callback to end a generation (client gone, or a stop string seen)."""


@dataclass
class Job:
    """One request's generation: its prompt and settings, and how its text leaves the worker."""

    prompt: str
    max_tokens: int
    temperature: float
    top_k: int | None
    seed: int | None
    stop: list[str]
    bos: bool | None
    cancel: threading.Event


class Server:
    """The model, its turn-taking and the request handling (independent of the web framework's
    routing, so the rules can be read in one place)."""

    def __init__(self, lm: LoadedModel, name: str, max_queue: int = 64, max_tokens: int = 1024) -> None:
        self.lm, self.name, self.max_queue = lm, name, max_queue
        self.positions = max_positions(lm.model) or 1 << 30
        self.max_tokens = min(max_tokens, self.positions - 1)
        self.turn = asyncio.Lock()  # FIFO: asyncio's lock wakes waiters in arrival order
        self.waiting = 0
        self.created = int(time.time())
        self.stats = {"completed": 0, "cancelled": 0}

    # --- requests -> jobs ---------------------------------------------------------------------
    def job(self, body: dict[str, Any], chat: bool) -> Job:
        """Check a request body and make its job; a :class:`RequestError` names the first problem."""
        model = body.get("model")
        if model != self.name:
            raise RequestError(404, f"model {model!r} is not served here; this server has {self.name!r}", "model",
                               "model_not_found")
        if chat:
            prompt, bos = self._chat_prompt(body.get("messages"))
        else:
            prompt, bos = body.get("prompt"), None
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError(400, "prompt must be a non-empty string", "prompt")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or min(256, self.max_tokens)
        temperature = body.get("temperature", 1.0)  # OpenAI's default
        top_p, n = body.get("top_p", 1), body.get("n", 1)
        seed, stop = body.get("seed"), body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        checks = [(isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 1 <= max_tokens <= self.max_tokens,
                   f"max_tokens must be a whole number from 1 to {self.max_tokens}", "max_tokens"),
                  (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and 0 <= temperature <= 2,
                   "temperature must be a number from 0 to 2", "temperature"),
                  (top_p == 1, "top_p other than 1 is not supported: use temperature (and top_k)", "top_p"),
                  (n == 1, "n other than 1 is not supported", "n"),
                  (seed is None or isinstance(seed, int) and not isinstance(seed, bool), "seed must be an integer", "seed"),
                  (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop),
                   "stop must be a string or a list of up to 4 non-empty strings", "stop")]
        top_k = body.get("top_k")
        checks.append((top_k is None or isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1,
                       "top_k must be a whole number of at least 1", "top_k"))
        for ok, message, param in checks:
            if not ok:
                raise RequestError(400, message, param)
        length = len(self.lm.tokenizer.encode(prompt, bos=bos))
        if length + max_tokens > self.positions:
            raise RequestError(400, f"the prompt ({length} tokens) and max_tokens ({max_tokens}) exceed the model's "
                               f"{self.positions} positions", "messages" if chat else "prompt", "context_length_exceeded")
        return Job(prompt, max_tokens, float(temperature), top_k, seed, stop, bos, threading.Event())

    def _chat_prompt(self, messages: Any) -> tuple[str, bool | None]:
        """The conversation rendered with the model's template (text parts of a content list joined)."""
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages must be a non-empty list", "messages")
        plain = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise RequestError(400, "only text content parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer") or \
                    not isinstance(content, str):
                raise RequestError(400, "each message needs a role (system, user, assistant) and text content",
                                   "messages")
            plain.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        try:
            prompt = self.lm.tokenizer.apply_chat_template(plain)
        except PotqError as exc:
            raise RequestError(400, str(exc), "messages") from None
        return prompt, self.lm.tokenizer.bos_for(prompt)

    # --- running jobs ---------------------------------------------------------------------------
    async def run(self, job: Job, emit: Callable[[str], None]) -> tuple[str, int, str]:
        """Wait for the model, then generate in a worker thread, passing each piece of text to
        ``emit`` on the event loop; ``(text, completion tokens, finish_reason)``."""
        if self.waiting >= self.max_queue:
            raise RequestError(429, f"{self.waiting} requests are waiting; try again shortly", None, "rate_limit_error")
        self.waiting += 1
        try:
            await self.turn.acquire()
        finally:  # also when the client left while waiting
            self.waiting -= 1
        try:
            if job.cancel.is_set():
                self.stats["cancelled"] += 1
                return "", 0, "cancelled"
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(None, self._generate, job, lambda piece: loop.call_soon_threadsafe(emit, piece))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:  # the model is free only once the worker has stopped
                job.cancel.set()
                await asyncio.wait([work])
                raise
        finally:
            self.turn.release()

    def _generate(self, job: Job, emit: Callable[[str], None]) -> tuple[str, int, str]:
        ids: list[int] = []
        text, sent = "", 0
        hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may be arriving in pieces

        def piece(new: str) -> None:
            nonlocal text, sent
            if job.cancel.is_set():
                raise _Cancelled
            text += new
            cut = min((text.find(s) for s in job.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            ready = len(text) if cut >= 0 else max(sent, len(text) - hold)
            if ready > sent:
                emit(text[sent:ready])
                sent = ready
            if cut >= 0:
                raise _Cancelled

        try:  # the returned text is the whole answer decoded at once (pieces may differ at a split character)
            full = generate(self.lm.model, self.lm.tokenizer, job.prompt, job.max_tokens, job.temperature,
                            job.top_k, job.seed, stream=piece, bos=job.bos, generated=ids)
            reason = "length" if len(ids) >= job.max_tokens else "stop"
        except _Cancelled:
            full, reason = text, "stop"
        if job.cancel.is_set():
            self.stats["cancelled"] += 1
            return text, len(ids), "cancelled"
        cut = min((full.find(s) for s in job.stop if s in full), default=-1)
        full = full if cut < 0 else full[:cut]
        if len(full) > sent and full.startswith(text[:sent]):
            emit(full[sent:])
        self.stats["completed"] += 1
        return full, len(ids), reason


def build_app(server: Server) -> Starlette:
    """The routes of the OpenAI-compatible API over ``server``."""

    async def models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": server.name, "object": "model",
                                                         "created": server.created, "owned_by": "potq"}]})

    async def completions(request: Request, chat: bool) -> Response:
        try:
            body = await _json_body(request)
            job = server.job(body, chat)
        except RequestError as exc:
            return exc.response()
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        prompt_tokens = len(server.lm.tokenizer.encode(job.prompt, bos=job.bos))
        if body.get("stream"):
            return StreamingResponse(_events(server, job, ident, chat, prompt_tokens, body), media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            text, tokens, reason = await server.run(job, lambda _piece: None)
        except RequestError as exc:
            return exc.response()
        finally:
            watcher.cancel()
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if chat
                  else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": server.name, "choices": [choice],
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                       "total_tokens": prompt_tokens + tokens}})

    async def chat_route(request: Request) -> Response:
        return await completions(request, chat=True)

    async def text_route(request: Request) -> Response:
        return await completions(request, chat=False)

    async def not_found(_request: Request, _exc: Exception) -> Response:
        return RequestError(404, "no such endpoint: the API has /v1/models, /v1/chat/completions, /v1/completions",
                            None, "not_found_error").response()

    async def not_allowed(_request: Request, _exc: Exception) -> Response:
        return RequestError(405, "method not allowed on this endpoint").response()

    return Starlette(routes=[Route("/v1/models", models, methods=["GET"]),
                             Route("/v1/chat/completions", chat_route, methods=["POST"]),
                             Route("/v1/completions", text_route, methods=["POST"])],
                     exception_handlers={404: not_found, 405: not_allowed})


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_REQUEST_BYTES:
        raise RequestError(413, f"the request body is over {MAX_REQUEST_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Stop ``job`` when its (non-streaming) client goes away."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    job.cancel.set()


async def _events(server: Server, job: Job, ident: str, chat: bool, prompt_tokens: int,
                  body: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events of one streamed answer; stops the generation if the client leaves."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    created = int(time.time())

    def chunk(delta: dict[str, Any] | None, text: str | None, reason: str | None) -> str:
        choice = ({"index": 0, "delta": delta or {}, "finish_reason": reason} if chat
                  else {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None})
        return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                                      "created": created, "model": server.name, "choices": [choice]}) + "\n\n"

    task = asyncio.create_task(server.run(job, queue.put_nowait))
    task.add_done_callback(lambda _t: queue.put_nowait(None))
    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""}, None, None)
        while (piece := await queue.get()) is not None:
            yield chunk({"content": piece}, piece, None)
        try:
            _text, tokens, reason = task.result()
        except RequestError as exc:
            yield "data: " + json.dumps({"error": {"message": exc.message, "type": exc.kind}}) + "\n\n"
            return
        yield chunk({}, "", reason)
        if (body.get("stream_options") or {}).get("include_usage"):
            yield "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                         "model": server.name, "choices": [],
                                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                                   "total_tokens": prompt_tokens + tokens}}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): stop generating for it
        job.cancel.set()


def serve(lm: LoadedModel, name: str, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 64,
          max_tokens: int = 1024) -> None:
    """Serve ``lm`` until interrupted."""
    import uvicorn

    uvicorn.run(build_app(Server(lm, name, max_queue, max_tokens)), host=host, port=port, log_level="warning")
