"""The WSGI application of one worker: the gateway's own endpoints, everything else proxied.

``Gateway`` answers ``/health``, ``/metrics``, ``/cache/stats`` and ``POST /cache/purge``
itself and hands every other request to the ``Proxy``; errors the gateway raises are rendered
here, in one place. ``ntonix.app.build_app`` builds it.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from ntonix.core.headers import in_networks, request_id_from
from ntonix.core.record import RequestRecord
from ntonix.errors import Forbidden, NtonixError, render_error, status_line
from ntonix.gateway.bodies import Body
from ntonix.gateway.host import Host, PlainHost
from ntonix.gateway.proxy import CachedHit, Proxy

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from ntonix.gateway.runtime import Runtime

log = logging.getLogger("ntonix.gateway")


def prefers_text(accept: str) -> bool:
    """Does this ``Accept`` (lower case) ask for ``text/plain`` over ``application/json``? By
    their q values; at equal ones, the first listed. Neither listed: no (JSON is the default)."""
    rank: dict[str, tuple[float, int]] = {}
    for i, item in enumerate(accept.split(",")):
        media, *params = (part.strip() for part in item.split(";"))
        if media in ("text/plain", "application/json") and media not in rank:
            q = 1.0
            for param in params:
                name, _, val = param.partition("=")
                if name.strip() == "q":
                    try:
                        q = float(val)
                    except ValueError:
                        q = 0.0
            rank[media] = (q, -i)
    text = rank.get("text/plain")
    return text is not None and text[0] > 0 and text > rank.get("application/json", (-1.0, 0))


class Gateway:
    """The WSGI application: the gateway's own endpoints, everything else proxied."""

    def __init__(self, runtime: Runtime, host: Host | None = None) -> None:
        """``host``: what the server hosting us can do (``ntonix.gateway.host``)."""
        self.rt = runtime
        self.host: Host = host if host is not None else PlainHost()
        self.proxy = Proxy(runtime, self.finished, self.host)

    def finished(self, rec: RequestRecord) -> None:
        """A request is over: its figures, statsd and access-log line (once)."""
        if rec.finish():
            self.rt.telemetry.finished(rec)

    def cached_hit(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                   client: str) -> CachedHit | None:
        """The server's way in before it builds a WSGI environ: a cache hit it can write
        itself (then it calls :meth:`finished` with the hit's record), or ``None`` for the
        WSGI call as usual (``Proxy.cached_hit``)."""
        return self.proxy.cached_hit(method, path, headers, body, client)

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
            if err.closes_connection:  # an unread request body follows
                self.host.close_after(start_response)
            rec.status = err.status
            rec.error = err.message
            rec.bytes_sent = len(body)
            start_response(status, headers)
            return Body([body], lambda: self.finished(rec))
        except BaseException:
            self.finished(rec)
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
        return Body([body], lambda: self.finished(rec))

    def _allowed(self, environ: WSGIEnvironment) -> None:
        if self.rt.metrics_allow and not in_networks(environ.get("REMOTE_ADDR", ""), self.rt.metrics_allow):
            raise Forbidden("this endpoint is not available from your address")

    def _health(self, environ: WSGIEnvironment) -> tuple[str, str, bytes]:
        registry = self.rt.registry
        healthy, total = registry.healthy_count(), len(registry.backends)
        ok = healthy >= 1
        body = orjson.dumps({"status": "ok" if ok else "unavailable",
                             "backends": {"healthy": healthy, "total": total}})
        return status_line(200 if ok else 503), "application/json", body

    def _metrics(self, environ: WSGIEnvironment) -> tuple[str, str, bytes]:
        self._allowed(environ)
        fmt = dict(parse_qsl(environ.get("QUERY_STRING", ""))).get("format", "").lower()
        accept = environ.get("HTTP_ACCEPT", "").lower()
        backends = self.rt.backend_states()
        load = self.rt.backend_load()
        if fmt == "prometheus" or (not fmt and prefers_text(accept)):
            return (status_line(200), "text/plain; version=0.0.4; charset=utf-8",
                    self.rt.telemetry.prometheus(backends, load))
        return status_line(200), "application/json", orjson.dumps(self.rt.telemetry.snapshot(backends, load))

    def _cache_stats(self, environ: WSGIEnvironment) -> tuple[str, str, bytes]:
        self._allowed(environ)
        return status_line(200), "application/json", orjson.dumps(self.cache_stats())

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
        return status_line(200), "application/json", orjson.dumps({"purged": removed})


_OWN_GET = {"/health": Gateway._health, "/metrics": Gateway._metrics, "/cache/stats": Gateway._cache_stats}
