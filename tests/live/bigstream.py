"""A backend that streams large or endless Server-Sent Events answers, fast (issue #12 tests).

    python -m tests.live.bigstream --port 9001

``POST`` with a JSON body: ``X-Big-Bytes: N`` request header -> a chunked ``text/event-stream``
answer of :func:`event` 0, 1, 2, ... (about ``N`` bytes in all), then ``data: [DONE]``;
``X-Big-Bytes: -1`` streams until the client leaves. ``X-Big-TTFT: S`` waits S seconds before
the head, ``X-Big-Delay: S`` between events (default 0: as fast as the socket takes them). The events
depend only on the request body, so every backend call for one prompt gives the same bytes
and a client can check what reached it with :func:`expected`. ``GET /count`` -> how many
POSTs were answered; any other ``GET`` -> 200 (health probes).

Plain threads and ``sendall``: ~1-2 GB/s on loopback, far more than the gateway relays.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import threading
import time

EVENT_BYTES = 64 * 1024
DONE = b"data: [DONE]\n\n"


def event(seed: bytes, i: int) -> bytes:
    """Event ``i`` of the answer to a body hashing to ``seed``: ~64 KiB, all different."""
    tag = hashlib.blake2b(seed + i.to_bytes(8, "big"), digest_size=8).hexdigest().encode()
    filler = (tag * (EVENT_BYTES // 16 + 1))[: EVENT_BYTES - 40]
    return b'data: {"i":%d,"t":"' % i + filler + b'"}\n\n'


def seed_of(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def events_for(total: int) -> int:
    return max(1, -(-total // EVENT_BYTES))


def expected(body: bytes, total: int) -> tuple[int, str]:
    """(length, sha256) of the whole answer to ``body`` with ``X-Big-Bytes: total``."""
    h = hashlib.sha256()
    n = 0
    seed = seed_of(body)
    for i in range(events_for(total)):
        e = event(seed, i)
        h.update(e)
        n += len(e)
    h.update(DONE)
    return n + len(DONE), h.hexdigest()


class Server:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), backlog=256)
        self.count = 0
        self.lock = threading.Lock()

    def serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, path = lines[0].split(" ")[:2]
                    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                    length = int(headers.get("content-length", "0"))
                    while len(buf) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:length], buf[length:]
                    if method == "GET":
                        text = str(self.count).encode() if path == "/count" else b"{}"
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(text), text))
                        continue
                    with self.lock:
                        self.count += 1
                    self.stream(conn, body, int(headers.get("x-big-bytes", "1000000")),
                                float(headers.get("x-big-ttft", "0")), float(headers.get("x-big-delay", "0")))
                    return  # one answer per connection: Connection: close
        except OSError:
            return  # the client (the gateway) left

    def stream(self, conn: socket.socket, body: bytes, total: int, ttft: float, delay: float) -> None:
        if ttft:
            time.sleep(ttft)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        seed = seed_of(body)
        n = events_for(total) if total >= 0 else -1
        i = 0
        while n < 0 or i < n:
            e = event(seed, i)
            conn.sendall(b"%x\r\n%s\r\n" % (len(e), e))
            i += 1
            if delay:
                time.sleep(delay)
        conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    Server(args.port).serve()


if __name__ == "__main__":
    main()
