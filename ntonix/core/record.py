"""What one request did, filled in along the way and handed to telemetry once at its end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ntonix.core.usage import Usage


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    request_id: str
    client: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    cache: str = ""  # HIT, MISS, BYPASS, or "" for the gateway's own endpoints
    backend: str = ""
    backend_ok: bool | None = None  # None: no backend answered this request
    backend_latency_ms: float | None = None  # time to the backend's response headers
    ttft_ms: float | None = None  # streams: time to the first body byte sent
    bytes_sent: int = 0
    streamed: bool = False
    model: str = ""  # the JSON ``model`` the request asked for
    usage: Usage | None = None  # tokens of the answer (a HIT's: what the cache saved the backends)
    error: str = ""
    latency_ms: float = 0.0
    finished: bool = False

    def finish(self) -> bool:
        """Stamp the total latency once; False when it was already finished."""
        if self.finished:
            return False
        self.finished = True
        self.latency_ms = (time.perf_counter() - self.started) * 1000.0
        return True
