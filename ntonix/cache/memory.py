"""L1: a per-worker, byte-bounded LRU of cached responses on top of pylru.

Theory of operation
-------------------
pylru keeps a circular list of preallocated nodes and evicts by *count*. We want a bound in
*bytes*, so the node count is kept equal to the number of entries (never below 1, pylru's
minimum): a new key first grows the list by one node (``size(n + 1)``), a removed key
shrinks it again. With no spare nodes the list's tail is always the least recently used
entry, and ``size(n - 1)`` evicts exactly that entry through pylru's callback, which does
the byte accounting. All of it is public pylru API (``size()``, the callback); ``popitem()``
is not used because it removes the *most* recently used entry.

Time is passed in (``clock``, monotonic by default). An entry may arrive with some of its
life already spent (promoted from a lower tier): ``put(..., age_s=...)`` shortens its TTL.

Concurrency: no operation does I/O or yields to the gevent hub, so greenlets cannot
interleave inside one, and no lock is taken (gevent's, written in Python, was 1.5–3 % of a
cache hit in the profile, issue #14). The gateway uses it from one thread per process: the
gevent hub's; it is not for sharing between OS threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pylru

from ntonix.core.cache_entry import CachedResponse


class MemoryLRU:
    """Least-recently-used cache bounded by ``max_bytes`` of :attr:`CachedResponse.size`."""

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lru = self._new_lru()
        self._bytes = 0
        self._evictions = 0

    # -- reading ------------------------------------------------------------------------

    def get(self, key: str) -> CachedResponse | None:
        """The entry, now most recently used; ``None`` if absent or expired (then removed)."""
        if key not in self._lru:
            return None
        entry, expires = self._lru[key]
        if self._clock() >= expires:
            self._remove(key)
            return None
        return entry  # type: ignore[no-any-return]

    def __contains__(self, key: str) -> bool:
        return key in self._lru and self._clock() < self._lru.peek(key)[1]

    def keys(self) -> list[str]:
        """Keys from most to least recently used (expired ones included until touched)."""
        return list(self._lru.keys())

    @property
    def entries(self) -> int:
        return len(self._lru)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def evictions(self) -> int:
        return self._evictions

    # -- writing ------------------------------------------------------------------------

    def put(self, key: str, entry: CachedResponse, *, age_s: float = 0.0) -> int:
        """Store ``entry`` as most recently used; returns how many entries were evicted.

        An entry larger than ``max_bytes``, or whose remaining life (``ttl_s - age_s``) is
        not positive, is not stored (and an older entry under the same key is dropped).
        """
        size = entry.size
        life = self.ttl_s - max(age_s, 0.0)
        if key in self._lru:
            self._remove(key)
        if size > self.max_bytes or life <= 0:
            return 0
        evicted = 0
        while self._bytes + size > self.max_bytes and len(self._lru):
            self._evict_lru()
            evicted += 1
        if len(self._lru) >= self._lru.size():
            self._lru.size(len(self._lru) + 1)
        self._lru[key] = (entry, self._clock() + life)
        self._bytes += size
        self._evictions += evicted
        return evicted

    def delete(self, key: str) -> bool:
        if key not in self._lru:
            return False
        self._remove(key)
        return True

    def clear(self) -> int:
        """Drop everything; returns how many entries there were."""
        n = len(self._lru)
        self._lru = self._new_lru()
        self._bytes = 0
        return n

    # -- internals ----------------------------------------------------------

    def _new_lru(self) -> pylru.lrucache:
        return pylru.lrucache(1, callback=self._on_evict)

    def _on_evict(self, key: str, value: tuple[CachedResponse, float]) -> None:
        # Called by pylru for the tail entry when the list shrinks under it.
        self._bytes -= value[0].size

    def _evict_lru(self) -> None:
        n = len(self._lru)
        if n > 1:
            self._lru.size(n - 1)  # drops the tail node = the least recently used entry
        else:
            self._remove(next(iter(self._lru.keys())))

    def _remove(self, key: str) -> None:
        entry, _ = self._lru.peek(key)
        del self._lru[key]  # the emptied node moves to the tail ...
        self._bytes -= entry.size
        if self._lru.size() > 1:
            self._lru.size(self._lru.size() - 1)  # ... and is dropped, keeping no spare nodes

    def __repr__(self) -> str:
        return (
            f"<MemoryLRU entries={len(self._lru)} bytes={self._bytes}/{self.max_bytes} "
            f"ttl={self.ttl_s}s evictions={self._evictions}>"
        )
