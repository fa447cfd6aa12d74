"""Backends that lie, hang or die mid-answer, through a live gateway.

Each test talks to the gateway through a raw socket; behind it sits ``RawBackend``, a tiny
HTTP/1.1 server on a plain socket (one thread per connection) that does what the request's
``X-Raw`` header asks:

=================  ===========================================================================
``ok``             a small JSON answer, keep-alive
``garbage``        bytes that are not HTTP, then close
``huge-headers``   a 200 OK whose header section is 200 KB
``break-close``    SSE stream head and two events, then the socket is shut down (no terminator)
``break-garbage``  two events, then bytes that are not chunked framing; the socket stays open
``silent``         accepts and reads the request, never answers
``take-close``     reads the request, 0.3 s later closes without a byte of answer
``trickle``        an SSE event every 0.1 s, forever (up to a minute)
``trickle-head``   the response head one byte every 0.1 s, forever (up to a minute)
=================  ===========================================================================

The backend notes every request with the id of the connection it came on, and when it noticed
the gateway close each connection, so tests can check reuse and release of backend connections.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.live.procs import raw_exchange, wait_until
from tests.live.procs import split_response as split
from tests.live.servers import Gateway, GatewayFactory

pytestmark = pytest.mark.integration

READ_TIMEOUT = 1.0
MINUTE = 60.0


# ----------------------------------------------------------------------------- the raw backend


@dataclass
class Conn:
    id: int
    opened: float
    closed_by_peer: float | None = None  # when we saw the gateway close it (EOF, reset, EPIPE)
    modes: list[str] = field(default_factory=list)


def read_request(conn: socket.socket, buf: bytearray) -> tuple[dict[str, str], bytes] | None:
    """One request (headers, body) off a keep-alive connection; None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = conn.recv(65536)
        if not data:
            return None
        rest += data
    buf[:] = rest[length:]
    return headers, rest[:length]


def wait_for_close(conn: socket.socket, record: Conn, limit: float = MINUTE) -> None:
    """Block until the gateway closes the connection (bounded), and note when."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        readable, _, _ = select.select([conn], [], [], 0.05)
        if readable:
            try:
                if not conn.recv(65536):
                    break
            except OSError:
                break
    record.closed_by_peer = time.monotonic()


def sse_event(i: int) -> bytes:
    data = b'data: {"choices": [{"delta": {"content": "tok%d"}}]}\n\n' % i
    return b"%x\r\n%b\r\n" % (len(data), data)


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
OK_BODY = json.dumps({"id": "raw", "object": "chat.completion",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}}]}).encode()
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
    len(OK_BODY), OK_BODY)
HUGE_HEADERS = (b"HTTP/1.1 200 OK\r\n"
                + b"".join(b"X-Pad-%04d: %b\r\n" % (i, b"p" * 190) for i in range(1000))
                + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")


class RawBackend:
    """A TCP server in threads; each connection serves requests as their ``X-Raw`` header asks."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[Conn] = []
        self.requests: list[tuple[int, str]] = []  # (connection id, mode)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def conn_of(self, mode: str) -> Conn:
        """The connection the last request of ``mode`` came on."""
        cid = next(c for c, m in reversed(self.requests) if m == mode)
        return self.conns[cid]

    def count(self, mode: str) -> int:
        return sum(1 for _, m in self.requests if m == mode)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                record = Conn(len(self.conns), time.monotonic())
                self.conns.append(record)
                self._open.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, record: Conn) -> None:
        conn.settimeout(MINUTE)
        buf = bytearray()
        try:
            while not self._stop.is_set():
                request = read_request(conn, buf)
                if request is None:
                    record.closed_by_peer = time.monotonic()
                    return
                headers, _ = request
                mode = headers.get("x-raw", "ok")
                record.modes.append(mode)
                with self._lock:
                    self.requests.append((record.id, mode))
                if not self._answer(conn, record, mode):
                    return
        except OSError:
            record.closed_by_peer = record.closed_by_peer or time.monotonic()
        finally:
            conn.close()

    def _answer(self, conn: socket.socket, record: Conn, mode: str) -> bool:
        """Answer one request; False when the connection is finished with."""
        if mode == "ok":
            conn.sendall(OK_RESPONSE)
            return True
        if mode == "garbage":
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe not HTTP at all \x1b[2J\r\n\r\n")
            return False
        if mode == "huge-headers":
            conn.sendall(HUGE_HEADERS)
            wait_for_close(conn, record, 10.0)
            return False
        if mode == "break-close":
            conn.sendall(SSE_HEAD + sse_event(0) + sse_event(1))
            time.sleep(0.05)
            conn.shutdown(socket.SHUT_RDWR)
            return False
        if mode == "break-garbage":
            # The connection stays open: only the gateway can decide not to use it again.
            conn.sendall(SSE_HEAD + sse_event(0) + sse_event(1))
            time.sleep(0.05)
            conn.sendall(b"zz this is not a chunk size\r\n\r\n")
            wait_for_close(conn, record)
            return False
        if mode == "silent":
            wait_for_close(conn, record)
            return False
        if mode == "take-close":  # reads the request, works on it a while, hangs up without a byte
            time.sleep(0.3)
            return False
        if mode == "trickle":
            conn.sendall(SSE_HEAD)
            deadline = time.monotonic() + MINUTE
            i = 0
            while time.monotonic() < deadline:
                conn.sendall(sse_event(i))
                i += 1
                readable, _, _ = select.select([conn], [], [], 0.1)
                if readable and not conn.recv(65536):
                    break
            record.closed_by_peer = time.monotonic()
            return False
        if mode == "trickle-head":
            head = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"s" * 10_000
            for byte in head:
                conn.sendall(bytes([byte]))
                readable, _, _ = select.select([conn], [], [], 0.1)
                if readable and not conn.recv(65536):
                    break
            record.closed_by_peer = time.monotonic()
            return False
        raise AssertionError(f"unknown X-Raw mode {mode!r}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(timeout=2)


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def raw() -> Iterator[RawBackend]:
    backend = RawBackend()
    yield backend
    backend.close()


def gateway_config(failure_threshold: int = 1000) -> dict[str, Any]:
    return {"health": {"enabled": False},
            "proxy": {"read_timeout_s": READ_TIMEOUT, "retries": 0},
            "circuit_breaker": {"failure_threshold": failure_threshold, "cooldown_s": 60}}


@pytest.fixture(scope="module")
def gw(raw: RawBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([raw.address], config=gateway_config())


def chat(stream: bool = False, content: str | None = None) -> bytes:
    return json.dumps({"model": "m", "stream": stream,
                       "messages": [{"role": "user", "content": content or f"unique {uuid.uuid4()}"}]}).encode()


def request_bytes(mode: str, body: bytes, path: str = "/v1/chat/completions") -> bytes:
    """One request for the raw backend's ``mode``; the gateway closes the connection after it."""
    return (f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nX-Raw: {mode}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body








def json_error(raw: bytes, expected: int) -> dict[str, Any]:
    status, headers, body = split(raw)
    assert status == expected, raw[:500]
    assert headers["content-type"].startswith("application/json"), headers
    assert int(headers["content-length"]) == len(body), headers
    err: dict[str, Any] = json.loads(body)["error"]
    assert err["message"] and err["type"] == "upstream_error", err
    assert re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", headers["x-request-id"]), headers
    return err


def chunks_of(body: bytes) -> tuple[list[bytes], bool]:
    """Decode a chunked body: (data chunks, whether it ended with the terminating chunk)."""
    out, pos = [], 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return out, False
        size = int(body[pos:eol], 16)
        if size == 0:
            return out, body[eol:eol + 4] == b"\r\n\r\n"
        data = body[eol + 2: eol + 2 + size]
        if len(data) < size or body[eol + 2 + size: eol + 4 + size] != b"\r\n":
            return [*out, data], False
        out.append(data)
        pos = eol + 4 + size


def still_serves(gw: Gateway, raw: RawBackend) -> None:
    status, _, body = split(raw_exchange(gw.port, request_bytes("ok", chat())))
    assert status == 200, body
    assert json.loads(body)["id"] == "raw"


def noticed_within(what: Callable[[], float | None], since: float, limit: float) -> float:
    """Seconds from ``since`` until ``what()`` gives a time (waits up to ``limit`` + 2 s)."""
    at = wait_until(what, timeout=limit + 2.0, interval=0.02, what="the backend connection to be closed")
    assert at is not None
    return at - since


# ----------------------------------------------------------------------------- tests


def test_garbage_instead_of_http_is_502(gw: Gateway, raw: RawBackend) -> None:
    before = raw.count("garbage")
    err = json_error(raw_exchange(gw.port, request_bytes("garbage", chat())), 502)
    assert "invalid HTTP response" in err["message"], err
    assert raw.count("garbage") == before + 1, "a request that reached a backend is never sent twice"
    still_serves(gw, raw)


def test_response_headers_over_the_limit_are_502(gw: Gateway, raw: RawBackend) -> None:
    started = time.monotonic()
    err = json_error(raw_exchange(gw.port, request_bytes("huge-headers", chat())), 502)
    assert "header" in err["message"].lower(), err
    # The gateway gave up on the connection rather than reading the rest or keeping it.
    took = noticed_within(lambda: raw.conn_of("huge-headers").closed_by_peer, started, 2.0)
    assert took < 3.0, took
    still_serves(gw, raw)


def test_backend_that_never_answers_is_504_at_the_read_timeout(gw: Gateway, raw: RawBackend) -> None:
    started = time.monotonic()
    err = json_error(raw_exchange(gw.port, request_bytes("silent", chat())), 504)
    took = time.monotonic() - started
    assert READ_TIMEOUT * 0.9 <= took < READ_TIMEOUT + 1.5, took
    assert "within" in err["message"], err
    # ... and that backend connection is closed, not kept for the next request.
    noticed_within(lambda: raw.conn_of("silent").closed_by_peer, started, READ_TIMEOUT + 1.0)
    still_serves(gw, raw)


def test_backend_that_trickles_its_headers_forever_is_504(gw: Gateway, raw: RawBackend) -> None:
    # Every byte comes within the read timeout, but the head never ends: the read timeout is
    # "the longest wait for a backend's response headers" (INTERFACE.md), not per byte.
    started = time.monotonic()
    json_error(raw_exchange(gw.port, request_bytes("trickle-head", chat())), 504)
    took = time.monotonic() - started
    assert took < READ_TIMEOUT + 1.5, took
    noticed_within(lambda: raw.conn_of("trickle-head").closed_by_peer, started, READ_TIMEOUT + 1.0)


@pytest.mark.parametrize("mode", ["break-close", "break-garbage"])
def test_stream_broken_mid_way_reaches_the_client_broken_and_is_not_cached(
        gw: Gateway, raw: RawBackend, mode: str) -> None:
    body = chat(stream=True)
    for attempt in range(2):
        status, headers, rest = split(raw_exchange(gw.port, request_bytes(mode, body)))
        assert status == 200
        assert headers["transfer-encoding"] == "chunked", headers
        # Nothing cached: the same request again goes to the backend.
        assert headers["x-cache"] == "MISS", (attempt, headers)
        events, clean_end = chunks_of(rest)
        assert not clean_end, f"a broken stream must not end with the terminating chunk: {rest!r}"
        assert b"".join(events).startswith(sse_event(0).split(b"\r\n")[1]), rest
        assert b"[DONE]" not in rest
    assert raw.count(mode) == 2
    # The broken connection is never used again: the next request comes on another one, and
    # the gateway closed the one that broke (the backend kept it open after garbage).
    broken = raw.conn_of(mode)
    if mode == "break-garbage":
        noticed_within(lambda: broken.closed_by_peer, time.monotonic(), 2.0)
    still_serves(gw, raw)
    assert raw.conn_of("ok").id != broken.id
    assert broken.modes == [mode]


def test_breaker_counts_streams_broken_mid_way(raw: RawBackend, gateway: GatewayFactory) -> None:
    threshold = 3
    gw = gateway([raw.address], config=gateway_config(failure_threshold=threshold))
    for _ in range(threshold):
        status, _, rest = split(raw_exchange(gw.port, request_bytes("break-close", chat(stream=True))))
        assert status == 200 and not chunks_of(rest)[1]
    wait_until(lambda: "backend.breaker_changed" in gw.output(), timeout=5.0, what="the breaker to open")
    lines = [json.loads(line) for line in gw.output().splitlines()
             if line.startswith("{") and "backend.breaker_changed" in line]
    assert any(line.get("new_state") == "open" and line.get("backend") == raw.address for line in lines), lines
    backend = next(b for b in gw.metrics()["backends"] if b["address"] == raw.address)
    assert backend["errors"] >= threshold, backend
    assert backend["state"] == "open", backend
    # Open: the next request is not sent to it.
    before = len(raw.requests)
    status, headers, _ = split(raw_exchange(gw.port, request_bytes("ok", chat())))
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert len(raw.requests) == before


def test_client_can_leave_a_stream_that_trickles_forever(gw: Gateway, raw: RawBackend) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(request_bytes("trickle", chat(stream=True)))
        got = b""
        deadline = time.monotonic() + 10
        while got.count(b"data: ") < 3 and time.monotonic() < deadline:
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200") and got.count(b"data: ") >= 3, got
        conn = raw.conn_of("trickle")
        assert conn.closed_by_peer is None
    left = time.monotonic()  # the client closed its socket here
    took = noticed_within(lambda: conn.closed_by_peer, left, 2.0)
    assert took < 2.0, f"the backend connection stayed open {took:.2f}s after the client left"
    still_serves(gw, raw)


@pytest.mark.parametrize(("method", "received"), [("POST", 1), ("GET", 2)])
def test_a_request_the_backend_took_on_a_reused_connection_is_resent_only_if_idempotent(
        raw: RawBackend, gateway: GatewayFactory, method: str, received: int) -> None:
    # The connection is reused (a first request left it in the pool); the backend reads the
    # request and hangs up a while later without answering. A POST may have run (an inference):
    # never sent again (502). A GET may be, once, on a fresh connection, as nginx does.
    gw = gateway([raw.address], config=gateway_config())
    status, _, _ = split(raw_exchange(gw.port, request_bytes("ok", chat())))  # the pool keeps its connection
    assert status == 200
    before = raw.count("take-close")
    body = chat() if method == "POST" else b""
    data = request_bytes("take-close", body).replace(b"POST ", method.encode() + b" ", 1)
    if method == "GET":
        data = data.replace(b"Content-Length: 0\r\n", b"")
    json_error(raw_exchange(gw.port, data), 502)
    assert raw.count("take-close") - before == received
