"""L2: the host-wide response store in LMDB, shared by every worker process.

Theory of operation
-------------------
One LMDB environment (a memory-mapped B-tree: ~1 µs reads, ~5 µs small writes) holds
four sub-databases:

* ``data``:  key -> encoded :class:`CachedResponse`
* ``meta``:  key -> (last access µs, created, stored bytes)
* ``lru``:   last access µs (8 bytes, big-endian) + key -> ``b""``; its first item is the
  least recently used entry, so eviction is a cursor walk from the front
* ``stats``: gateway-wide counters (entries, bytes, hits, misses, evictions, expired, and the
  ``generation`` the per-worker L1 caches watch: bumped by a purge and when a stored answer is
  replaced by a newer one, so no worker keeps serving the replaced answer from its L1)

The generation is also kept in an 8-byte file every process maps (``<path>/generation``):
workers read it on every lookup, and a read of mapped memory costs nothing next to a read
transaction (2.7 % of a cache miss, issue #14). It is bumped inside the write transaction
that bumps the counter, so writers (serialized by LMDB) never lose a bump; a bump whose
transaction then fails only makes the workers drop their L1 once more than needed.

LRU is exact (issue #12): the entry evicted is always the one whose last use is oldest,
however close together two uses were. A new access stamp in ``lru`` is
``max(now µs, newest stamp + 1)``, so the stamps' order is the order of use even within one
microsecond or under a clock step; an answer whose write was batched to the end of its
worker's loop turn takes the time it was stored instead, when that is within a second of the
newest stamp, so a later store by another worker that committed first stays the newer. A hit
writes only when its entry is not the most recently used one already, i.e. when something
else was stored or used after it: the check is a read of ``lru``'s last row in the read
transaction the hit opens anyway, so a key read again and again with nothing in between costs
no write at all. Every write
transaction that stores also removes a few entries whose *access* time is past the TTL
(their creation is older still), then evicts from the front until the bytes fit.

Processes: environments are opened per process through ``ntonix.cache.lmdb_env.open_env`` (fork
rules there). Transactions never span a gevent switch: no call here yields.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import lmdb

from ntonix.cache.lmdb_env import COUNTER as _COUNTER
from ntonix.cache.lmdb_env import (
    MiB,
    Reservation,
    StoreError,
    add_counter,
    open_env,
    read_counter,
    translated,
    writemap_safe,
)
from ntonix.core.cache_entry import CachedResponse, DecodeError
from ntonix.pid import Process

__all__ = ["LmdbStore", "StoreError"]

if TYPE_CHECKING:
    from lmdb import _Database

    Txn = lmdb.Transaction[bytes]

_META = struct.Struct(">QdQ")  # access µs, created (wall clock), stored bytes
_SWEEP_PER_PUT = 16
_SWEEP_ROUNDS_PER_STATS = 64  # /cache/stats sweeps at most 1,024 expired entries
_MAP_FULL_RETRIES = 4
_STAT_NAMES = (b"entries", b"bytes", b"hits", b"misses", b"evictions", b"expired", b"generation")

_WRITE_SLACK = MiB  # room a write beyond its values may take: copied B-tree pages, free list


class _Handles(NamedTuple):
    env: lmdb.Environment
    data: _Database
    meta: _Database
    lru: _Database
    stats: _Database
    reservation: Reservation | None  # with a writable map: grow the file before writing

    def write(self, need: int = _WRITE_SLACK) -> Txn:
        """A write transaction (use it in ``with``); with a writable map, the file's blocks
        for ``need`` more bytes are allocated first (inside it: no other writer meanwhile)."""
        txn = self.env.begin(write=True)
        if self.reservation is not None:
            try:
                self.reservation.ensure(need)
            except BaseException:
                txn.abort()
                raise
        return txn


class LmdbStore:
    """Byte-bounded, TTL-bounded LRU store shared by all processes that open ``path``."""

    def __init__(self, path: str, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.time, *,
                 map_size: int | None = None) -> None:
        self.path, self.max_bytes, self.ttl_s = path, max_bytes, ttl_s
        self.map_size = map_size if map_size is not None else 2 * max_bytes + 64 * MiB
        self._clock = clock
        self._pid = -1
        self._handles: _Handles | None = None
        self._gen_map: mmap.mmap | None = None
        self._gen_pid = -1
        self._no_expiry_before = 0.0  # wall clock: no entry's access time expires before it

    def _open(self) -> _Handles:
        if self._handles is None or self._pid != Process.pid:
            writemap = writemap_safe(os.path.dirname(os.path.abspath(self.path)) or ".")
            env = open_env(self.path, self.map_size, max_dbs=8, writemap=writemap)
            dbs = [env.open_db(name) for name in (b"data", b"meta", b"lru", b"stats")]
            reservation = Reservation(env, self.path) if writemap else None
            self._handles, self._pid = _Handles(env, dbs[0], dbs[1], dbs[2], dbs[3], reservation), Process.pid
        return self._handles

    # -- reading ------------------------------------------------------------------------

    def get(self, key: str, *, touch: bool = True) -> CachedResponse | None:
        """The fresh entry under ``key`` or ``None``; an expired or unreadable one is removed.

        ``touch=False`` leaves the access time alone (the caller reports the lookup through
        :meth:`record_lookup`, which touches in the same write).
        """
        k = _k(key)
        with translated():
            h = self._open()
            with h.env.begin() as txn:
                raw_meta = txn.get(k, db=h.meta)
                raw = txn.get(k, db=h.data) if raw_meta is not None else None
                newest = touch and raw_meta is not None and _is_newest(h, txn, k, raw_meta)
            if raw_meta is None or raw is None:
                return None
            created = _META.unpack(raw_meta)[1]
            now = self._clock()
            entry: CachedResponse | None = None
            if created + self.ttl_s > now:
                try:
                    entry = CachedResponse.decode(raw)
                except DecodeError:
                    entry = None
            if entry is None:
                with h.write() as txn:
                    if txn.get(k, db=h.meta) == raw_meta:
                        self._remove(h, txn, k, raw_meta, counter=b"expired")
            elif touch and not newest:
                with h.write() as txn:
                    self._touch(h, txn, k, now)
            return entry

    def touch(self, key: str) -> bool:
        """Note a use of ``key`` served from a worker's memory tier, so the shared LRU order sees
        it: one read, and a write only when ``key`` is not the most recently used entry already.
        False when the entry is no longer here (evicted, purged): the caller must not serve it."""
        k = _k(key)
        with translated():
            h = self._open()
            with h.env.begin() as txn:
                raw_meta = txn.get(k, db=h.meta)
                if raw_meta is None:
                    return False
                newest = _is_newest(h, txn, k, raw_meta)
            if not newest:
                with h.write() as txn:
                    self._touch(h, txn, k, self._clock())
            return True

    def generation(self) -> int:
        """The purge generation: changes whenever :meth:`purge` ran in any process (or an
        answer was replaced); a read of shared memory, no transaction."""
        shared = self._gen_map
        if shared is None or self._gen_pid != Process.pid:
            with translated():
                shared = self._generation_map()
        return int(_COUNTER.unpack_from(shared)[0])

    def _generation_map(self) -> mmap.mmap:
        if self._gen_map is None or self._gen_pid != Process.pid:
            self._open()  # creates the directory (private) first
            fd = os.open(os.path.join(self.path, "generation"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, _COUNTER.size)  # no sparse page: see ntonix/cache/board.py
                self._gen_map = mmap.mmap(fd, _COUNTER.size)
            finally:
                os.close(fd)
            self._gen_pid = Process.pid
        return self._gen_map

    def _bump_generation(self, h: _Handles, txn: Txn) -> None:
        """Inside a write transaction: other workers' L1 copies must go."""
        add_counter(txn, h.stats, b"generation", 1)
        shared = self._generation_map()
        _COUNTER.pack_into(shared, 0, _COUNTER.unpack_from(shared)[0] + 1)

    def stats(self) -> dict[str, int]:
        """Gateway-wide counters; expired entries are swept first (a store sweeps a few each,
        so with no store for a while they would still be counted)."""
        with translated():
            h = self._open()
            now = self._clock()
            if now >= self._no_expiry_before:
                try:
                    with h.write() as txn:
                        for _ in range(_SWEEP_ROUNDS_PER_STATS):
                            self._sweep_expired(h, txn, now)
                            if now < self._no_expiry_before:
                                break
                except (StoreError, lmdb.Error):
                    pass  # a full disk refuses writes: the counters are still read below
            with h.env.begin() as txn:
                out = {name.decode(): read_counter(txn, h.stats, name) for name in _STAT_NAMES}
        out["size_bytes"] = out.pop("bytes")
        out["max_size_bytes"] = self.max_bytes
        return out

    # -- writing ------------------------------------------------------------------------

    def record_lookup(self, key: str | None, hit: bool) -> int:
        """Count a hit or a miss gateway-wide (returns the new count); on a hit also refresh
        ``key``'s access time, in the same write."""
        with translated():
            h = self._open()
            with h.write() as txn:
                count = add_counter(txn, h.stats, b"hits" if hit else b"misses", 1)
                if hit and key is not None:
                    self._touch(h, txn, _k(key), self._clock())
                return count

    def put(self, key: str, entry: CachedResponse, encoded: bytes | None = None) -> int:
        """Store ``entry`` (keeping its ``created``); returns how many entries were evicted.
        ``encoded``: ``entry.encode()``, when the caller has it already.

        Entries larger than ``max_bytes`` or already expired are not stored.
        """
        return self.put_many([(key, entry)], {key: encoded} if encoded is not None else None)

    def put_many(self, entries: list[tuple[str, CachedResponse]], encoded: dict[str, bytes] | None = None,
                 stored_at: dict[str, float] | None = None) -> int:
        """:meth:`put` for several entries in one write transaction (in order: a later one
        under the same key replaces an earlier); returns how many entries were evicted.
        ``encoded``: the ``entry.encode()`` of some of them by key, made already. ``stored_at``:
        when each was stored by the caller, if earlier than now (a batch written later): its
        last use, for the least-recently-used order."""
        now = self._clock()
        rows = []
        for key, entry in entries:
            raw = encoded.get(key) if encoded else None
            if raw is None:
                raw = entry.encode()
            if len(raw) <= self.max_bytes and entry.created + self.ttl_s > now:
                rows.append((_k(key), raw, entry.created, stored_at.get(key) if stored_at else None))
        if not rows:
            return 0
        with translated():
            for _ in range(_MAP_FULL_RETRIES):
                try:
                    return self._put(rows, now)
                except lmdb.MapFullError:
                    # Page rounding and pages held by old snapshots can outgrow the map's
                    # headroom: halve what is stored and try again.
                    self._shrink()
            return 0

    def delete(self, key: str) -> bool:
        k = _k(key)
        with translated():
            h = self._open()
            with h.write() as txn:
                raw_meta = txn.get(k, db=h.meta)
                if raw_meta is None:
                    return False
                self._remove(h, txn, k, raw_meta, counter=None)
                return True

    def purge(self) -> int:
        """Remove every entry (all processes see it at once); returns how many there were."""
        with translated():
            h = self._open()
            # Dropping every page lists them all in the free list: 8 bytes a page.
            with h.write(self.map_size // 512 + _WRITE_SLACK) as txn:
                n = int(txn.stat(h.data)["entries"])
                for db in (h.data, h.meta, h.lru):
                    txn.drop(db, delete=False)
                txn.put(b"entries", _COUNTER.pack(0), db=h.stats)
                txn.put(b"bytes", _COUNTER.pack(0), db=h.stats)
                self._bump_generation(h, txn)
                return n

    # -- internals ----------------------------------------------------------------------

    def _put(self, rows: list[tuple[bytes, bytes, float, float | None]], now: float) -> int:
        h = self._open()
        with h.write(sum(len(row[1]) for row in rows) + _WRITE_SLACK) as txn:
            added = count = 0
            # An entry's stamp is when it was stored: a batch written at the end of a loop turn
            # may commit after another worker stored (and committed) an answer later, which
            # must stay the newer. That holds for a store up to _STORED_LAG_US before the newest
            # stamp in ``lru`` (one look per batch); an older one (the clock stepped back since)
            # or one without that time follows the newest. The batch's stamps rise in its order.
            newest = _next_stamp(h, txn, now) - 1
            access_us = -1
            for k, raw, created, stored_at in rows:
                wanted = newest + 1
                if stored_at is not None and newest - _STORED_LAG_US <= int(stored_at * 1e6) <= newest:
                    wanted = int(stored_at * 1e6)
                access_us = max(wanted, access_us + 1)
                meta = _META.pack(access_us, created, len(raw))
                # A new key (nearly always): one descent of ``meta``, the put, instead of a get
                # first.
                if not txn.put(k, meta, db=h.meta, overwrite=False):
                    old = txn.get(k, db=h.meta)
                    assert old is not None
                    self._remove(h, txn, k, old, counter=None)
                    if _META.unpack(old)[1] != created:
                        # A new answer replaces an old one (e.g. after ``no-cache``): other
                        # workers' L1 copies of the old one must go, as after a purge.
                        self._bump_generation(h, txn)
                    txn.put(k, meta, db=h.meta)
                txn.put(k, raw, db=h.data)
                txn.put(access_us.to_bytes(8, "big") + k, b"", db=h.lru)
                added += len(raw)
                count += 1
            add_counter(txn, h.stats, b"entries", count)
            total = add_counter(txn, h.stats, b"bytes", added)
            self._sweep_expired(h, txn, now)
            # Least recently used first: the batch's own entries are among the newest (a second
            # back at most), so they go only after the older ones, and the bound holds even for
            # a batch larger than it.
            return self._evict(h, txn, total, self.max_bytes, keep={rows[-1][0]})

    def _shrink(self) -> None:
        h = self._open()
        with h.write() as txn:
            total = read_counter(txn, h.stats, b"bytes")
            self._evict(h, txn, total, total // 2, keep=set())

    def _evict(self, h: _Handles, txn: Txn, total: int, budget: int, keep: set[bytes]) -> int:
        """Remove least recently used entries until ``total`` bytes fit ``budget`` (never one
        of ``keep``: the entry just stored, the most recent one)."""
        evicted = 0
        while total > budget and (victim := self._oldest(h, txn)) is not None and victim[0] not in keep:
            total = self._remove(h, txn, victim[0], victim[1], counter=b"evictions")
            evicted += 1
        return evicted

    def _oldest(self, h: _Handles, txn: Txn) -> tuple[bytes, bytes] | None:
        """(key, meta) of the least recently accessed entry."""
        while True:
            with txn.cursor(db=h.lru) as cur:
                if not cur.first():
                    return None
                row = cur.key()
            raw_meta = txn.get(row[8:], db=h.meta)
            if raw_meta is not None:
                return row[8:], raw_meta
            txn.delete(row, db=h.lru)  # an index row without its entry: drop it, look again

    def _sweep_expired(self, h: _Handles, txn: Txn, now: float) -> None:
        # The access time is never older than the creation time: an entry not accessed for a
        # whole TTL has surely expired.
        # The oldest access time only grows (a new stamp is newer than every other, or a
        # batched store's at most a second older than the newest), so once the oldest entry is
        # seen to expire at T, no sweep is needed before T (give or take that second).
        if now < self._no_expiry_before:
            return
        horizon = int((now - self.ttl_s) * 1e6)
        for _ in range(_SWEEP_PER_PUT):
            victim = self._oldest(h, txn)
            if victim is None:
                self._no_expiry_before = now + self.ttl_s
                return
            access_us = _META.unpack(victim[1])[0]
            if access_us > horizon:
                self._no_expiry_before = access_us / 1e6 + self.ttl_s
                return
            self._remove(h, txn, victim[0], victim[1], counter=b"expired")

    def _touch(self, h: _Handles, txn: Txn, k: bytes, now: float) -> None:
        raw_meta = txn.get(k, db=h.meta)
        if raw_meta is None:
            return
        access_us, created, size = _META.unpack(raw_meta)
        if _is_newest(h, txn, k, raw_meta):
            return
        new_us = _next_stamp(h, txn, now)
        txn.delete(access_us.to_bytes(8, "big") + k, db=h.lru)
        txn.put(new_us.to_bytes(8, "big") + k, b"", db=h.lru)
        txn.put(k, _META.pack(new_us, created, size), db=h.meta)

    def _remove(self, h: _Handles, txn: Txn, k: bytes, raw_meta: bytes, counter: bytes | None) -> int:
        """Delete one entry and its index row; returns the new byte total."""
        access_us, _, size = _META.unpack(raw_meta)
        txn.delete(k, db=h.data)
        txn.delete(k, db=h.meta)
        txn.delete(access_us.to_bytes(8, "big") + k, db=h.lru)
        add_counter(txn, h.stats, b"entries", -1)
        if counter is not None:
            add_counter(txn, h.stats, counter, 1)
        return add_counter(txn, h.stats, b"bytes", -size)

    def __repr__(self) -> str:
        opened = "open" if self._pid == Process.pid else "not open in this process"
        return f"<LmdbStore {self.path} {opened} max={self.max_bytes}B ttl={self.ttl_s}s>"


def _is_newest(h: _Handles, txn: Txn, k: bytes, raw_meta: bytes) -> bool:
    """Is ``k`` (whose meta is ``raw_meta``) the most recently used entry?"""
    with txn.cursor(db=h.lru) as cur:
        return bool(cur.last()) and cur.key() == _META.unpack(raw_meta)[0].to_bytes(8, "big") + k


_STORED_LAG_US = 1_000_000  # how far back a batched store's own time may place it (above)


def _next_stamp(h: _Handles, txn: Txn, now: float) -> int:
    """An access stamp newer than every stamp in ``lru``: the clock's µs, or one more than the
    newest when the clock has not moved on (same µs, or stepped back)."""
    stamp = int(now * 1e6)
    with txn.cursor(db=h.lru) as cur:
        if cur.last():
            stamp = max(stamp, int.from_bytes(cur.key()[:8], "big") + 1)
    return stamp


def _k(key: str) -> bytes:
    k = key.encode("utf-8")
    if not 0 < len(k) <= 400:
        raise ValueError(f"cache key must be 1..400 bytes, got {len(k)}")
    return k
