"""Telemetry: counters per request, the /metrics figures, the access log.

Single-process version; cross-worker aggregation is added in its own module.
"""

from __future__ import annotations

import logging
import resource
import time
from typing import TYPE_CHECKING, Any

from ntonix.config import Config
from ntonix.record import RequestRecord

if TYPE_CHECKING:
    from ntonix.app import Runtime

access_log = logging.getLogger("ntonix.access")


class Telemetry:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.requests_total = 0
        self.requests_active = 0
        self.started_at = time.time()

    def started(self) -> None:
        self.requests_total += 1
        self.requests_active += 1

    def finished(self, rec: RequestRecord) -> None:
        self.requests_active -= 1
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("request.done", extra={
                "method": rec.method, "path": rec.path, "status": rec.status,
                "latency_ms": round(rec.latency_ms, 3),
                "ttft_ms": None if rec.ttft_ms is None else round(rec.ttft_ms, 3),
                "cache": rec.cache, "backend": rec.backend, "bytes_sent": rec.bytes_sent,
                "client": rec.client, "request_id": rec.request_id, "error": rec.error or None})

    def backend_result(self, address: str, ok: bool, latency_ms: float | None) -> None:
        return None

    def snapshot(self, rt: Runtime) -> dict[str, Any]:
        stats = rt.cache.stats() if rt.cache is not None else {"hits": 0, "misses": 0}
        return {
            "requests_total": self.requests_total,
            "requests_active": self.requests_active,
            "cache_hits": stats["hits"],
            "cache_misses": stats["misses"],
            "connections_active": 0,
            "uptime_s": round(time.time() - self.started_at, 3),
            "memory_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "backends": [
                {"address": b.address, "state": b.state, "requests": b.requests, "errors": b.errors,
                 "latency_avg_ms": round(b.latency_total_ms / b.requests, 3) if b.requests else 0.0}
                for b in rt.registry.all()],
        }

    def prometheus(self, rt: Runtime) -> bytes:
        snap = self.snapshot(rt)
        lines = [f"ntonix_{k} {v}" for k, v in snap.items() if isinstance(v, (int, float))]
        return ("\n".join(lines) + "\n").encode()
