#!/usr/bin/env python3
"""SSE load for scripts/bench: C concurrent streams, TTFT and byte-for-byte checks.

    python -m tools.bench.sse_client --port 8080 --streams 1000 --seconds 4 [--ramp 1]

``--streams`` slots each hold one keep-alive connection and run one chat-completion stream
after another (a unique prompt each time) until ``--seconds`` have passed after the ramp. Slot
i starts ``i * ramp / streams`` seconds in, so streams begin at a steady rate and, once the
ramp is over, ``--streams`` of them are open at any moment (a stream lasts about as long as
the ramp: 20 events 50 ms apart). Several ``--port`` values spread the slots over them
round-robin (direct to two backends).

For every stream: TTFT, the time from sending the request (after connecting, for a slot's
first stream) to the arrival of the first body bytes (the first event); and whether the
de-chunked body equals ``bench_backend.sse_body(request body)`` exactly. Prints one JSON
object: ``{"streams", "ok", "mismatched", "errors", "ttft_p50_ms", "ttft_p99_ms",
"ttft_max_ms", "first_error"}``.

asyncio protocols rather than gevent: this client shares a core with the backends, and per
received event a protocol callback costs about half of a gevent ``recv`` wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from typing import Any

from tools.bench.backend import EVENTS, sse_body
from tools.stats import percentile


class StreamError(Exception):
    pass


def dechunk(raw: bytes) -> bytes | None:
    """The body of a complete chunked encoding (no trailers), or None when it is not complete."""
    parts: list[bytes] = []
    pos = 0
    while True:
        j = raw.find(b"\r\n", pos)
        if j < 0:
            return None
        size = int(raw[pos:j].split(b";")[0], 16)
        if size == 0:
            return b"".join(parts) if raw[j:j + 4] == b"\r\n\r\n" and j + 4 == len(raw) else None
        if len(raw) < j + 2 + size + 2:
            return None
        parts.append(raw[j + 2:j + 2 + size])
        pos = j + 2 + size + 2


class Conn(asyncio.BufferedProtocol):
    """One keep-alive client connection; ``start`` sends a request, the future gets the answer.

    A BufferedProtocol: plain ``data_received`` makes asyncio allocate a 256 KiB bytes object
    per ``recv``, which costs more (in system time) than everything else per event.
    """

    def __init__(self) -> None:
        self._rbuf = bytearray(65536)
        self._rview = memoryview(self._rbuf)
        self.transport: asyncio.Transport | None = None
        self.fut: asyncio.Future[tuple[float, bytes, bool]] | None = None
        self.buf = b""
        self.head: tuple[int, dict[bytes, bytes]] | None = None
        self.t0 = 0.0
        self.ttft = -1.0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.fut is not None and not self.fut.done():
            if self.head is not None and b"content-length" not in self.head[1] and not self._chunked():
                self._finish(self.buf, keep=False)  # delimited by close
            else:
                self.fut.set_exception(StreamError(f"connection closed early ({exc or 'EOF'})"))

    def start(self, request: bytes) -> asyncio.Future[tuple[float, bytes, bool]]:
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        self.buf, self.head, self.ttft = b"", None, -1.0
        self.t0 = time.perf_counter()
        self.transport.write(request)
        return self.fut

    def _chunked(self) -> bool:
        return self.head is not None and b"chunked" in self.head[1].get(b"transfer-encoding", b"").lower()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rview[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        if self.fut is None or self.fut.done():
            return
        self.buf += bytes(data)
        if self.head is None:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            lines = self.buf[:i].split(b"\r\n")
            self.buf = self.buf[i + 4:]
            fields = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(b":")
                fields[k.strip().lower()] = v.strip()
            try:
                status = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                self.fut.set_exception(StreamError(f"bad status line {lines[0][:80]!r}"))
                return
            self.head = (status, fields)
            if status != 200:
                self.fut.set_exception(StreamError(f"status {status}"))
                return
        if self.buf and self.ttft < 0:
            self.ttft = time.perf_counter() - self.t0
        fields = self.head[1]
        if self._chunked():
            if self.buf.endswith(b"0\r\n\r\n"):
                body = dechunk(self.buf)
                if body is not None:
                    self._finish(body, keep=fields.get(b"connection", b"").lower() != b"close")
        elif b"content-length" in fields and len(self.buf) >= int(fields[b"content-length"]):
            self._finish(self.buf, keep=fields.get(b"connection", b"").lower() != b"close")

    def _finish(self, body: bytes, keep: bool) -> None:
        assert self.fut is not None
        if not self.fut.done():
            self.fut.set_result((self.ttft, body, keep))


async def run(hosts: list[tuple[str, int]], path: str, streams: int, seconds: float, ramp: float, events: int,
              timeout: float, nonce: str, series_file: str = "") -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    ttfts: list[float] = []
    series: list[tuple[float, float]] = []  # (seconds since the start, TTFT): when the slow ones came
    counts = {"streams": 0, "ok": 0, "mismatched": 0, "errors": 0}
    first_error: list[str] = []
    start = loop.time() + 0.05
    end = start + ramp + seconds

    async def slot(i: int) -> None:
        host, port = hosts[i % len(hosts)]
        await asyncio.sleep(max(0.0, start + i * ramp / streams - loop.time()))
        conn: Conn | None = None
        n = 0
        while loop.time() < end:
            body = (b'{"model":"bench-model","stream":true,"messages":[{"role":"user","content":'
                    b'"sse %s slot %d stream %d"}]}' % (nonce.encode(), i, n))
            request = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                       b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
                       % (path.encode(), host.encode(), len(body), body))
            n += 1
            counts["streams"] += 1
            try:
                if conn is None or conn.lost:
                    _, conn = await asyncio.wait_for(loop.create_connection(Conn, host, port), timeout)
                assert conn is not None
                ttft, got, keep = await asyncio.wait_for(conn.start(request), timeout)
            except (TimeoutError, OSError, StreamError, ValueError) as exc:
                counts["errors"] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}")
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                conn = None
                await asyncio.sleep(0.05)
                continue
            ttfts.append(ttft)
            series.append((loop.time() - start, ttft))
            if got == sse_body(body, events):
                counts["ok"] += 1
            else:
                counts["mismatched"] += 1
                if not first_error:
                    first_error.append(f"mismatch: got {len(got)} bytes, {got[:120]!r}")
            if not keep and conn is not None and conn.transport is not None:
                conn.transport.close()
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    await asyncio.gather(*(slot(i) for i in range(streams)))
    if series_file:
        with open(series_file, "w") as fh:
            fh.writelines(f"{t:.4f} {v * 1000:.3f}\n" for t, v in series)
    return {**counts,
            "ttft_p50_ms": percentile(ttfts, 50) * 1000, "ttft_p99_ms": percentile(ttfts, 99) * 1000,
            "ttft_max_ms": max(ttfts, default=float("nan")) * 1000,
            "first_error": first_error[0] if first_error else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, action="append", required=True, help="repeat to spread the streams")
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--seconds", type=float, default=4.0, help="keep starting streams this long after the ramp")
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--events", type=int, default=EVENTS)
    p.add_argument("--timeout", type=float, default=15.0, help="per stream")
    p.add_argument("--nonce", default=str(os.getpid()))
    p.add_argument("--series", default="", metavar="FILE",
                   help="also write each stream's start (s) and TTFT (ms), a line each: do the slow ones "
                        "come together (a stall of the proxy) or spread out (its load)?")
    args = p.parse_args(argv)
    result = asyncio.run(run([(args.host, port) for port in args.port], args.path, args.streams, args.seconds,
                             args.ramp, args.events, args.timeout, args.nonce, args.series))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
