"""Streaming through a live gateway: events arrive as the backend sends them, byte-identical,
and a client that goes away makes the gateway close its backend connection.

Streams are read with a raw socket and an incremental chunked decoder, so arrival times are
the client's own and no HTTP library buffers anything. Every request carries a unique prompt,
so the response cache never answers one of them.

Whether the gateway closed its backend connection is read from the kernel (``/proc/net/tcp``):
when the gateway closes its end, the mock's end of that connection leaves ESTABLISHED
(CLOSE_WAIT) at once, long before the mock itself would notice (it only does when it writes).
Health checks are off in this module so that no probe connection comes and goes meanwhile.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live.procs import wait_until
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("s")


@pytest.fixture(scope="module")
def gw(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], config={"health": {"enabled": False}})


@pytest.fixture
def fresh(mock: MockBackend) -> MockBackend:
    mock.reset()
    return mock


def chat(stream: bool = True, **extra: object) -> bytes:
    body = {"model": "mock-model", "stream": stream,
            "messages": [{"role": "user", "content": f"unique {uuid.uuid4()}"}], **extra}
    return json.dumps(body).encode()


class RawStream:
    """One HTTP/1.1 request on a raw socket; the response body decoded chunk by chunk as it arrives."""

    def __init__(self, port: int, method: str, path: str, body: bytes = b"",
                 headers: dict[str, str] | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.started = time.monotonic()
        hdrs = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
                **(headers or {})}
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        self.sock.sendall(head.encode("latin-1") + body)
        self._buf = b""
        self.status, self.headers = self._read_head()
        self.complete = False  # the chunked terminator arrived

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self._buf += data
        return bool(data)

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self._buf:
            if not self._fill():
                raise ConnectionError(f"closed before the response head: {self._buf!r}")
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def pieces(self) -> Iterator[tuple[float, bytes]]:
        """(seconds since the request, data) per chunk of a chunked body, until its end or a cut."""
        assert self.headers.get("transfer-encoding") == "chunked", self.headers
        while True:
            while b"\r\n" not in self._buf:
                if not self._fill():
                    return
            size_line, _, rest = self._buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                self._buf = size_line + b"\r\n" + rest
                if not self._fill():
                    return
                size_line, _, rest = self._buf.partition(b"\r\n")
            data, self._buf = rest[:size], rest[size + 2:]
            if size == 0:
                self.complete = True
                return
            yield time.monotonic() - self.started, data

    def events(self) -> Iterator[tuple[float, bytes]]:
        """(arrival time, bytes) per SSE event (LF or CRLF framing), as each one completes."""
        pending = b""
        for t, data in self.pieces():
            pending += data
            while m := re.search(rb"\r\n\r\n|\n\n", pending):
                yield t, pending[:m.end()]
                pending = pending[m.end():]
        if pending:
            yield time.monotonic() - self.started, pending

    def body(self) -> bytes:
        return b"".join(data for _, data in self.pieces())

    def close(self) -> None:
        self.sock.close()


def normalise(body: bytes) -> bytes:
    """Blank the fields that differ between two answers to the same prompt (id, timestamp)."""
    body = re.sub(rb'"id": "[a-z]+-[^"]+"', b'"id": "*"', body)
    return re.sub(rb'"created": \d+', b'"created": 0', body)


def backend_connections(port: int) -> dict[int, str]:
    """The server ends of TCP connections on local ``port``: peer port -> state."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":
                out[int(remote.rsplit(":", 1)[1], 16)] = TCP_STATES.get(state, state)
    return out


def one_left_established(before: dict[int, str], port: int) -> bool:
    now = backend_connections(port)
    return any(now.get(peer, "gone") != "ESTABLISHED" for peer, state in before.items() if state == "ESTABLISHED")


# ----------------------------------------------------------------------------- timing


def assert_backend_closed_within_a_second(before: dict[int, str], port: int) -> None:
    """The gateway's connection to the backend on ``port`` leaves ESTABLISHED within 1 s."""
    closed_at = time.monotonic()
    wait_until(lambda: one_left_established(before, port), timeout=1.0,
               what="the gateway to close its backend connection")
    assert time.monotonic() - closed_at < 1.0


def test_first_event_long_before_the_last(gw: Gateway) -> None:
    stream = RawStream(gw.port, "POST", "/v1/chat/completions", chat(),
                       {"X-Mock-TTFT": "0", "X-Mock-Token-Delay": "0.2", "X-Mock-Tokens": "10"})
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(stream.events())
    finally:
        stream.close()
    assert stream.complete
    assert len(events) == 11  # 10 tokens + [DONE]
    assert events[-1][1] == b"data: [DONE]\n\n"
    first, last = events[0][0], events[-1][0]
    assert first < 1.0, f"first event after {first:.2f}s"
    assert last - first >= 1.0, f"first at {first:.2f}s, last at {last:.2f}s: held back"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(events)]
    assert max(gaps) < 1.0, gaps  # event by event, not in bursts
    assert 1.6 <= last <= 4.0, last


def test_headers_reach_the_client_before_the_first_token(gw: Gateway) -> None:
    # The mock sends its headers at once and the first token after 1.5 s.
    stream = RawStream(gw.port, "POST", "/v1/chat/completions", chat(),
                       {"X-Mock-TTFT": "1.5", "X-Mock-Tokens": "2"})
    try:
        at_headers = time.monotonic() - stream.started
        events = list(stream.events())
    finally:
        stream.close()
    assert stream.status == 200
    assert at_headers < 1.0, at_headers
    assert events[0][0] >= 1.4


def test_chunked_non_sse_body_is_relayed_as_it_arrives(gw: Gateway) -> None:
    stream = RawStream(gw.port, "GET", "/bytes?n=6000&chunk=1000&delay=0.25")
    try:
        pieces = list(stream.pieces())
    finally:
        stream.close()
    assert stream.complete
    data = b"".join(p for _, p in pieces)
    assert data == (b"0123456789abcdef" * 400)[:6000]
    assert pieces[0][0] < 0.8
    assert pieces[-1][0] - pieces[0][0] >= 1.0, [round(t, 2) for t, _ in pieces]


# ----------------------------------------------------------------------------- byte-identical framing


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_sse_framing_byte_identical_to_the_backend(gw: Gateway, mock: MockBackend, crlf: bool) -> None:
    body = chat()
    headers = {"X-Mock-Tokens": "6", "X-Mock-Token-Delay": "0.01"}
    if crlf:
        headers["X-Mock-Crlf"] = "1"
    direct = RawStream(mock.port, "POST", "/v1/chat/completions", body, headers)
    proxied = RawStream(gw.port, "POST", "/v1/chat/completions", body, {**headers, "Cache-Control": "no-store"})
    try:
        direct_body, proxied_body = direct.body(), proxied.body()
    finally:
        direct.close()
        proxied.close()
    assert direct.complete and proxied.complete
    assert normalise(proxied_body) == normalise(direct_body)
    end = b"\r\n\r\n" if crlf else b"\n\n"
    assert proxied_body.count(end) == 7
    assert proxied_body.endswith(b"data: [DONE]" + end)
    if not crlf:
        assert b"\r" not in proxied_body


def test_completions_stream_byte_identical(gw: Gateway, mock: MockBackend) -> None:
    body = json.dumps({"model": "m", "prompt": f"p {uuid.uuid4()}", "stream": True, "max_tokens": 5}).encode()
    direct = RawStream(mock.port, "POST", "/v1/completions", body)
    proxied = RawStream(gw.port, "POST", "/v1/completions", body, {"Cache-Control": "no-store"})
    try:
        assert normalise(proxied.body()) == normalise(direct.body())
    finally:
        direct.close()
        proxied.close()


def test_stream_broken_by_the_backend_is_not_ended_cleanly(gw: Gateway, fresh: MockBackend) -> None:
    stream = RawStream(gw.port, "POST", "/v1/chat/completions", chat(),
                       {"X-Mock-Tokens": "8", "X-Mock-Break-After": "3", "X-Mock-Token-Delay": "0.02"})
    try:
        events = list(stream.events())
    finally:
        stream.close()
    assert stream.status == 200
    assert not stream.complete, "a broken stream must not look complete to the client"
    assert len(events) == 3
    assert b"[DONE]" not in b"".join(e for _, e in events)
    assert fresh.stats()["streams_broken"] == 1


# ----------------------------------------------------------------------------- client disconnect


def test_disconnect_mid_stream_aborts_the_backend_stream(gw: Gateway, fresh: MockBackend) -> None:
    stream = RawStream(gw.port, "POST", "/v1/chat/completions", chat(),
                       {"X-Mock-Token-Delay": "0.3", "X-Mock-Tokens": "50"})
    first = next(stream.events())
    assert first[1].startswith(b"data: {")
    assert fresh.stats()["streams_started"] == 1
    before = backend_connections(fresh.port)
    stream.close()
    assert_backend_closed_within_a_second(before, fresh.port)
    stats = wait_until(lambda: (s := fresh.stats())["streams_aborted"] == 1 and s, timeout=2.0,
                       what="the mock to see its stream aborted")
    assert stats["streams_completed"] == 0
    wait_until(lambda: fresh.stats()["active_requests"] == 0, timeout=2.0, what="no request left on the mock")


def test_disconnect_while_waiting_for_response_headers(gw: Gateway, fresh: MockBackend) -> None:
    # A non-streamed answer: the mock sends nothing at all for 3 s, headers included.
    body = chat(stream=False)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                  b"X-Mock-TTFT: 3\r\nX-Mock-Tokens: 2\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: fresh.stats()["active_requests"] == 1, timeout=2.0, what="the request to reach the mock")
        before = backend_connections(fresh.port)
    assert_backend_closed_within_a_second(before, fresh.port)


def test_disconnect_before_the_first_event_closes_the_backend_connection(gw: Gateway, fresh: MockBackend) -> None:
    # Headers arrive at once; the first event would come after 3 s. The client leaves at once.
    stream = RawStream(gw.port, "POST", "/v1/chat/completions", chat(), {"X-Mock-TTFT": "3", "X-Mock-Tokens": "5"})
    assert stream.status == 200
    wait_until(lambda: fresh.stats()["streams_started"] == 1, timeout=2.0, what="the stream to start")
    before = backend_connections(fresh.port)
    stream.close()
    assert_backend_closed_within_a_second(before, fresh.port)
    # The mock notices when it writes its first event.
    wait_until(lambda: fresh.stats()["streams_aborted"] == 1, timeout=5.0, what="the mock to see the abort")
    assert fresh.stats()["streams_completed"] == 0


def test_gateway_serves_on_after_disconnects(gw: Gateway) -> None:
    status, _, body = gw.request("POST", "/v1/chat/completions", json.loads(chat(stream=False)))
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"].startswith("[s #")
