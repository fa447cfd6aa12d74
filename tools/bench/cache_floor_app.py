#!/usr/bin/env python3
"""The cache floor for scripts/bench: the proxy floor plus the least the shipped defaults must do.

    python -m tools.bench.cache_floor_app --port 9102 --backend 127.0.0.1:9001 --dir /tmp/x [--workers 1]

The proxy floor (``tools.bench.proxy_floor_app``: the same gunicorn settings, one backend,
geventhttpclient), and for each POST, written straight and with the gateway's own libraries,
the work NTONIX as shipped promises for a request (docs/cache.md, docs/api.md):

- the key: the body parsed (orjson) and written back canonically (sorted keys), the
  credential's partition (blake2b of ``Authorization``), one xxh3_128 over them and the path;
- this worker's memory tier (pylru, a bound on entries), then the host's shared tier: one LMDB
  read transaction (the gateway's own environment options);
- coalescing of identical requests in flight, within this worker (a dict of events; the
  gateway's coalescing is host-wide, through shared memory);
- on a miss, after the backend's answer: the memory tier, and the shared tier: the answer and
  its place in a least-recently-used index, the answers of one turn of the event loop in one
  LMDB write transaction, as the gateway does (the gateway also keeps the tier's byte bound,
  evicting, and its gateway-wide counters: more work, not counted here);
- one JSON access line (orjson, the gateway's fields, the time formatted once a second),
  buffered and written every 64 KiB or second.

No routing, health, breaker, retries, metrics, request ids, disconnect watch, streaming or
TTL. What NTONIX as shipped costs above this app is what its own code costs for the defaults
beyond the least the stack needs to do the same; what this app costs above the proxy floor is
the stack's own cost of those defaults (issue #14).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
import time
from typing import Any

_STATUS = {200: "200 OK", 404: "404 Not Found", 500: "500 Internal Server Error", 502: "502 Bad Gateway"}
_FLUSH_BYTES = 64 * 1024


def make_app(host: str, port: int, directory: str) -> Any:
    import gevent.event
    import lmdb
    import orjson
    import pylru
    import xxhash
    from geventhttpclient import HTTPClient

    client = HTTPClient(host, port, concurrency=1024, connection_timeout=5, network_timeout=30)
    memory = pylru.lrucache(4096)
    flights: dict[str, gevent.event.AsyncResult] = {}
    env: list[Any] = []  # opened in the worker (after the fork)
    log: list[bytes] = []
    state = {"size": 0, "flushed": time.monotonic()}
    stamps = [0]  # the least-recently-used index's last stamp
    pid = os.getpid()
    queued: dict[str, bytes] = {}
    stamp = {"second": -1, "text": ""}

    def store_env() -> tuple[Any, Any, Any]:
        if not env:
            e = lmdb.open(directory, map_size=1 << 30, max_dbs=4, sync=False, metasync=False, lock=True,
                          readahead=False, mode=0o600, max_spare_txns=0)
            env.extend((e, e.open_db(b"data"), e.open_db(b"lru")))
        return env[0], env[1], env[2]

    def write_queued() -> None:
        # The answers of one turn of the event loop in one write transaction.
        e, data_db, lru_db = store_env()
        rows = list(queued.items())
        queued.clear()
        with e.begin(write=True) as txn:
            for key, data in rows:
                stamps[0] += 1
                txn.put(key.encode(), data, db=data_db)
                txn.put(stamps[0].to_bytes(8, "big") + key.encode(), b"", db=lru_db)

    def shared_get(key: str) -> bytes | None:
        # In a function of its own: py-lmdb keeps a read transaction's reader slot until the
        # Transaction object goes, and the 126 slots would run out while requests wait.
        e, data_db, _ = store_env()
        with e.begin() as txn:
            raw: bytes | None = txn.get(key.encode(), db=data_db)
        return raw

    def access(method: str, path: str, status: int, started: float, cache: str, size: int, client_ip: str) -> None:
        second, ms = divmod(round(time.time() * 1000), 1000)
        if second != stamp["second"]:
            stamp["second"], stamp["text"] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = orjson.dumps({
            "timestamp": f"{stamp['text']}.{ms:03d}Z", "level": "info",
            "component": "ntonix.access", "pid": pid, "message": "request.done", "method": method, "path": path,
            "status": status, "latency_ms": round((time.monotonic() - started) * 1000, 3), "ttft_ms": None,
            "cache": cache, "backend": f"{host}:{port}", "bytes_sent": size, "client": client_ip,
            "request_id": None, "error": None, "model": None, "prompt_tokens": None, "completion_tokens": None,
            "cached_tokens": None})
        log.append(line)
        state["size"] += len(line) + 1
        mono = time.monotonic()
        if state["size"] >= _FLUSH_BYTES or mono - state["flushed"] >= 1.0:
            os.write(2, b"\n".join(log) + b"\n")
            log.clear()
            state["size"], state["flushed"] = 0, mono

    def flush_log() -> None:
        if log:
            os.write(2, b"\n".join(log) + b"\n")
            log.clear()

    atexit.register(flush_log)

    def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        started = time.monotonic()
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO") or "/"
        body = environ["wsgi.input"].read()
        cache = "MISS"
        parsed = orjson.loads(body) if method == "POST" and body else None
        if parsed is None:
            key = ""
        else:
            auth = environ.get("HTTP_AUTHORIZATION")
            partition = hashlib.blake2b(auth.encode(), digest_size=16).digest() if auth else b""
            key = xxhash.xxh3_128_hexdigest(b"".join((partition, path.encode(), orjson.dumps(
                parsed, option=orjson.OPT_SORT_KEYS))))
        found: tuple[int, str, bytes] | None = memory.get(key) if key else None
        if key and found is None:
            raw = shared_get(key)
            if raw is not None:
                found = (200, "application/json", bytes(raw))
                memory[key] = found
        if found is not None:
            code, kind, data = found
            cache = "HIT"
        elif key and key in flights:
            code, kind, data = flights[key].get()
            cache = "HIT"
        else:
            flight = gevent.event.AsyncResult() if key else None
            if key:
                flights[key] = flight
            try:
                headers = {"Content-Type": environ.get("CONTENT_TYPE") or "application/json"}
                with client.request(method, path, body=body, headers=headers) as resp:
                    data = resp.read()
                    code = resp.status_code
                    kind = str(resp.get("content-type") or "application/octet-stream")
                if key and code == 200:
                    memory[key] = (code, kind, data)
                    queued[key] = data
                    if len(queued) == 1:
                        gevent.get_hub().loop.run_callback(write_queued)
            except BaseException as exc:
                if flight is not None:
                    del flights[key]
                    flight.set_exception(exc)
                raise
            if flight is not None:
                del flights[key]
                flight.set((code, kind, data))
        start_response(_STATUS.get(code, f"{code} Other"), [("Content-Type", kind), ("Content-Length", str(len(data))),
                                                             ("X-Cache", cache)])
        access(method, path, code, started, cache, len(data), environ.get("REMOTE_ADDR", ""))
        return [data]

    return application


def main(argv: list[str] | None = None) -> int:
    from tools.bench.floor_app import parser, serve

    p = parser(__doc__, backend=True)
    p.add_argument("--dir", required=True, help="the shared tier's LMDB directory")
    args = p.parse_args(argv)
    host, _, port = args.backend.rpartition(":")

    serve(args.port, args.workers, args.worker_connections, "bench-cache-floor",
          lambda: make_app(host, int(port), args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
