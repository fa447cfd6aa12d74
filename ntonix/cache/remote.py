"""L3 (optional): a Redis shared by several gateways.

Redis is a convenience, never a dependency of the request path. Every call has short socket
timeouts and no client-side retries (redis-py retries 10 times with back-off by default);
any failure is a miss or a no-op. After a failure the store stays silent for ``backoff_s``
(no connection attempt at all), so a dead Redis costs nothing per request, and the
outage is logged once when it starts and once when it ends.

The client (with its connection pool) is created lazily in the process that uses it and
again after ``fork()``: sockets must not be shared between workers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ntonix.core.cache_entry import CachedResponse, DecodeError
from ntonix.pid import Process

log = logging.getLogger("ntonix.cache")

PREFIX = "ntonix:cache:"
_PURGE_BATCH = 500


class RedisStore:
    """Cache entries in Redis under ``PREFIX + key``, expiring with ``SET PX``."""

    def __init__(
        self,
        url: str,
        ttl_s: float,
        timeout_s: float = 0.05,
        *,
        backoff_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        prefix: str = PREFIX,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.prefix = prefix
        self._clock = clock
        self._wall = wall_clock
        self._client: redis.Redis | None = None
        self._pid = -1
        self._down_until = 0.0
        self._outage = False

    @property
    def available(self) -> bool:
        """False while backing off after a failure."""
        return self._clock() >= self._down_until

    @property
    def steady(self) -> bool:
        """No outage under way. During one, a write that would go with another round trip
        (:meth:`set_args`) comes here instead, so that this store sees Redis back (and says so)."""
        return not self._outage and self.available

    def get(self, key: str) -> CachedResponse | None:
        client = self._ready()
        if client is None:
            return None
        try:
            raw = client.get(self.prefix + key)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._succeeded()
        return self.decode(raw) if isinstance(raw, bytes) else None

    def decode(self, raw: bytes) -> CachedResponse | None:
        """The entry stored as ``raw`` (read here or in the same round trip as the cluster's
        join, ntonix/cluster/flights.py ``join_or_hit``); ``None`` if unreadable or expired."""
        try:
            entry = CachedResponse.decode(raw)
        except DecodeError:
            return None
        if entry.created + self.ttl_s <= self._wall():
            return None
        return entry

    def set_args(self, key: str, entry: CachedResponse) -> tuple[str, bytes, int] | None:
        """The Redis key, value and lifetime in ms (``SET k v PX ms``) that store ``entry``, or
        ``None`` when it has expired already. For a caller that sends the ``SET`` itself in a
        round trip it makes anyway (ntonix/cluster/flights.py ``Leader.store_at_end``)."""
        remaining_ms = math.floor((entry.created + self.ttl_s - self._wall()) * 1000)
        if remaining_ms <= 0:
            return None
        return self.prefix + key, entry.encode(), remaining_ms

    def put(self, key: str, entry: CachedResponse) -> bool:
        """Store with the entry's remaining lifetime; False if not stored (expired, Redis down)."""
        args = self.set_args(key, entry)
        if args is None:
            return False
        client = self._ready()
        if client is None:
            return False
        try:
            client.set(args[0], args[1], px=args[2])
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._succeeded()
        return True

    def delete(self, key: str) -> bool:
        client = self._ready()
        if client is None:
            return False
        try:
            n = client.delete(self.prefix + key)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._succeeded()
        return bool(n)

    def purge(self) -> int:
        """Delete every key under the prefix (SCAN + UNLINK in batches); returns how many."""
        client = self._ready()
        if client is None:
            return 0
        removed = 0
        try:
            batch: list[bytes] = []
            for name in client.scan_iter(match=_glob_escape(self.prefix) + "*", count=_PURGE_BATCH):
                batch.append(name)
                if len(batch) >= _PURGE_BATCH:
                    removed += int(client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(client.unlink(*batch))
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return removed
        self._succeeded()
        return removed

    def close(self) -> None:
        if self._client is not None and self._pid == Process.pid:
            self._client.close()
        self._client = None

    # -- internals ----------------------------------------------------------------------

    def _ready(self) -> redis.Redis | None:
        if self._clock() < self._down_until:
            return None
        if self._client is None or self._pid != Process.pid:
            try:
                self._client = redis.Redis.from_url(
                    self.url,
                    socket_timeout=self.timeout_s,
                    socket_connect_timeout=self.timeout_s,
                    retry=Retry(NoBackoff(), 0),
                    health_check_interval=0,
                )
            except (redis.RedisError, ValueError) as exc:
                self._failed(exc)
                return None
            self._pid = Process.pid
        return self._client

    def _failed(self, exc: BaseException) -> None:
        self._down_until = self._clock() + self.backoff_s
        drop_idle(self._client)  # each would fail once more after a Redis restart
        if not self._outage:
            self._outage = True
            log.warning(
                "cache.redis_unavailable",
                extra={"url": _redacted(self.url), "error": f"{type(exc).__name__}: {exc}",
                       "backoff_s": self.backoff_s},
            )

    def _succeeded(self) -> None:
        if self._outage:
            self._outage = False
            log.info("cache.redis_recovered", extra={"url": _redacted(self.url)})

    def __repr__(self) -> str:
        state = "backing-off" if not self.available else ("outage" if self._outage else "ok")
        return f"<RedisStore {_redacted(self.url)} {state} ttl={self.ttl_s}s>"


def drop_idle(client: redis.Redis | None) -> None:
    """A redis-py client's idle connections closed, after a failure: a restarted Redis closed
    them all, and each would fail once more when next taken. Those in use are left to their
    callers. (Also the cluster's clients, ntonix/cluster/.)"""
    if client is not None:
        try:
            client.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # noqa: BLE001 - closing sockets: nothing to report
            pass


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _redacted(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in creds else user}@{host}"
