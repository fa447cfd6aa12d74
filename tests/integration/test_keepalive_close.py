"""A backend that announces keep-alive and closes the connection after each streamed answer.

llama.cpp's server does exactly this (``Keep-Alive: timeout=5, max=100``, then a close after
the last chunk of every stream, issue 13); the gateway used to put such sockets back into its
pool, reuse them without a check and answer 502 "backend closed the connection without
answering". The backend here is a few lines of raw sockets in threads, so the close comes
right after the last chunk, as llama.cpp's does. Non-streamed answers keep the connection
open, so the pool holds a mix of live and dead sockets, as with the real server.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.live.procs import client_exchange
from tests.live.servers import GatewayFactory

pytestmark = pytest.mark.integration

KEEP_ALIVE = b"Keep-Alive: timeout=5, max=100\r\n"


class ClosingBackend:
    """Answers chat completions; closes each connection right after a streamed answer."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buf) < length:
                        buf += conn.recv(65536)
                    body, buf = buf[:length], buf[length:]
                    if head.startswith(b"GET"):  # health checks and model discovery: not counted
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + KEEP_ALIVE + b"\r\nok")
                        continue
                    with self._lock:
                        self.requests += 1
                    if json.loads(body).get("stream"):
                        conn.sendall(self._stream())
                        return  # closed right after the last chunk, keep-alive announced
                    answer = json.dumps({"object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}]}).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + KEEP_ALIVE
                                 + b"Content-Length: %d\r\n\r\n" % len(answer) + answer)
            except OSError:
                return

    @staticmethod
    def _stream() -> bytes:
        events = [b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
                  b"data: [DONE]\n\n"]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                + KEEP_ALIVE + b"\r\n" + chunks + b"0\r\n\r\n")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def closing_backend() -> Iterator[ClosingBackend]:
    backend = ClosingBackend()
    yield backend
    backend.close()


def _chat(port: int, i: int) -> tuple[int, bytes]:
    stream = i % 2 == 0
    body = json.dumps({"model": "m", "stream": stream,
                       "messages": [{"role": "user", "content": f"q{i}"}]}).encode()
    status, _, data = client_exchange(port, "POST", "/v1/chat/completions", body,
                                      {"Content-Type": "application/json", "Cache-Control": "no-cache"})
    return status, data


def test_a_backend_closing_after_each_stream_gets_no_request_on_a_dead_connection(
        closing_backend: ClosingBackend, gateway: GatewayFactory) -> None:
    gw = gateway([f"127.0.0.1:{closing_backend.port}"],
                 config={"health": {"enabled": False}, "cache": {"enabled": False}})
    with ThreadPoolExecutor(8) as pool:
        results: list[Any] = list(pool.map(lambda i: _chat(gw.port, i), range(200)))
    errors = [(status, data[:200]) for status, data in results if status != 200]
    assert errors == []
    for i, (_, data) in enumerate(results):
        assert data.endswith(b"data: [DONE]\n\n") if i % 2 == 0 else b'"chat.completion"' in data
    # Every request reached the backend once: none was answered twice, none was lost.
    assert closing_backend.requests == 200
