"""Cache hits the worker answers before building a WSGI environ (ntonix/server/worker.py
``_answer_hit``), through real gunicorn and real sockets.

A request whose body comes chunked (``Transfer-Encoding: chunked``) always takes the WSGI path
(the fast path only reads bodies of known length), and its key is the same as the same JSON
sent with ``Content-Length``: so one gateway answers one entry both ways, and the two answers
can be held side by side, byte for byte (only ``Date`` may differ).
"""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any

import pytest

from tests.integration.test_cache import (
    PURGE_TOKEN,
    backend_calls,
    chat_body,
    only_worker,
    post,
    served_by,
    worker_pids,
)
from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


# ----------------------------------------------------------------------------- raw HTTP


def request_bytes(body: bytes, *, rid: str, chunked: bool = False, extra: str = "",
                  version: str = "HTTP/1.1", path: str = CHAT) -> bytes:
    head = (f"POST {path} {version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-Request-ID: {rid}\r\n{extra}")
    if chunked:
        half = len(body) // 2
        framed = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p) + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Conn:
    """One client connection; ``response()`` reads exactly one answer (by Content-Length)."""

    def __init__(self, gw: Gateway) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return chunk

    def response(self) -> bytes:
        """The raw bytes of the next answer (head and body)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise ConnectionError(f"closed before a whole head: {self.buf!r}")
        head, _, _ = self.buf.partition(b"\r\n\r\n")
        length = int(headers_of(head + b"\r\n\r\n")["content-length"])
        total = len(head) + 4 + length
        while len(self.buf) < total:
            if not self._more():
                raise ConnectionError("closed before the whole body")
        raw, self.buf = self.buf[:total], self.buf[total:]
        return raw

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (EOF), within the socket's timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def headers_of(raw: bytes) -> dict[str, str]:
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


def without_date(raw: bytes) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
    return b"\r\n".join(lines) + sep + body


def exchange(gw: Gateway, data: bytes) -> bytes:
    conn = Conn(gw)
    try:
        conn.send(data)
        return conn.response()
    finally:
        conn.close()


def stored(gw: Gateway, mock: MockBackend, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """POST ``body`` once (a MISS: the backend answers and the gateway stores it); its body."""
    before = backend_calls(mock)
    status, hdrs, answer = post(gw, body, headers)
    assert (status, hdrs.get("x-cache")) == (200, "MISS"), (status, hdrs, answer[:300])
    assert backend_calls(mock) == before + 1
    # The answer is stored after the client has it: wait until a lookup finds it.
    wait_until(lambda: post(gw, body, headers)[1].get("x-cache") == "HIT", timeout=10, what="the answer stored")
    return answer


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("hit")


@pytest.fixture(scope="module")
def gw(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], workers=1, config={"cache": {"purge_token": PURGE_TOKEN}})


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stream", [False, True])
def test_a_fast_hit_is_byte_for_byte_the_wsgi_paths_hit(gw: Gateway, mock: MockBackend, stream: bool) -> None:
    extra: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    body = chat_body(max_tokens=5, **extra)
    answer = stored(gw, mock, body)
    data = json.dumps(body).encode()
    calls = backend_calls(mock)
    rid = f"same-{uuid.uuid4().hex}"
    fast = exchange(gw, request_bytes(data, rid=rid))
    slow = exchange(gw, request_bytes(data, rid=rid, chunked=True))
    assert backend_calls(mock) == calls
    assert headers_of(fast)["x-cache"] == "HIT" and headers_of(slow)["x-cache"] == "HIT"
    assert fast.partition(b"\r\n\r\n")[2] == answer
    assert without_date(fast) == without_date(slow)
    assert headers_of(fast)["connection"] == "keep-alive"
    assert headers_of(fast)["x-request-id"] == rid


def test_a_fast_hit_is_logged_counted_and_its_tokens_saved(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body(max_tokens=4)
    answer = stored(gw, mock, body)
    usage = json.loads(answer)["usage"]
    data = json.dumps(body).encode()
    before = gw.metrics()
    fast_id, slow_id = f"fast-{uuid.uuid4().hex}", f"slow-{uuid.uuid4().hex}"
    exchange(gw, request_bytes(data, rid=fast_id))
    exchange(gw, request_bytes(data, rid=slow_id, chunked=True))
    lines = served_by(gw, {fast_id, slow_id})
    fast, slow = lines[fast_id], lines[slow_id]
    varying = {"timestamp", "latency_ms", "request_id"}
    assert {k: v for k, v in fast.items() if k not in varying} == {k: v for k, v in slow.items() if k not in varying}
    assert (fast["cache"], fast["status"], fast["model"], fast["bytes_sent"]) == ("HIT", 200, "mock-model",
                                                                                   len(answer))
    assert (fast["prompt_tokens"], fast["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])

    def counted() -> Any:
        m = gw.metrics()
        return m if m["cache_hits"] >= before["cache_hits"] + 2 else None

    after = wait_until(counted, timeout=10, what="the hits in /metrics")
    assert after["cache_hits"] == before["cache_hits"] + 2
    assert after["requests_total"] >= before["requests_total"] + 3  # the two hits and this /metrics
    saved = after["cache_tokens_saved"]["completion"] - before["cache_tokens_saved"]["completion"]
    assert saved == 2 * usage["completion_tokens"]


def test_a_hit_never_serves_another_credentials_entry(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body()
    data = json.dumps(body).encode()
    stored(gw, mock, body, {"Authorization": "Bearer alice"})
    hit = exchange(gw, request_bytes(data, rid=f"a-{uuid.uuid4().hex}", extra="Authorization: Bearer alice\r\n"))
    assert headers_of(hit)["x-cache"] == "HIT"
    for extra in ("Authorization: Bearer bob\r\n", "", "Authorization: Bearer alice\r\nX-Api-Key: k\r\n",
                  "Authorization: Bearer alice\r\nAuthorization: Bearer bob\r\n"):
        calls = backend_calls(mock)
        other = exchange(gw, request_bytes(data, rid=f"o-{uuid.uuid4().hex}", extra=extra))
        assert headers_of(other)["x-cache"] == "MISS", extra
        assert backend_calls(mock) == calls + 1, extra


def test_no_cache_and_no_store_are_not_answered_from_the_cache(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body()
    data = json.dumps(body).encode()
    stored(gw, mock, body)
    for directive in ("no-cache", "max-age=0", "no-store"):
        calls = backend_calls(mock)
        raw = exchange(gw, request_bytes(data, rid=f"n-{uuid.uuid4().hex}", extra=f"Cache-Control: {directive}\r\n"))
        assert headers_of(raw)["x-cache"] == "BYPASS", directive
        assert backend_calls(mock) == calls + 1, directive


def test_keep_alive_and_pipelined_requests_after_a_fast_hit(gw: Gateway, mock: MockBackend) -> None:
    body = chat_body()
    data = json.dumps(body).encode()
    stored(gw, mock, body)
    fresh = json.dumps(chat_body()).encode()
    conn = Conn(gw)
    try:
        ids = [f"p{i}-{uuid.uuid4().hex}" for i in range(4)]
        # Four requests in one write: hit, miss (to the backend), hit, then the gateway's own.
        conn.send(request_bytes(data, rid=ids[0]) + request_bytes(fresh, rid=ids[1])
                  + request_bytes(data, rid=ids[2])
                  + f"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: {ids[3]}\r\n\r\n".encode())
        answers = [conn.response() for _ in ids]
        assert [headers_of(a).get("x-cache") for a in answers] == ["HIT", "MISS", "HIT", None]
        assert [headers_of(a)["x-request-id"] for a in answers] == ids
        assert b'"status"' in answers[3].partition(b"\r\n\r\n")[2]
        # The same connection, one request at a time afterwards.
        rid = f"k-{uuid.uuid4().hex}"
        conn.send(request_bytes(data, rid=rid))
        again = conn.response()
        assert (headers_of(again)["x-cache"], headers_of(again)["x-request-id"]) == ("HIT", rid)
    finally:
        conn.close()


@pytest.mark.parametrize(("version", "extra"), [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", "")])
def test_connection_close_is_honoured_after_a_fast_hit(gw: Gateway, mock: MockBackend, version: str,
                                                       extra: str) -> None:
    body = chat_body()
    data = json.dumps(body).encode()
    stored(gw, mock, body)
    rid = f"c-{uuid.uuid4().hex}"
    conn = Conn(gw)
    try:
        conn.send(request_bytes(data, rid=rid, extra=extra, version=version)
                  + request_bytes(data, rid=f"after-{rid}"))  # never answered: the connection closes
        raw = conn.response()
        assert raw.startswith(version.encode() + b" 200 OK\r\n")
        assert (headers_of(raw)["x-cache"], headers_of(raw)["connection"]) == ("HIT", "close")
        assert conn.buf == b"" and conn.closed_by_server()
    finally:
        conn.close()


def test_purge_ends_fast_hits_in_every_worker(gateway: GatewayFactory, mock: MockBackend) -> None:
    gw2 = gateway([mock], workers=2, config={"cache": {"purge_token": PURGE_TOKEN}})
    workers = worker_pids(gw2)
    body = chat_body()
    data = json.dumps(body).encode()
    old = stored(gw2, mock, body)
    for pid in workers:  # each worker's L1 holds the entry (a hit there is a fast hit)
        with only_worker(gw2, pid, workers):
            for _ in range(2):
                raw = exchange(gw2, request_bytes(data, rid=f"w-{uuid.uuid4().hex}"))
                assert (headers_of(raw)["x-cache"], raw.partition(b"\r\n\r\n")[2]) == ("HIT", old)
    status, _, _ = gw2.request("POST", "/cache/purge", b"", {"Authorization": f"Bearer {PURGE_TOKEN}"})
    assert status == 200
    calls = backend_calls(mock)
    for pid in workers:
        with only_worker(gw2, pid, workers):
            rid = f"x-{uuid.uuid4().hex}"
            raw = exchange(gw2, request_bytes(data, rid=rid))
            # A miss, or (second worker) a hit of the answer the first one stored after the purge.
            assert raw.partition(b"\r\n\r\n")[2] != old, pid
            # A leader ends its flight after its client has the answer: never stop a worker before.
            served_by(gw2, {rid})
    assert backend_calls(mock) == calls + 1
