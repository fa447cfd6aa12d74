"""The bench's cache floor (tools/bench/cache_floor_app.py) does the work it is measured for:
a miss goes to the backend and is stored in both tiers, the same request is then a hit (also
from a second worker, through the shared tier), another credential is a partition of its own,
and every request leaves one access line."""

from __future__ import annotations

import http.client
import json
import sys
from pathlib import Path

from tools.procs import Child, free_port, port_open, wait_until

CHAT = "/v1/chat/completions"


def post(port: int, body: bytes, auth: str | None = None) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
        conn.request("POST", CHAT, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("X-Cache") or "", resp.read()
    finally:
        conn.close()


def test_the_cache_floor_misses_then_hits_by_partition_and_logs_each_request(tmp_path: Path) -> None:
    backend_port, floor_port = free_port(), free_port()
    backend = Child("backend", [sys.executable, "-m", "tools.bench.backend", "--port", str(backend_port)],
                    tmp_path / "backend.log")
    floor = Child("cache-floor", [sys.executable, "-m", "tools.bench.cache_floor_app", "--port", str(floor_port),
                                  "--backend", f"127.0.0.1:{backend_port}", "--dir", str(tmp_path / "l2"),
                                  "--workers", "2"], tmp_path / "floor.log")
    try:
        wait_until("the backend", lambda: port_open(backend_port), backend, timeout=20)
        # A 200, not an open port: a connection made before the workers boot kept the stock
        # gevent worker from stopping for its whole graceful timeout.
        wait_until("the cache floor", lambda: post(floor_port, b"{}")[0] == 200, floor, timeout=20)
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        status, cache, first = post(floor_port, body)
        assert (status, cache) == (200, "MISS")
        assert json.loads(first)
        # The same prompt with its keys in another order: the canonical key makes it a hit, in
        # whichever worker answers (the other one finds it in the shared tier).
        same = b'{"messages": [{"content": "hi", "role": "user"}], "model": "m"}'
        for _ in range(6):
            assert post(floor_port, same) == (200, "HIT", first)
        assert post(floor_port, body, auth="Bearer other")[:2] == (200, "MISS")
        assert post(floor_port, body, auth="Bearer other")[:2] == (200, "HIT")

        def logged() -> list[dict[str, object]] | None:
            # A worker writes its buffered lines with the first request a second after its last
            # write; each of these lands in either worker.
            post(floor_port, same)
            lines = [json.loads(x) for x in (tmp_path / "floor.log").read_text().splitlines() if x.startswith("{")]
            misses = [x for x in lines if x["cache"] == "MISS"]
            return lines if len(misses) == 3 and len(lines) >= 10 else None  # with the readiness probe's

        lines = wait_until("the access lines of both workers", logged, floor, timeout=20, every=0.3)
        assert all(x["message"] == "request.done" and x["status"] == 200 for x in lines)
    finally:
        floor.stop(timeout=5)
        backend.stop()
