#!/usr/bin/env python3
"""A fast OpenAI-like backend for scripts/bench: raw HTTP/1.1 keep-alive, no framework.

    python -m tools.bench.backend --port 9001 [--delay 1.0]

Answers, as cheaply as Python allows (the bench measures the proxy in front, not this):

* ``POST`` anything: a fixed ~350 B ``chat.completion`` JSON, at once.
* a JSON body with ``"stream": true``: Server-Sent Events, ``--events`` (20) events
  ``--interval`` (50 ms) apart, the first one at once, then ``data: [DONE]`` one interval
  later; chunked. The events depend only on the request body (``sse_body``), so a client can
  check that every stream it got through a proxy is byte-identical to what was sent.
* ``GET /big?mb=N`` (default 200): N MiB chunked, written as fast as the socket takes it
  (transport flow control: write until the kernel buffer is full, resume when it drains).
* ``GET /health``: 200. Any other ``GET``: the same JSON as a POST.
* ``--delay S`` (or per request ``?delay=S`` / header ``X-Bench-Delay: S``): answer after S s.

Why asyncio and not gevent: on one core of the bench machine a bare gevent
accept/recv/sendall loop served ~14.7k requests/s, a plain ``asyncio.Protocol`` 29-46k and this
``BufferedProtocol`` 73k (c=500). gevent starts and stops an I/O watcher around every wait,
while the protocol's reader stays registered; ``data_received`` costs a 256 KiB allocation per
``recv``. The backend must stay far cheaper than the proxies it feeds.

The request parser is deliberately minimal (Content-Length or chunked bodies, keep-alive,
pipelining, ``Connection: close``, HTTP/1.0); it serves the bench's clients and proxies only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import zlib
from urllib.parse import parse_qs

EVENTS = 20
INTERVAL = 0.05

JSON_BODY = json.dumps({
    "id": "chatcmpl-bench0000000000000000000000",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the bench backend, "
                                           "a short and fixed answer."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24},
}, separators=(",", ":")).encode()
JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % len(JSON_BODY)) + JSON_BODY
HEALTH_BODY = b'{"status":"ok"}'
HEALTH_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(HEALTH_BODY), HEALTH_BODY)
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
BIG_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
BIG_BLOCK = 64 * 1024
BIG_CHUNK = b"%x\r\n" % BIG_BLOCK + (b"0123456789abcdef" * (BIG_BLOCK // 16)) + b"\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 64 * 1024


def sse_events(body: bytes, events: int = EVENTS) -> list[bytes]:
    """The SSE events (each ``data: ...\\n\\n``) a stream request with this body receives."""
    tag = zlib.crc32(body)
    out = [b'data: {"id":"chatcmpl-%08x","object":"chat.completion.chunk","created":1700000000,'
           b'"model":"bench-model","choices":[{"index":0,"delta":{"content":"token%02d "},'
           b'"finish_reason":null}]}\n\n' % (tag, i) for i in range(events)]
    out.append(b"data: [DONE]\n\n")
    return out


def sse_body(body: bytes, events: int = EVENTS) -> bytes:
    """The whole (de-chunked) SSE body for a stream request with this body."""
    return b"".join(sse_events(body, events))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Incomplete(Exception):
    pass


class _Bad(Exception):
    pass


def _field(fields: bytes, name: bytes) -> bytes | None:
    """The value of a header in the lower-cased header block (which starts with CRLF)."""
    k = fields.find(b"\r\n" + name + b":")
    if k < 0:
        return None
    start = k + len(name) + 3
    end = fields.find(b"\r\n", start)
    return fields[start:end if end >= 0 else len(fields)].strip()


def _parse(buf: bytes) -> tuple[tuple[bytes, bytes, bytes, bytes, bytes, bool], int]:
    """One request from the front of ``buf``: (method, path, query, fields, body, close), length."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        if len(buf) > MAX_HEAD:
            raise _Bad
        raise _Incomplete
    head = buf[:i]
    eol = head.find(b"\r\n")
    request_line = head if eol < 0 else head[:eol]
    fields = b"" if eol < 0 else head[eol:].lower()
    try:
        method, target, version = request_line.split(b" ", 2)
    except ValueError:
        raise _Bad from None
    close = version == b"HTTP/1.0" or _field(fields, b"connection") == b"close"
    pos = i + 4
    te = _field(fields, b"transfer-encoding")
    if te is not None and b"chunked" in te:
        parts = []
        while True:
            j = buf.find(b"\r\n", pos)
            if j < 0:
                raise _Incomplete
            try:
                size = int(buf[pos:j].split(b";")[0], 16)
            except ValueError:
                raise _Bad from None
            if size == 0:
                end = buf.find(b"\r\n\r\n", j)  # any trailers, then the empty line
                if end < 0:
                    raise _Incomplete
                pos = end + 4
                break
            if len(buf) < j + 2 + size + 2:
                raise _Incomplete
            parts.append(buf[j + 2:j + 2 + size])
            pos = j + 2 + size + 2
        body = b"".join(parts)
    else:
        raw = _field(fields, b"content-length")
        length = int(raw) if raw else 0
        if len(buf) < pos + length:
            raise _Incomplete
        body = buf[pos:pos + length]
        pos += length
    path, _, query = target.partition(b"?")
    return (method, path, query, fields, body, close), pos


class BenchProtocol(asyncio.BufferedProtocol):
    """One connection. A BufferedProtocol: with plain ``data_received`` asyncio allocates a
    256 KiB bytes object per ``recv``, which cost more system time than the rest of a request."""

    def __init__(self, delay: float, events: int, interval: float) -> None:
        self._rbuf = bytearray(65536)
        self._rview = memoryview(self._rbuf)
        self.delay, self.events, self.interval = delay, events, interval
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # an answer is in progress (delayed, streaming); later requests wait
        self.close_after = False
        self.paused = False
        self.big_left = 0

    # -------------------------------------------------------------- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=256 * 1024)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self.buf += self._rbuf[:nbytes]
        if not self.busy:
            self._serve()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._serve()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.big_left:
            self._pump_big()

    # -------------------------------------------------------------- requests
    def _serve(self) -> None:
        while not self.busy and self.transport is not None:
            try:
                req, used = _parse(self.buf)
            except _Incomplete:
                return
            except _Bad:
                self.transport.write(BAD_REQUEST)
                self.transport.close()
                return
            self.buf = self.buf[used:]
            self._answer(*req)

    def _answer(self, method: bytes, path: bytes, query: bytes, fields: bytes, body: bytes, close: bool) -> None:
        assert self.transport is not None
        self.close_after = close
        if method == b"GET" and path == b"/health":
            self._write_done(HEALTH_RESPONSE)
            return
        if method == b"GET" and path == b"/big":
            mb = float(parse_qs(query.decode()).get("mb", ["200"])[0])
            self.busy = True
            self.big_left = int(mb * 1024 * 1024) // BIG_BLOCK
            self.transport.write(BIG_HEAD)
            self._pump_big()
            return
        delay = self.delay
        if query or b"x-bench-delay" in fields:
            delay = self._delay_of(query, fields, delay)
        stream = b'"stream"' in body and json.loads(body).get("stream") is True
        if stream:
            self.busy = True
            if delay:
                self.loop.call_later(delay, self._start_sse, body)
            else:
                self._start_sse(body)
        elif delay:
            self.busy = True
            self.loop.call_later(delay, self._write_done, JSON_RESPONSE)
        else:
            self._write_done(JSON_RESPONSE)

    def _write_done(self, data: bytes) -> None:
        """Write the rest of an answer; then serve whatever requests queued meanwhile."""
        if self.transport is None:
            return
        self.transport.write(data)
        self.busy = False
        if self.close_after:
            self.transport.close()
            self.transport = None
            return
        if self.buf:
            self._serve()

    @staticmethod
    def _delay_of(query: bytes, fields: bytes, default: float) -> float:
        q = parse_qs(query.decode())
        if "delay" in q:
            return float(q["delay"][0])
        raw = _field(fields, b"x-bench-delay")
        return float(raw) if raw else default

    # -------------------------------------------------------------- SSE
    def _start_sse(self, body: bytes) -> None:
        if self.transport is None:
            return
        events = sse_events(body, self.events)
        self.transport.write(SSE_HEAD + _chunk(events[0]))
        t0 = self.loop.time()
        for n in range(1, len(events)):
            self.loop.call_at(t0 + n * self.interval, self._sse_event, events[n], n == len(events) - 1)

    def _sse_event(self, event: bytes, last: bool) -> None:
        if self.transport is None:
            return
        if last:
            self._write_done(_chunk(event) + b"0\r\n\r\n")
        else:
            self.transport.write(_chunk(event))

    # -------------------------------------------------------------- /big
    def _pump_big(self) -> None:
        t = self.transport
        while self.big_left and not self.paused and t is not None:
            t.write(BIG_CHUNK)
            self.big_left -= 1
        if not self.big_left and t is not None:
            self._write_done(b"0\r\n\r\n")


async def serve(host: str, port: int, delay: float, events: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: BenchProtocol(delay, events, interval), host, port,
                                      backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench_backend ready on {host}:{port} pid {os.getpid()}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0, help="answer after this many seconds")
    p.add_argument("--events", type=int, default=EVENTS, help="SSE events per stream")
    p.add_argument("--interval", type=float, default=INTERVAL, help="seconds between SSE events")
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.delay, args.events, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
