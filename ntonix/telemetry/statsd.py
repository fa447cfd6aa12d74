"""statsd output (UDP, the ``statsd`` package) when ``metrics.statsd_host`` is set.

Per request, in one datagram (a pipeline): ``<prefix>.requests``, ``<prefix>.status.<2xx..>``,
``<prefix>.cache.hit`` / ``.miss``, the timers ``<prefix>.latency``,
``<prefix>.backend.<address>.latency`` (time to the backend's headers) and, for streams,
``<prefix>.stream.ttft``. gunicorn's own statsd (``<prefix>.gunicorn.*``) is configured
separately in ``ntonix.server.settings``.

The client is made on first use, in the worker (after fork), and again after a reload that
changed the target. A host that does not resolve is logged once and statsd stays off until
the next reload; sending never fails a request (UDP, errors dropped by the client).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import statsd

from ntonix.config import MetricsConfig
from ntonix.core.figures import statsd_safe, status_class
from ntonix.core.record import RequestRecord

log = logging.getLogger("ntonix.metrics")


class StatsdSink:
    def __init__(self, cfg: MetricsConfig, client_factory: Callable[..., Any] = statsd.StatsClient) -> None:
        self._cfg = cfg
        self._factory = client_factory
        self._client: Any = None
        self._broken = False
        self._backend_names: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._cfg.statsd_host) and not self._broken

    def configure(self, cfg: MetricsConfig) -> None:
        """Reload: a changed target makes a new client on next use."""
        if (cfg.statsd_host, cfg.statsd_port, cfg.statsd_prefix) != (
                self._cfg.statsd_host, self._cfg.statsd_port, self._cfg.statsd_prefix):
            self.close()
            self._broken = False
        self._cfg = cfg

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _get(self) -> Any:
        if self._client is None and self.enabled:
            cfg = self._cfg
            try:
                self._client = self._factory(cfg.statsd_host, cfg.statsd_port, prefix=cfg.statsd_prefix or None,
                                                  ipv6=":" in cfg.statsd_host)
            except OSError as exc:
                self._broken = True
                log.warning("statsd.disabled", extra={"statsd_host": cfg.statsd_host, "reason": str(exc)})
        return self._client

    def _backend(self, address: str) -> str:
        name = self._backend_names.get(address)
        if name is None:
            name = self._backend_names[address] = f"backend.{statsd_safe(address)}.latency"
        return name

    def request(self, rec: RequestRecord) -> None:
        """The figures of one finished request."""
        client = self._get()
        if client is None:
            return
        pipe = client.pipeline()
        pipe.incr("requests")
        pipe.incr(f"status.{status_class(rec.status)}")
        if rec.cache == "HIT":
            pipe.incr("cache.hit")
        elif rec.cache == "MISS":
            pipe.incr("cache.miss")
        pipe.timing("latency", rec.latency_ms)
        if rec.backend and rec.backend_ok and rec.backend_latency_ms is not None:
            pipe.timing(self._backend(rec.backend), rec.backend_latency_ms)
        if rec.streamed and rec.ttft_ms is not None:
            pipe.timing("stream.ttft", rec.ttft_ms)
        usage = rec.usage
        if usage is not None:
            # tokens.<model>.<backend>.<kind>, or cache.tokens_saved.<model>.<kind> for a HIT
            model = statsd_safe(rec.model or "unknown")
            base = (f"cache.tokens_saved.{model}" if rec.cache == "HIT"
                    else f"tokens.{model}.{statsd_safe(rec.backend or 'none')}")
            for kind, n in (("prompt", usage.prompt), ("completion", usage.completion),
                            ("cached_prompt", usage.cached_prompt)):
                if n:
                    pipe.incr(f"{base}.{kind}", n)
        pipe.send()
