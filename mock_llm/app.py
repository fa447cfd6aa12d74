"""A mock OpenAI-compatible LLM backend for NTONIX's tests, demos and benchmarks.

Theory of operation
-------------------
One ``MockLLM`` object per app holds the instance's settings (changed at run time through
``POST /_control``) and its counters (read through ``GET /_stats``). The app runs under
gunicorn's gevent worker, so ``time.sleep`` is cooperative and plain ints are safe counters:
greenlets only switch at I/O or sleeps, never in the middle of ``n += 1``.

Answers are deterministic: the text depends on the prompt and the instance name only, so a
test can tell which backend answered and a cache can be checked for byte-identical replays.

Streams are generators that yield one SSE event per ``yield``; gunicorn writes each yield as
its own chunk before asking for the next one, which is what makes event timing observable.
A client that goes away shows up as ``GeneratorExit`` at the pending ``yield`` (gunicorn's
write fails, then it closes the response iterable).

Per-request behaviour is steered with ``X-Mock-*`` request headers (see ``_Plan``).

Models: started with ``--models a,b`` the instance lists them on ``GET /v1/models`` and answers
404 ``model_not_found`` for any other ``model``; without it, ``GET /v1/models`` answers 404 (an
instance with no list, which a gateway takes as serving any model) and any ``model`` is served.
Usage: ``usage`` in JSON answers, and in a last stream chunk when the request asks for
``stream_options.include_usage``; ``X-Mock-Cached-Tokens: N`` reports N of the prompt tokens as
cached (``prompt_tokens_details.cached_tokens``); ``X-Mock-Usage: <JSON>`` reports that object as the
usage instead, as given. ``X-Mock-Chunked: 1`` sends a JSON answer chunked, without Content-Length.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

if TYPE_CHECKING:
    from mock_llm.inference import InferenceConfig

HANG_LIMIT_S = 600.0
_PATTERN = b"0123456789abcdef"
_CONTROL_PATHS = ("/_control", "/_reset", "/_stats", "/health", "/metrics")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error"}


@dataclass
class Settings:
    """What ``POST /_control`` can change; returned by it as JSON."""

    ttft: float = 0.0
    token_delay: float = 0.0
    tokens: int = 8
    fail: bool = False
    health_fail: bool = False
    hang: bool = False
    health_hang: bool = False


@dataclass
class Stats:
    requests: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    health_checks: int = 0
    model_lists: int = 0  # a gateway's model discovery (GET /v1/models from User-Agent ntonix-models)
    streams_started: int = 0
    streams_completed: int = 0
    streams_aborted: int = 0  # the client went away mid-stream
    streams_broken: int = 0  # we dropped the connection on purpose (X-Mock-Break-After)
    active_requests: int = 0
    wrong_model: int = 0  # 404 model_not_found (only with a configured model list)
    last_request: dict[str, Any] | None = None


class MockError(Exception):
    """An error answered as an OpenAI-shaped JSON body with ``status``."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class _Plan:
    """How one API request is answered: settings overridden by ``X-Mock-*`` headers."""

    ttft: float
    token_delay: float
    tokens: int | None  # None: use the body's max_tokens, else the configured default
    crlf: bool
    break_after: int | None


def error_response(status: int, message: str, code: str | None = None) -> Response:
    err_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if code == "model_not_found":  # OpenAI's shape for it
        err_type = "invalid_request_error"
    body = {"error": {"message": message, "type": err_type, "code": code or status}}
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _header(name: str, cast: type[float] | type[int], default: Any) -> Any:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise MockError(400, f"{name}: not a number: {raw!r}") from None
    if value < 0:
        raise MockError(400, f"{name}: must be >= 0, got {raw!r}")
    return value


def _digest(value: Any) -> bytes:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()


def json_body() -> dict[str, Any]:
    try:
        body = json.loads(request.get_data() or b"null")
    except ValueError as exc:
        raise MockError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MockError(400, "request body must be a JSON object")
    return body


class MockLLM:
    """The state and the views of one mock instance."""

    def __init__(self, name: str, settings: Settings, models: tuple[str, ...] = ()) -> None:
        self.name = name
        self.settings = settings
        self.models = models  # (): no list (GET /v1/models answers 404), serves any model
        self.reset_hooks: list[Callable[[], None]] = []
        self.stats = Stats()
        self._ids = 0  # never reset, so ids stay unique for the life of the process

    def __repr__(self) -> str:
        s = self.settings
        return (f"<MockLLM {self.name} ttft={s.ttft} delay={s.token_delay} tokens={s.tokens} "
                f"fail={s.fail} hang={s.hang} requests={self.stats.requests}>")

    # -- bookkeeping around every request -------------------------------------------------

    def before(self) -> Response | None:
        path = request.path
        if path in _CONTROL_PATHS:
            return None
        if path == "/v1/models" and request.headers.get("User-Agent") == "ntonix-models":
            # Counted apart like health checks, so a test's request counts are the clients' only.
            self.stats.model_lists += 1
            return None
        self.stats.by_path[path] = self.stats.by_path.get(path, 0) + 1
        self.stats.last_request = {
            "method": request.method, "path": path, "headers": dict(request.headers),
            "body": request.get_data(as_text=True),
        }
        if not path.startswith("/v1/"):
            return None
        self.stats.requests += 1
        self.stats.active_requests += 1
        g.mock_active = True
        self._hang_while(lambda: self.settings.hang)
        if self.settings.fail:
            return error_response(500, f"{self.name}: failing on purpose (/_control fail)")
        status = _header("X-Mock-Status", int, None)
        if status is not None and not 100 <= status <= 599:
            raise MockError(400, f"X-Mock-Status: not an HTTP status: {status}")
        if status is not None and status != 200:
            return error_response(status, f"{self.name}: status {status} on request (X-Mock-Status)")
        return None

    def after(self, response: Response) -> Response:
        response.headers["X-Mock-Instance"] = self.name
        if g.pop("mock_active", False):
            # Runs when the server closes the body iterable, i.e. after a stream ended too.
            response.call_on_close(self._request_done)
        return response

    def _request_done(self) -> None:
        self.stats.active_requests -= 1

    @staticmethod
    def _hang_while(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + HANG_LIMIT_S
        while condition() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _plan(self) -> _Plan:
        s = self.settings
        return _Plan(
            ttft=_header("X-Mock-TTFT", float, s.ttft),
            token_delay=_header("X-Mock-Token-Delay", float, s.token_delay),
            tokens=_header("X-Mock-Tokens", int, None),
            crlf=request.headers.get("X-Mock-Crlf", "") == "1",
            break_after=_header("X-Mock-Break-After", int, None),
        )

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self.name}-{self._ids}"

    # -- text generation --------------------------------------------------------------------

    def tokens_for(self, prompt: Any, count: int) -> list[str]:
        """``count`` tokens whose concatenation is ``"[name #hash] tok0 tok1 ..."``."""
        tag = f"[{self.name} #{_digest(prompt).hex()[:8]}]"
        return [f"{tag} tok0" if i == 0 else f" tok{i}" for i in range(count)]

    def check_model(self, body: dict[str, Any]) -> Any:
        """The body's model, as sent; ``MockError`` 404 ``model_not_found`` when a list is set without it
        (a request that names no model is served)."""
        model = body.get("model", "mock-model")
        if self.models and "model" in body and model not in self.models:
            self.stats.wrong_model += 1
            raise MockError(404, f"{self.name}: the model {model!r} does not exist (serving: "
                                 f"{', '.join(self.models)})", code="model_not_found")
        return model

    def _count(self, plan: _Plan, body: dict[str, Any]) -> int:
        if plan.tokens is not None:
            return plan.tokens
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 0:
            return max_tokens
        return self.settings.tokens

    # -- API views ---------------------------------------------------------------------------

    def chat_completions(self) -> Response:
        return self._complete(chat=True)

    def completions(self) -> Response:
        return self._complete(chat=False)

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}
        cached = _header("X-Mock-Cached-Tokens", int, None)
        if cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": min(cached, prompt_tokens)}
        raw = request.headers.get("X-Mock-Usage")
        if raw is not None:  # reported as given, however wrong (a broken backend's numbers)
            try:
                usage = json.loads(raw)
            except ValueError:
                raise MockError(400, f"X-Mock-Usage: not JSON: {raw!r}") from None
        return usage

    def _complete(self, chat: bool) -> Response:
        plan = self._plan()
        body = json_body()
        prompt = body.get("messages") if chat else body.get("prompt")
        model = self.check_model(body)
        tokens = self.tokens_for(prompt, self._count(plan, body))
        rid = self._next_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        prompt_tokens = len(json.dumps(prompt).split())
        if body.get("stream") is True:
            events = [self._chunk(chat, rid, created, model, i, tok, last=i == len(tokens) - 1)
                      for i, tok in enumerate(tokens)]
            options = body.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage") is True:
                events.append({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": created, "model": model, "choices": [],
                               "usage": self._usage(prompt_tokens, len(tokens))})
            # The generator runs after the view returned, outside the request context.
            sock = request.environ.get("gunicorn.socket")
            return Response(self._stream(events, plan, sock), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
        # A non-streamed answer takes as long as the whole stream would have.
        time.sleep(plan.ttft + plan.token_delay * max(len(tokens) - 1, 0))
        text = "".join(tokens)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"})
        answer = {
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice],
            "usage": self._usage(prompt_tokens, len(tokens)),
            "mock_instance": self.name,
        }
        if request.headers.get("X-Mock-Chunked", "") == "1":  # JSON without Content-Length, in pieces
            data = json.dumps(answer).encode()
            return Response(iter([data[:len(data) // 2], data[len(data) // 2:]]), mimetype="application/json")
        return self._json(answer)

    @staticmethod
    def _chunk(chat: bool, rid: str, created: int, model: str, index: int, token: str,
               last: bool) -> dict[str, Any]:
        finish = "stop" if last else None
        if chat:
            delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": token, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}

    def _stream(self, events: list[dict[str, Any]], plan: _Plan,
                sock: socket.socket | None) -> Iterator[bytes]:
        end = b"\r\n\r\n" if plan.crlf else b"\n\n"
        self.stats.streams_started += 1
        outcome = "aborted"  # unless we reach the end or break on purpose
        try:
            yield b""  # gunicorn sends the headers on the first write, so they go out at once
            time.sleep(plan.ttft)
            for i, event in enumerate(events):
                if i:
                    time.sleep(plan.token_delay)
                if plan.break_after is not None and i >= plan.break_after:
                    outcome = "broken"
                    _drop(sock)
                    return
                yield b"data: " + json.dumps(event).encode() + end
            if plan.break_after is not None and plan.break_after <= len(events):
                outcome = "broken"
                _drop(sock)
                return
            yield b"data: [DONE]" + end
            outcome = "completed"
        finally:
            setattr(self.stats, f"streams_{outcome}", getattr(self.stats, f"streams_{outcome}") + 1)

    def embeddings(self) -> Response:
        plan = self._plan()
        body = json_body()
        self.check_model(body)
        inputs = body.get("input")
        if isinstance(inputs, str) or not isinstance(inputs, list):
            inputs = [inputs]
        time.sleep(plan.ttft)
        data = [{"object": "embedding", "index": i, "embedding": _vector(item)}
                for i, item in enumerate(inputs)]
        used = sum(len(str(item).split()) for item in inputs)
        return self._json({"object": "list", "data": data, "model": body.get("model", "mock-model"),
                           "usage": {"prompt_tokens": used, "total_tokens": used},
                           "mock_instance": self.name})

    def responses(self) -> Response:
        """``POST /v1/responses`` (the Responses API), JSON only: one output message and its
        usage, spelt as that API spells it (``input_tokens``, ``output_tokens``)."""
        plan = self._plan()
        body = json_body()
        self.check_model(body)
        words = str(body.get("input", "")).split()
        time.sleep(plan.ttft)
        out = max(1, plan.tokens or 4)
        return self._json({"id": f"resp_{uuid.uuid4().hex}", "object": "response",
                           "model": body.get("model", "mock-model"), "output": [{"type": "message", "role": "assistant",
                                       "content": [{"type": "output_text", "text": " ".join(["tok"] * out)}]}],
                           "usage": {"input_tokens": len(words), "output_tokens": out,
                                     "total_tokens": len(words) + out},
                           "mock_instance": self.name})

    def models_view(self) -> Response:
        if not self.models:
            raise MockError(404, f"{self.name} has no model list (started without --models): it serves any model")
        return self._json({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "ntonix-mock"} for model in self.models]})

    # -- health, control, test helpers ----------------------------------------------------

    def health(self) -> Response:
        self.stats.health_checks += 1
        self._hang_while(lambda: self.settings.health_hang)
        if self.settings.health_fail:
            return self._json({"status": "failing", "instance": self.name}, 503)
        return self._json({"status": "ok", "instance": self.name})

    def control(self) -> Response:
        if request.method == "POST":
            changes = json_body()
            for key, value in changes.items():
                _check_setting(key, value)
            for key, value in changes.items():
                setattr(self.settings, key, value)
        return self._json(asdict(self.settings))

    def reset(self) -> Response:
        self.stats = Stats(active_requests=self.stats.active_requests)  # in-flight is a fact
        for hook in self.reset_hooks:
            hook()
        return self._json(asdict(self.stats))

    def stats_view(self) -> Response:
        return self._json({"name": self.name, **asdict(self.stats)})

    def echo(self, rest: str = "") -> Response:
        data = request.get_data()
        return self._json({
            "method": request.method, "path": request.path,
            "query": request.query_string.decode("latin-1"), "headers": dict(request.headers),
            "body": data.decode("utf-8", "replace"), "body_len": len(data),
        })

    def bytes_view(self) -> Response:
        total = _query_number("n", int, 0)
        size = max(_query_number("chunk", int, 65536), 1)
        delay = _query_number("delay", float, 0.0)
        return Response(_pattern_chunks(total, size, delay), mimetype="application/octet-stream")

    @staticmethod
    def _json(payload: Any, status: int = 200) -> Response:
        return Response(json.dumps(payload), status=status, mimetype="application/json")


def _check_setting(key: str, value: Any) -> None:
    if key not in Settings.__dataclass_fields__:
        raise MockError(400, f"/_control: unknown key {key!r}")
    default = getattr(Settings(), key)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = is_number and isinstance(value, int) and value >= 0
    else:
        ok = is_number and value >= 0
    if not ok:
        raise MockError(400, f"/_control: {key}: bad value {value!r}")


def _query_number(name: str, cast: type[float] | type[int], default: Any) -> Any:
    try:
        value = cast(request.args.get(name, default))
    except ValueError:
        raise MockError(400, f"{name}: not a number") from None
    if value < 0:
        raise MockError(400, f"{name}: must be >= 0")
    return value


def _pattern_chunks(total: int, size: int, delay: float) -> Iterator[bytes]:
    """``total`` bytes of the repeating pattern (byte i is _PATTERN[i % 16]), ``size`` at a time."""
    window = _PATTERN * (size // len(_PATTERN) + 2)  # any chunk is a slice of this
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        offset = sent % len(_PATTERN)
        yield window[offset:offset + n]
        sent += n
        if delay and sent < total:
            time.sleep(delay)


def _vector(item: Any) -> list[float]:
    raw = _digest(item)
    return [round(b / 127.5 - 1.0, 6) for b in raw[:8]]


def _drop(sock: socket.socket | None) -> None:
    """End the connection without the chunked terminator, like a backend that died."""
    if sock is None:  # not under gunicorn (e.g. a WSGI test client): fail loudly instead
        raise ConnectionAbortedError("X-Mock-Break-After")
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the client is already gone


def create_app(name: str, ttft: float = 0.0, token_delay: float = 0.0, tokens: int = 8,
               models: Sequence[str] = (), inference: InferenceConfig | None = None) -> Flask:
    """The Flask app of one mock instance called ``name`` (see the module docstring).

    ``models``: the ids it serves (others get 404 ``model_not_found``); empty serves any
    (and ``GET /v1/models`` answers 404: no list).
    ``inference``: act like an inference server with a KV prefix cache (mock_llm/inference.py).
    """
    mock = MockLLM(name, Settings(ttft=ttft, token_delay=token_delay, tokens=tokens), tuple(models))
    app = Flask("mock_llm")
    app.extensions["mock_llm"] = mock
    app.before_request(mock.before)
    app.after_request(mock.after)
    rule = app.add_url_rule
    rule("/v1/chat/completions", view_func=mock.chat_completions, methods=["POST"])
    rule("/v1/completions", view_func=mock.completions, methods=["POST"])
    rule("/v1/embeddings", view_func=mock.embeddings, methods=["POST"])
    rule("/v1/responses", view_func=mock.responses, methods=["POST"])
    rule("/v1/models", view_func=mock.models_view, methods=["GET"])
    rule("/health", view_func=mock.health, methods=["GET"])
    rule("/_control", view_func=mock.control, methods=["GET", "POST"])
    rule("/_reset", view_func=mock.reset, methods=["POST"])
    rule("/_stats", view_func=mock.stats_view, methods=["GET"])
    rule("/bytes", view_func=mock.bytes_view, methods=["GET"])
    every = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    rule("/echo", view_func=mock.echo, methods=every)
    rule("/echo/<path:rest>", view_func=mock.echo, methods=every)

    @app.errorhandler(MockError)
    def _mock_error(exc: MockError) -> Response:
        return error_response(exc.status, exc.message, exc.code)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> BaseResponse:
        if exc.code is not None and exc.code < 400:  # e.g. the redirect to a trailing slash
            return exc.get_response()
        return error_response(exc.code or 500, exc.description or exc.name)

    if inference is not None:
        from mock_llm.inference import install

        install(app, mock, inference)
    return app
