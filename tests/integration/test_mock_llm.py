"""Live tests of the mock LLM backend: `python -m mock_llm` under gunicorn + gevent.

One mock process serves the whole module (tests that read counters reset them first).
Streams are read with a raw socket so that chunk arrival times and the chunked framing itself
(terminated or not) can be checked, which urllib and http.client hide.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from typing import Any

import pytest

from tests.live.procs import Proc, free_port, get_json, http, wait_http_up, wait_until

pytestmark = pytest.mark.integration

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]}


@dataclass
class Mock:
    port: int
    proc: Proc

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None,
             ) -> tuple[int, dict[str, str], bytes]:
        return http("POST", self.url(path), body, headers)

    def stats(self) -> dict[str, Any]:
        return get_json(self.url("/_stats"))  # type: ignore[no-any-return]

    def control(self, **settings: Any) -> dict[str, Any]:
        status, _, body = self.post("/_control", settings)
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def mock() -> Iterator[Mock]:
    port = free_port()
    proc = Proc([sys.executable, "-m", "mock_llm", "--port", str(port), "--name", "m1",
                 "--tokens", "5", "--models", "mock-model,gpt-test"], name="mock-llm")
    try:
        wait_http_up(f"http://127.0.0.1:{port}/health", proc)
        yield Mock(port, proc)
    finally:
        proc.stop()


class RawResponse:
    """An HTTP/1.1 exchange over a bare socket, read one chunk at a time with arrival times."""

    def __init__(self, port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None):
        data = json.dumps(body).encode()
        lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
                 f"Content-Length: {len(data)}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.started = time.monotonic()
        self.sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + data)
        self._buf = b""
        head = self._read_until(b"\r\n\r\n")
        self.headers_at = time.monotonic() - self.started
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self._buf += data

    def _read_until(self, sep: bytes) -> bytes:
        while sep not in self._buf:
            self._fill()
        head, self._buf = self._buf.split(sep, 1)
        return head

    def read_chunk(self) -> tuple[float, bytes]:
        """(seconds since the request was sent, chunk data); b"" is the terminating chunk."""
        size = int(self._read_until(b"\r\n").split(b";")[0], 16)
        while len(self._buf) < size + 2:
            self._fill()
        data, self._buf = self._buf[:size], self._buf[size + 2:]
        return time.monotonic() - self.started, data

    def read_all(self) -> tuple[list[tuple[float, bytes]], bool]:
        """All chunks, and whether the body ended with the terminating chunk."""
        chunks: list[tuple[float, bytes]] = []
        try:
            while True:
                at, data = self.read_chunk()
                if not data:
                    return chunks, True
                chunks.append((at, data))
        except EOFError:
            return chunks, False

    def close(self) -> None:
        self.sock.close()


def sse_events(body: bytes, end: bytes = b"\n\n") -> list[bytes]:
    assert body.endswith(end), body[-40:]
    events = body.split(end)[:-1]
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: "):] for e in events]


def test_chat_completion(mock: Mock) -> None:
    status, headers, body = mock.post("/v1/chat/completions", {**CHAT, "max_tokens": 3})
    assert status == 200
    assert headers["x-mock-instance"] == "m1"
    doc = json.loads(body)
    assert doc["object"] == "chat.completion"
    assert doc["id"].startswith("chatcmpl-m1-")
    assert doc["model"] == "gpt-test"
    assert doc["mock_instance"] == "m1"
    choice = doc["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    content = choice["message"]["content"]
    assert content.startswith("[m1 #") and content.endswith("] tok0 tok1 tok2")
    assert doc["usage"]["completion_tokens"] == 3
    # Deterministic: same prompt, same text; another prompt, another text.
    again = json.loads(mock.post("/v1/chat/completions", {**CHAT, "max_tokens": 3})[2])
    assert again["choices"][0]["message"]["content"] == content
    assert again["id"] != doc["id"]
    other = {"messages": [{"role": "user", "content": "bye"}]}
    text = json.loads(mock.post("/v1/chat/completions", other)[2])["choices"][0]["message"]["content"]
    assert text != content
    assert text.endswith(" tok4")  # the configured default of 5 tokens


def test_completions_embeddings_models(mock: Mock) -> None:
    doc = json.loads(mock.post("/v1/completions", {"prompt": "x", "max_tokens": 2})[2])
    assert doc["object"] == "text_completion"
    assert doc["choices"][0]["text"].endswith("] tok0 tok1")

    status, _, body = mock.post("/v1/embeddings", {"input": ["a", "b", "a"]})
    vectors = [d["embedding"] for d in json.loads(body)["data"]]
    assert status == 200 and len(vectors) == 3 and len(vectors[0]) == 8
    assert vectors[0] == vectors[2] != vectors[1]
    single = json.loads(mock.post("/v1/embeddings", {"input": "a"})[2])["data"]
    assert [d["embedding"] for d in single] == [vectors[0]]

    models = get_json(mock.url("/v1/models"))
    assert [m["id"] for m in models["data"]] == ["mock-model", "gpt-test"]


def test_invalid_json_is_an_openai_error(mock: Mock) -> None:
    status, headers, body = mock.post("/v1/chat/completions", b"{nope",
                                      {"Content-Type": "application/json"})
    assert status == 400
    assert headers["x-mock-instance"] == "m1"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_stream_events_are_spaced_in_time(mock: Mock) -> None:
    raw = RawResponse(mock.port, "/v1/chat/completions", {**CHAT, "stream": True}, {
        "X-Mock-TTFT": "0.3", "X-Mock-Token-Delay": "0.15", "X-Mock-Tokens": "4"})
    try:
        chunks, terminated = raw.read_all()
    finally:
        raw.close()
    assert raw.status == 200 and terminated
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["transfer-encoding"] == "chunked"
    assert raw.headers["x-mock-instance"] == "m1"
    assert raw.headers_at < 0.2  # headers go out at once, before the first token
    times = [at for at, _ in chunks]
    assert len(chunks) == 5  # one chunk per event: 4 tokens + [DONE]
    assert 0.25 <= times[0] < 0.5, times
    assert all(b - a >= 0.1 for a, b in itertools.pairwise(times[:4])), times

    body = b"".join(data for _, data in chunks)
    assert b"\r" not in body
    events = sse_events(body)
    assert events[-1] == b"[DONE]"
    docs = [json.loads(e) for e in events[:-1]]
    assert {d["object"] for d in docs} == {"chat.completion.chunk"}
    assert docs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [d["choices"][0]["finish_reason"] for d in docs] == [None, None, None, "stop"]
    text = "".join(d["choices"][0]["delta"]["content"] for d in docs)
    whole = json.loads(mock.post("/v1/chat/completions", {**CHAT, "max_tokens": 4})[2])
    assert text == whole["choices"][0]["message"]["content"]


def test_stream_crlf_framing_and_completions_stream(mock: Mock) -> None:
    status, _, body = mock.post("/v1/completions", {"prompt": "p", "stream": True, "max_tokens": 3},
                                {"X-Mock-Crlf": "1"})
    assert status == 200
    events = sse_events(body, b"\r\n\r\n")
    assert len(events) == 4 and events[-1] == b"[DONE]"
    assert body.count(b"\n") == body.count(b"\r\n") == 8
    assert json.loads(events[0])["object"] == "text_completion"


def test_status_override(mock: Mock) -> None:
    for code in (500, 429):
        status, headers, body = mock.post("/v1/chat/completions", CHAT, {"X-Mock-Status": str(code)})
        assert status == code
        assert headers["x-mock-instance"] == "m1"
        assert json.loads(body)["error"]["code"] == code


def test_control_fail_and_health_fail(mock: Mock) -> None:
    try:
        assert mock.control(fail=True)["fail"] is True
        status, _, body = mock.post("/v1/chat/completions", CHAT)
        assert status == 500 and "error" in json.loads(body)
        assert http("GET", mock.url("/health"))[0] == 200

        mock.control(fail=False, health_fail=True)
        status, headers, _ = http("GET", mock.url("/health"))
        assert status == 503 and headers["x-mock-instance"] == "m1"
        assert mock.post("/v1/chat/completions", CHAT)[0] == 200
    finally:
        mock.control(fail=False, health_fail=False)
    assert get_json(mock.url("/health")) == {"status": "ok", "instance": "m1"}
    assert mock.post("/_control", {"fail": "yes"})[0] == 400
    assert mock.post("/_control", {"nope": 1})[0] == 400


def test_stats_counters(mock: Mock) -> None:
    mock.post("/_reset", b"")
    mock.post("/v1/chat/completions", CHAT)
    mock.post("/v1/chat/completions", {**CHAT, "stream": True})
    http("GET", mock.url("/v1/models"))
    http("GET", mock.url("/health"))
    mock.post("/v1/embeddings", {"input": "z"}, {"Authorization": "Bearer k1", "X-Trace": "t-9"})
    stats = mock.stats()
    assert stats["name"] == "m1"
    assert stats["requests"] == 4
    assert stats["by_path"] == {"/v1/chat/completions": 2, "/v1/models": 1, "/v1/embeddings": 1}
    assert stats["health_checks"] == 1
    assert (stats["streams_started"], stats["streams_completed"], stats["streams_aborted"]) == (1, 1, 0)
    assert stats["active_requests"] == 0
    last = stats["last_request"]
    assert (last["method"], last["path"]) == ("POST", "/v1/embeddings")
    assert last["headers"]["Authorization"] == "Bearer k1"
    assert last["headers"]["X-Trace"] == "t-9"
    assert json.loads(last["body"]) == {"input": "z"}


def test_echo(mock: Mock) -> None:
    status, headers, body = http("PUT", mock.url("/echo/a/b?x=1&y=2"), b"payload",
                                 {"Authorization": "Bearer s3cret", "X-Custom": "v"})
    assert status == 200 and headers["x-mock-instance"] == "m1"
    doc = json.loads(body)
    assert (doc["method"], doc["path"], doc["query"]) == ("PUT", "/echo/a/b", "x=1&y=2")
    assert doc["headers"]["Authorization"] == "Bearer s3cret"
    assert doc["headers"]["X-Custom"] == "v"
    assert (doc["body"], doc["body_len"]) == ("payload", 7)
    assert json.loads(http("GET", mock.url("/echo"))[2])["path"] == "/echo"


def test_bytes(mock: Mock) -> None:
    n = 1_000_003
    conn = HTTPConnection("127.0.0.1", mock.port, timeout=10)
    try:
        conn.request("GET", f"/bytes?n={n}&chunk=65536")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Length") is None
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert len(body) == n
    assert body == (b"0123456789abcdef" * (n // 16 + 1))[:n]
    assert http("GET", mock.url("/bytes?n=5&chunk=2&delay=0.01"))[2] == b"01234"


def test_break_after_leaves_chunked_body_unterminated(mock: Mock) -> None:
    mock.post("/_reset", b"")
    raw = RawResponse(mock.port, "/v1/chat/completions", {**CHAT, "stream": True},
                      {"X-Mock-Break-After": "2", "X-Mock-Tokens": "5"})
    try:
        chunks, terminated = raw.read_all()
    finally:
        raw.close()
    assert raw.status == 200
    assert not terminated
    events = sse_events(b"".join(data for _, data in chunks))
    assert len(events) == 2 and b"[DONE]" not in events
    stats = wait_until(lambda: (s := mock.stats())["streams_broken"] == 1 and s, what="broken")
    assert stats["streams_completed"] == stats["streams_aborted"] == 0


def test_client_disconnect_counts_as_aborted(mock: Mock) -> None:
    mock.post("/_reset", b"")
    raw = RawResponse(mock.port, "/v1/chat/completions", {**CHAT, "stream": True},
                      {"X-Mock-Token-Delay": "0.05", "X-Mock-Tokens": "200"})
    raw.read_chunk()
    raw.close()
    stats = wait_until(lambda: (s := mock.stats())["streams_aborted"] == 1 and s, timeout=5,
                       what="streams_aborted == 1")
    assert stats["streams_started"] == 1 and stats["streams_completed"] == 0
    wait_until(lambda: mock.stats()["active_requests"] == 0, timeout=5, what="no active requests")


def test_hang_until_switched_off(mock: Mock) -> None:
    mock.post("/_reset", b"")
    mock.control(hang=True)
    try:
        sock = socket.create_connection(("127.0.0.1", mock.port), timeout=0.4)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert mock.stats()["active_requests"] == 1
    finally:
        mock.control(hang=False)
    sock.settimeout(5)
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.close()


def test_cli_from_environment_and_sigterm() -> None:
    port = free_port()
    started = time.monotonic()
    proc = Proc([sys.executable, "-m", "mock_llm"], name="mock-llm-env",
                env={"MOCK_LLM_PORT": str(port), "MOCK_LLM_TOKENS": "2"})
    try:
        wait_http_up(f"http://127.0.0.1:{port}/health", proc)
        # Target is < 2 s (about 0.5 s here); the margin keeps a busy CI machine from flaking.
        assert time.monotonic() - started < 4.0
        assert get_json(f"http://127.0.0.1:{port}/health")["instance"] == f"mock-{port}"
        _, _, body = http("POST", f"http://127.0.0.1:{port}/v1/completions", {"prompt": "q"})
        assert json.loads(body)["choices"][0]["text"].endswith("] tok0 tok1")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.stop()


def test_models_list_and_usage_options(mock: Mock) -> None:
    status, _, body = mock.post("/v1/chat/completions", {**CHAT, "model": "not-listed"})
    assert status == 404 and "not-listed" in json.loads(body)["error"]["message"]
    doc = json.loads(mock.post("/v1/chat/completions", {**CHAT, "max_tokens": 3}, {"X-Mock-Cached-Tokens": "2"})[2])
    assert doc["usage"]["completion_tokens"] == 3
    assert doc["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    _, _, raw = mock.post("/v1/chat/completions", {**CHAT, "max_tokens": 2, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2
    before = mock.stats()["requests"]
    http("GET", mock.url("/v1/models"), headers={"User-Agent": "ntonix-models"})  # a gateway's discovery
    stats = mock.stats()
    assert stats["requests"] == before and stats["model_lists"] >= 1
