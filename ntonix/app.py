"""Composition root: builds the gateway of one worker process from a ``Config``.

``build_app(config)`` wires the registry of backends, their pools, the cache tiers, the
coalescer and telemetry into a ``Gateway``, the WSGI callable. Only the entry points
(``ntonix.wsgi``, ``ntonix.worker``) import this module (checked by tests/unit/test_layering.py).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from ntonix import transport
from ntonix.backends import Backend, Registry
from ntonix.bodies import Body
from ntonix.cache import ResponseCache, build_cache
from ntonix.coalesce import Coalescer
from ntonix.config import Config
from ntonix.errors import Forbidden, NtonixError, render_error
from ntonix.headers import in_networks, parse_networks, request_id_from
from ntonix.health import HealthState
from ntonix.proxy import Proxy
from ntonix.record import RequestRecord
from ntonix.runstate import run_dir
from ntonix.telemetry import Telemetry
from ntonix.transitions import Transition

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("ntonix.gateway")


class Runtime:
    """Everything a request needs, swapped in place on reload."""

    def __init__(self, config: Config, telemetry: Telemetry) -> None:
        self.config = config
        self.telemetry = telemetry
        self.registry = Registry(config.backends, config.health, config.circuit_breaker)
        for backend in self.registry.all():
            self._attach_pool(backend)
        self.trusted_proxies = parse_networks(config.proxy.trusted_proxies)
        self.metrics_allow = parse_networks(config.metrics.allow)
        cache_dir = config.cache.dir or os.path.join(run_dir(), "cache")
        self.cache: ResponseCache | None = build_cache(
            enabled=config.cache.enabled, max_bytes=int(config.cache.max_size_mb * 1024 * 1024),
            ttl_s=config.cache.ttl_seconds, directory=cache_dir, redis_url=config.cache.redis_url or None,
            memory_max_bytes=int(min(config.cache.memory_max_mb, config.cache.max_size_mb / 4) * 1024 * 1024))
        self.coalescer: Coalescer | None = (
            Coalescer(cache_dir, stale_after_s=max(10.0, config.proxy.read_timeout_s),
                      max_bytes=config.cache.max_entry_bytes)
            if config.cache.enabled else None)
        self.started = time.time()

    def _attach_pool(self, backend: Backend) -> None:
        cfg = self.config
        backend.pool = transport.Pool(
            backend.config.host, backend.config.port, size=cfg.pool.size, max_size=cfg.pool.max_size,
            idle_timeout_s=cfg.pool.idle_timeout_s, connect_timeout_s=cfg.proxy.connect_timeout_s)

    # ------------------------------------------------------------------ outcomes
    def log_change(self, backend: Backend, kind: str, change: Transition[Any] | None) -> None:
        if change is None:
            return
        old = getattr(change.old, "value", change.old)
        new = getattr(change.new, "value", change.new)
        level = logging.WARNING if new in ("unhealthy", "open") else logging.INFO
        log.log(level, f"backend.{kind}_changed", extra={
            "backend": backend.address, "old_state": old, "new_state": new, "reason": change.reason})

    def backend_failed(self, backend: Backend, reason: str) -> None:
        backend.errors += 1
        self.log_change(backend, "breaker", backend.breaker.record_failure(reason))
        self.telemetry.backend_result(backend.address, ok=False, latency_ms=None)

    def backend_succeeded(self, backend: Backend, latency_ms: float) -> None:
        backend.latency_total_ms += latency_ms
        self.log_change(backend, "breaker", backend.breaker.record_success())
        self.telemetry.backend_result(backend.address, ok=True, latency_ms=latency_ms)

    def probe_result(self, backend: Backend, ok: bool, reason: str) -> None:
        change = backend.health.record_probe(ok, reason)
        self.log_change(backend, "health", change)
        if change is not None and change.new is HealthState.HEALTHY:
            # Probes saw it come back: let traffic in now rather than after the breaker's cooldown.
            self.log_change(backend, "breaker", backend.breaker.recovered("active health checks passed"))

    # ------------------------------------------------------------------ reload
    def reload(self, config: Config) -> None:
        """Apply a new configuration in place: backends added, kept or drained."""
        added, removed, changes = self.registry.reload(config.backends, config.health, config.circuit_breaker)
        self.config = config
        self.telemetry.reload(config)
        for backend in added:
            self._attach_pool(backend)
        for change in changes:
            backend = next(b for b in self.registry.all() if b.address == change.backend)
            self.log_change(backend, change.kind, change.transition)
        self.trusted_proxies = parse_networks(config.proxy.trusted_proxies)
        self.metrics_allow = parse_networks(config.metrics.allow)
        log.info("config.reloaded", extra={
            "backends": [b.address for b in self.registry.backends.values()],
            "added": [b.address for b in added], "removed": [b.address for b in removed]})
        self.reap_drained()

    def reap_drained(self) -> None:
        for backend in self.registry.finished_draining():
            if backend.pool is not None:
                backend.pool.close()
            log.info("backend.drained", extra={"backend": backend.address})



class Gateway:
    """The WSGI application: the gateway's own endpoints, everything else proxied."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.proxy = Proxy(runtime, self._finished)

    def _finished(self, rec: RequestRecord) -> None:
        if rec.finish():
            self.rt.telemetry.finished(rec)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        rid = request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        rec = RequestRecord(method, path, rid, environ.get("REMOTE_ADDR", ""))
        self.rt.telemetry.started()
        try:
            if method == "GET" and path in _OWN_GET:
                return self._own(_OWN_GET[path], environ, start_response, rec)
            if method == "POST" and path == "/cache/purge":
                return self._own(Gateway._purge, environ, start_response, rec)
            return self.proxy.handle(environ, start_response, rec)  # type: ignore[no-any-return]
        except NtonixError as err:
            status, headers, body = render_error(err)
            headers.append(("X-Request-ID", rid))
            if rec.cache or not self._is_own(method, path):
                headers.append(("X-Cache", rec.cache or "BYPASS"))
            if environ.get("ntonix.must_close"):
                # An unread request body follows: close the connection after this answer.
                # gunicorn's start_response is bound to its Response, which can force that.
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:
                    force_close()
            rec.status = err.status
            rec.error = err.message
            rec.bytes_sent = len(body)
            start_response(status, headers)
            return Body([body], lambda: self._finished(rec))
        except BaseException:
            self._finished(rec)
            raise

    @staticmethod
    def _is_own(method: str, path: str) -> bool:
        return (method == "GET" and path in _OWN_GET) or (method == "POST" and path == "/cache/purge")

    def _own(self, handler: Any, environ: WSGIEnvironment, start_response: StartResponse,
             rec: RequestRecord) -> Body:
        status, content_type, body = handler(self, environ)
        rec.status = int(status.split()[0])
        rec.bytes_sent = len(body)
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store"), ("X-Request-ID", rec.request_id)])
        return Body([body], lambda: self._finished(rec))

    def _allowed(self, environ: WSGIEnvironment) -> None:
        if self.rt.metrics_allow and not in_networks(environ.get("REMOTE_ADDR", ""), self.rt.metrics_allow):
            raise Forbidden("this endpoint is not available from your address")

    def _health(self, environ: WSGIEnvironment) -> tuple[str, str, bytes]:
        registry = self.rt.registry
        healthy, total = registry.healthy_count(), len(registry.backends)
        ok = healthy >= 1
        body = orjson.dumps({"status": "ok" if ok else "unavailable",
                             "backends": {"healthy": healthy, "total": total}})
        return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body

    def _metrics(self, environ: WSGIEnvironment) -> tuple[str, str, bytes]:
        self._allowed(environ)
        query = environ.get("QUERY_STRING", "")
        accept = environ.get("HTTP_ACCEPT", "")
        if "format=prometheus" in query or ("text/plain" in accept and "format=json" not in query):
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", self.rt.telemetry.prometheus(self.rt)
        return "200 OK", "application/json", orjson.dumps(self.rt.telemetry.snapshot(self.rt))

    def _cache_stats(self, environ: WSGIEnvironment) -> tuple[str, str, bytes]:
        self._allowed(environ)
        return "200 OK", "application/json", orjson.dumps(self.cache_stats())

    def cache_stats(self) -> dict[str, Any]:
        cache = self.rt.cache
        if cache is None:
            return {"enabled": False, "entries": 0, "size_bytes": 0, "max_size_bytes": 0, "hits": 0,
                    "misses": 0, "hit_rate": 0.0, "evictions": 0}
        stats = cache.stats()
        # Hits and misses as clients saw them (X-Cache), summed over all workers by telemetry.
        hits, misses = self.rt.telemetry.cache_counts()
        stats.update(hits=hits, misses=misses, hit_rate=round(hits / (hits + misses), 4) if hits + misses else 0.0)
        return stats

    def _purge(self, environ: WSGIEnvironment) -> tuple[str, str, bytes]:
        token = self.rt.config.cache.purge_token
        if not token:
            raise Forbidden("cache purge is disabled: set cache.purge_token to enable it")
        given = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise Forbidden("cache purge needs 'Authorization: Bearer <cache.purge_token>'")
        removed = self.rt.cache.purge() if self.rt.cache is not None else 0
        log.info("cache.purged", extra={"entries": removed})
        return "200 OK", "application/json", orjson.dumps({"purged": removed})


_OWN_GET = {"/health": Gateway._health, "/metrics": Gateway._metrics, "/cache/stats": Gateway._cache_stats}


def build_app(config: Config, telemetry: Telemetry | None = None) -> Gateway:
    return Gateway(Runtime(config, telemetry or Telemetry(config)))
