#!/usr/bin/env python3
"""A client that reads a large streamed answer slower than it is produced (scripts/bench, scenario 5).

    python -m tools.bench.slow_reader --port 8080 [--mb 200] [--block 65536] [--every 0.002]

GETs ``/big?mb=N`` and takes ``--block`` bytes off the socket every ``--every`` seconds
(64 KiB / 2 ms = 32 MiB/s; the bench backend writes as fast as the socket takes it), so a proxy
in between must apply back-pressure instead of buffering the answer. Decodes the chunked body
on the fly, keeps none of it, and prints one JSON object: ``{"ok", "body_bytes", "seconds",
"error"}`` (ok: the whole N MiB arrived and the body ended properly).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def read_slowly(host: str, port: int, mb: float, block: int, every: float, timeout: float) -> dict[str, object]:
    want = int(mb * 1024 * 1024) // 65536 * 65536
    t0 = time.monotonic()
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.sendall(b"GET /big?mb=%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                 % (str(mb).encode(), host.encode()))
    buf = bytearray()
    got = 0
    ended = False
    chunked = None
    length = -1
    head_done = False
    pending = 0  # bytes of the current chunk still to come (chunked) or of the body (length)
    try:
        while True:
            # one slow read: up to `block` bytes, then wait
            need = block
            while need > 0:
                data = sock.recv(min(need, 65536))
                if not data:
                    break
                need -= len(data)
                buf += data
            else:
                data = b"x"
            # decode as much as possible
            while True:
                if not head_done:
                    i = buf.find(b"\r\n\r\n")
                    if i < 0:
                        break
                    head = bytes(buf[:i]).lower()
                    del buf[:i + 4]
                    head_done = True
                    if not head.startswith(b"http/1.1 200"):
                        return {"ok": False, "body_bytes": 0, "seconds": time.monotonic() - t0,
                                "error": head.split(b"\r\n")[0].decode()}
                    chunked = b"transfer-encoding: chunked" in head
                    if not chunked:
                        k = head.find(b"content-length:")
                        length = int(head[k + 15:].split(b"\r\n")[0]) if k >= 0 else -1
                        pending = length
                    continue
                if chunked:
                    if pending > 0:
                        take = min(pending, len(buf))
                        if take == 0:
                            break
                        del buf[:take]
                        got += take
                        pending -= take
                        if pending == 0:
                            pending = -2  # then CRLF
                        continue
                    if pending == -2:
                        if len(buf) < 2:
                            break
                        del buf[:2]
                        pending = 0
                        continue
                    i = buf.find(b"\r\n")
                    if i < 0:
                        break
                    size = int(bytes(buf[:i]).split(b";")[0], 16)
                    del buf[:i + 2]
                    if size == 0:
                        ended = True
                        break
                    pending = size
                else:
                    got += len(buf)
                    del buf[:]
                    if length >= 0 and got >= length:
                        ended = True
                    break
            if ended or not data:
                break
            time.sleep(every)
    except OSError as exc:
        return {"ok": False, "body_bytes": got, "seconds": time.monotonic() - t0, "error": repr(exc)}
    finally:
        sock.close()
    if not ended and length < 0 and not chunked:
        ended = True  # delimited by close
    ok = ended and got == want
    return {"ok": ok, "body_bytes": got, "seconds": time.monotonic() - t0,
            "error": "" if ok else f"ended={ended} got {got} of {want} bytes"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mb", type=float, default=200)
    p.add_argument("--block", type=int, default=64 * 1024)
    p.add_argument("--every", type=float, default=0.002)
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    print(json.dumps(read_slowly(args.host, args.port, args.mb, args.block, args.every, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
