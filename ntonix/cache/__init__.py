"""The response cache the proxy talks to: three tiers behind one small facade.

* L1 :class:`MemoryLRU` — per worker process, fastest, a working-set subset.
* L2 :class:`LmdbStore` — one per host, shared by all workers, survives worker restarts.
  It is the source of truth for ``/cache/stats`` (entries, bytes, hits, misses, evictions
  are counted there, so any worker answers for the whole gateway).
* L3 :class:`RedisStore` — optional, shared by several gateways; failures are misses.

``lookup`` reads L1, then L2, then L3, and copies a lower-tier hit into the tiers above it
with its remaining lifetime (TTL counts from the answer's ``created``, in every tier).
``store`` writes every tier. L2 decides what is evicted for the whole host (exact LRU, see
``ntonix.cache.shared``): an L1 hit is reported to L2 (a ~1 µs read; a write only when the entry
was not the most recently used already) and dropped when L2 no longer holds it. ``purge``
empties L2 (and L3) and bumps L2's purge *generation*; each worker compares it on every
lookup (a read of shared memory, no transaction) and drops its L1 when it changed, so no
worker serves an entry purged by another.

A failing L2 (disk full, permissions) degrades to a miss with one warning per minute; it
never fails a request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ntonix.cache.lmdb_env import StoreError, explain
from ntonix.cache.memory import MemoryLRU
from ntonix.cache.remote import RedisStore
from ntonix.cache.shared import LmdbStore
from ntonix.core.cache_entry import CachedResponse

log = logging.getLogger("ntonix.cache")

MiB = 1 << 20
_WARN_EVERY_S = 60.0
T = TypeVar("T")


class ResponseCache:
    """Facade over the tiers; every tier is optional. ``enabled=False`` turns it all off."""

    def __init__(
        self,
        memory: MemoryLRU | None,
        shared: LmdbStore | None,
        remote: RedisStore | None,
        enabled: bool,
        *,
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.memory = memory
        self.shared = shared
        self.remote = remote
        self.enabled = enabled
        self.max_bytes = max_bytes if max_bytes is not None else _configured_max(memory, shared)
        self._clock = clock
        self._generation: int | None = None
        self._hits = 0  # used only without a shared store
        self._misses = 0
        self._warned_at = -_WARN_EVERY_S
        # Deferred L2 writes (store); an L1 hit on one of them is not checked against L2 yet.
        self._queued: dict[str, CachedResponse] = {}
        self._encoded: dict[str, bytes] = {}  # queued entries' encode(), when the caller had it
        self._stored_at: dict[str, float] = {}  # when each queued entry was stored (its L2 stamp)
        self._then: list[Callable[[], None]] = []  # to run right after the next deferred write
        self._scheduled = False  # flush is queued in the loop
        # Told after each write to L2 has committed (the coalescer's store counter, set by the
        # runtime: ntonix/cache/board.py).
        self.on_stored: Callable[[], None] | None = None

    # -- request path -------------------------------------------------------------------

    def lookup(self, key: str, *, count: bool = True, remote: bool = True) -> CachedResponse | None:
        """The cached answer for ``key`` or ``None``; counts one hit or miss gateway-wide
        unless ``count=False`` (the caller then reports the outcome with :meth:`record`,
        e.g. a miss answered by a coalesced leader, which the client sees as a HIT).
        ``remote=False`` skips the Redis tier (the caller reads it with the cluster's join,
        then hands the raw value to :meth:`adopt`)."""
        if not self.enabled:
            return None
        entry = self.lookup_memory(key)
        if entry is None:
            entry = self.lookup_below_memory(key, count=count, remote=remote)
        elif count:
            self.record(key, True)
        return entry

    def lookup_memory(self, key: str) -> CachedResponse | None:
        """:meth:`lookup` in this worker's L1 only, with every check a hit there needs (purge
        generation, the touch of L2's LRU order); no hit or miss counted. The worker's cache-hit
        fast path (ntonix/server/worker.py) asks this before a request's WSGI environ exists."""
        if not self.enabled:
            return None
        self._check_generation()
        memory, shared = self.memory, self.shared
        entry = memory.get(key) if memory is not None else None
        if (entry is not None and shared is not None and key not in self._queued
                and self._l2(lambda s: s.touch(key), True) is False):
            # L2 is the host's LRU: an entry it evicted is gone for every worker, whatever
            # L1 still holds (the touch keeps L2's order exact: INTERFACE.md "Cache").
            assert memory is not None
            memory.delete(key)
            entry = None
        return entry

    def lookup_below_memory(self, key: str, *, count: bool = True, remote: bool = True,
                            local: bool = True) -> CachedResponse | None:
        """The rest of :meth:`lookup` once :meth:`lookup_memory` missed: this worker's queued
        writes, L2, then Redis. Safe however long after that miss: L1 only holds copies of
        those tiers. ``local=False`` skips L2 too (the caller read it already)."""
        if not self.enabled:
            return None
        memory, shared = self.memory, self.shared
        remote_tier = self.remote if remote else None
        entry = self._queued.get(key) if self._queued else None
        if entry is not None:
            return entry  # stored by this worker, its L2 write still to come
        if shared is not None and local:
            entry = self._l2(lambda s: s.get(key, touch=not count), None)
            if entry is not None and memory is not None:
                memory.put(key, entry, age_s=self._clock() - entry.created)
        if entry is None and remote_tier is not None:
            entry = self._promote(key, remote_tier.get(key))
        if count:
            self.record(key, entry is not None)
        return entry

    def adopt(self, key: str, raw: bytes) -> CachedResponse | None:
        """The Redis tier's entry for ``key`` read as ``raw`` elsewhere (the cluster's join),
        decoded and checked as a lookup would, and copied into the tiers above."""
        if not self.enabled or self.remote is None:
            return None
        return self._promote(key, self.remote.decode(raw))

    def _promote(self, key: str, found: CachedResponse | None) -> CachedResponse | None:
        if found is not None:
            if self._l2(lambda s: s.put(key, found), -1) >= 0:
                self._stored()
            if self.memory is not None:
                self.memory.put(key, found, age_s=self._clock() - found.created)
        return found

    def remote_set_args(self, key: str, entry: CachedResponse) -> tuple[str, bytes, int] | None:
        """What :meth:`store` would write to the Redis tier for ``entry`` (``SET k v PX ms``),
        for a caller that sends it in a round trip of its own (then ``store(remote=False)``)."""
        if not self.enabled or self.remote is None or entry.status != 200 or not self.remote.steady:
            return None
        return self.remote.set_args(key, entry)

    def store(self, key: str, entry: CachedResponse, *,
              defer: Callable[[Callable[[], None]], object] | None = None, remote: bool = True,
              encoded: bytes | None = None) -> None:
        """Keep a complete answer in every tier; anything but status 200 is ignored.

        With ``defer`` (e.g. the gevent loop's ``run_callback``), the L2 write is queued and
        made by the callback ``defer`` is given, with every other answer stored meanwhile, in
        one write transaction: once the current greenlet yields, before the worker's loop polls
        again. Other workers see the answer that much later (the caller keeps them waiting on
        its flight meanwhile); this worker's lookups find it in the queue. ``remote=False``:
        not the Redis tier (the caller writes it, see :meth:`remote_set_args`; ``encoded`` is
        then the ``entry.encode()`` it made for that, written to L2 as it is)."""
        if not self.enabled or entry.status != 200:
            return
        self._check_generation()
        # L1 holds the worker's hot set: an answer enters it on its first hit (from L2, which
        # every worker reads), not when it is stored, so a miss nobody asks for again costs no
        # memory in any worker (1,000 streamed answers stored during an SSE run held ~20 MB of
        # L1, docs/performance.md). Without L2, or when it failed, L1 is the tier that serves.
        memory = self.memory
        if defer is not None and self.shared is not None:
            self._queued[key] = entry
            self._stored_at[key] = self._clock()
            if encoded is not None:
                self._encoded[key] = encoded
            else:
                self._encoded.pop(key, None)
            self._schedule(defer)
        elif self._l2(lambda s: s.put(key, entry, encoded), -1) >= 0:
            self._stored()
        elif memory is not None:
            memory.put(key, entry, age_s=self._clock() - entry.created)
        if self.remote is not None and remote:
            self.remote.put(key, entry)

    def then(self, fn: Callable[[], None], defer: Callable[[Callable[[], None]], object]) -> None:
        """Run ``fn`` right after the L2 write of the answers queued so far (:meth:`store` with
        ``defer``), in the same callback of the loop: e.g. a coalesced flight's end, which must
        come after its answer is in L2. With nothing queued, at the loop's next turn."""
        self._then.append(fn)
        self._schedule(defer)

    def _schedule(self, defer: Callable[[Callable[[], None]], object]) -> None:
        if not self._scheduled:
            self._scheduled = True
            defer(self.flush)

    def flush(self) -> None:
        """Write the answers :meth:`store` queued to L2, in one transaction (none if the cache
        was purged meanwhile, by any worker), then run what :meth:`then` was given, in order."""
        self._scheduled = False
        then, self._then = self._then, []
        try:
            self._check_generation()
            queued, self._queued = self._queued, {}
            encoded, self._encoded = self._encoded, {}
            stored_at, self._stored_at = self._stored_at, {}
            if queued:
                if self._l2(lambda s: s.put_many(list(queued.items()), encoded, stored_at), -1) >= 0:
                    self._stored()
                elif self.memory is not None:
                    now = self._clock()
                    for key, entry in queued.items():  # L2 failed: this worker's L1 serves them, as in store
                        self.memory.put(key, entry, age_s=now - entry.created)
        finally:
            for fn in then:
                try:
                    fn()
                except Exception:  # one flight's end must not keep the others from ending
                    log.exception("cache.after_write_failed")

    # -- operator -----------------------------------------------------------------------

    def purge(self) -> int:
        """Empty the cache for the whole gateway (and the shared Redis); returns entries removed."""
        removed = 0
        self._drop_queued()  # answers stored before the purge are not written after it
        if self.memory is not None:
            n = self.memory.clear()
            if self.shared is None:
                removed = n
        if self.shared is not None:
            removed = self._l2(lambda s: s.purge(), 0)
            self._generation = None
        if self.remote is not None:
            removed = max(removed, self.remote.purge())
        return removed

    def stats(self) -> dict[str, Any]:
        """``/cache/stats``: enabled, entries, size_bytes, max_size_bytes, hits, misses,
        hit_rate, evictions — for the whole gateway when there is a shared store."""
        entries = size = hits = misses = evictions = 0
        if self.enabled:
            shared = self._l2(lambda s: s.stats(), None)
            if shared is not None:
                entries, size = shared["entries"], shared["size_bytes"]
                hits, misses, evictions = shared["hits"], shared["misses"], shared["evictions"]
            elif self.memory is not None:
                entries, size, evictions = self.memory.entries, self.memory.size_bytes, self.memory.evictions
                hits, misses = self._hits, self._misses
        total = hits + misses
        return {
            "enabled": self.enabled,
            "entries": entries,
            "size_bytes": size,
            "max_size_bytes": self.max_bytes,
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / total, 4) if total else 0.0,
            "evictions": evictions,
        }

    # -- internals ----------------------------------------------------------------------

    def _check_generation(self) -> None:
        """A purge (or a replaced answer) in any worker since the last look: this worker's L1
        and its queued L2 writes (stored before it) go."""
        if self.shared is None:
            return
        generation = self._l2(LmdbStore.generation, None)
        if generation is not None and generation != self._generation:
            if self._generation is not None:
                if self.memory is not None:
                    self.memory.clear()
                self._drop_queued()
            self._generation = generation

    def _drop_queued(self) -> None:
        """Forget the answers queued for the next L2 write (and what goes with each)."""
        self._queued.clear()
        self._encoded.clear()
        self._stored_at.clear()

    def _stored(self) -> None:
        if self.on_stored is not None:
            try:
                self.on_stored()
            except Exception:  # the answer is stored: a failing notice must not fail the request
                log.exception("cache.on_stored_failed")

    def record(self, key: str | None, hit: bool) -> None:
        """Count one hit or miss (gateway-wide with a shared store)."""
        if not self.enabled:
            return
        if self._l2(lambda s: s.record_lookup(key, hit), None) is not None:
            return
        if hit:
            self._hits += 1
        else:
            self._misses += 1

    def _l2(self, op: Callable[[LmdbStore], T], default: T) -> T:
        """``op`` on the shared store; ``default`` when there is none or it failed (a failure
        is logged at most once a minute: it degrades to a miss, never fails a request)."""
        if self.shared is None:
            return default
        try:
            return op(self.shared)
        except StoreError as exc:
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                path = self.shared.path
                log.warning("cache.store_failed", extra={"path": path, "error": explain(exc, path)})
            return default

    def __repr__(self) -> str:
        tiers = [t for t, on in (("memory", self.memory), ("lmdb", self.shared), ("redis", self.remote)) if on]
        return f"<ResponseCache {'enabled' if self.enabled else 'disabled'} tiers={'+'.join(tiers) or '-'}>"


def build_cache(
    enabled: bool,
    max_bytes: int,
    ttl_s: float,
    directory: str,
    redis_url: str | None,
    *,
    memory_max_bytes: int | None = None,
) -> ResponseCache:
    """The gateway's cache from its configuration.

    L2 lives in ``<directory>/store`` (the coalescer uses ``<directory>/inflight``); nothing
    is opened until first use in each worker. L1 defaults to a quarter of ``max_bytes``,
    at most 64 MiB per worker: it only saves the ~2 µs of an L2 read, so it should hold the
    hot set, not everything.
    """
    if not enabled:
        return ResponseCache(None, None, None, False, max_bytes=max_bytes)
    if memory_max_bytes is None:
        memory_max_bytes = min(max_bytes // 4, 64 * MiB)
    memory = MemoryLRU(memory_max_bytes, ttl_s) if memory_max_bytes > 0 else None
    shared = LmdbStore(os.path.join(directory, "store"), max_bytes, ttl_s)
    remote = RedisStore(redis_url, ttl_s) if redis_url else None
    return ResponseCache(memory, shared, remote, True, max_bytes=max_bytes)


def _configured_max(memory: MemoryLRU | None, shared: LmdbStore | None) -> int:
    if shared is not None:
        return shared.max_bytes
    return memory.max_bytes if memory is not None else 0
