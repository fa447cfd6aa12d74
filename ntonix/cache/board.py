"""The pending-leader board: which worker leads which key before its flight is in the journal.

Theory of operation
-------------------
Registering a flight in the coalescing journal (``ntonix.cache.coalescer``) costs a write
transaction to start it and one to end it, on every cache miss, although almost no miss ever
gets a follower. So a leader starts *unregistered*: it writes one slot here, in a file
every worker maps (``<journal dir>/board-65536-s``, 2 MiB), and nothing to LMDB. A request for the same key on
another worker finds the slot, counts itself in the slot's ``want`` field and rings the leading
process's *bell* (a counter); each process checks its own bell every poll interval (one memory
read) and registers the flights that are wanted.

Layout: ``SLOTS`` slots of (key hash u64, leader pid u32, flight serial u32, state u32, want u32,
padding), then ``BELLS`` counters (u64) indexed by pid, then the *store* counter (u64). The leader
writes hash, pid, serial and state; followers write only ``want``. A slot is chosen by the key's
hash; two keys sharing a slot overwrite each other, and the one overwritten is then simply not
seen: its identical requests on other workers go to the backend themselves, as they would without
coalescing (rare and bounded: ~1/``SLOTS`` of concurrent distinct misses). Every wait on the board is bounded.

The *store* counter moves after every write to L2 (``ResponseCache``, once its transaction has
committed: ``Coalescer.stored``), under the writer lock below; a leader's flight ends after its
answer's write. A request that read it before looking in L2, and reads the same value once it
leads the key, needs no second look (``ntonix.gateway.proxy``, ``Proxy._join``): nothing was
stored since its look, except in the instant between another worker's commit and its counter
move (and, where the lock cannot be taken, a lost update). Either costs at most a duplicate
backend request, never a wrong answer.

Reads and writes here are not atomic across processes, so every *decision* taken on a slot
(a request announcing itself as the key's leader, a follower raising ``want``, a leader leaving
the board) is made while holding the coalescing journal's writer lock (LMDB's robust
process-shared mutex: a write transaction begun and aborted, ~0.3 µs; ``ntonix.cache.coalescer``,
"The handshake"). The lock orders them and its acquire and release are the memory barriers that
make each decision's writes visible to the next. Lock-free reads (a bell, ``want`` as a hint
while the leader runs) are only ever hints.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

_SLOT = struct.Struct("<QIIII8x")  # key hash, leader pid, flight serial, state, want
_STATE = struct.Struct("<I")
_STATE_AT, _WANT_AT = 16, 20
_BELL = struct.Struct("<Q")
SLOTS = 65536  # 2 MiB of slots: two keys in flight at once share one with odds ~1 in 65,536
FILE = "board-65536-s"  # the layout's name (-s: with the store counter): another layout is another file
BELLS = 1024
# Slot states. RUNNING: announced, not in the journal. ENDING: the leader left the board with
# someone wanting its flight, and is registering it for them (then it clears the slot).
# REGISTERED: the flight is in the journal, joinable through the key (``inflight``).
RUNNING, ENDING, REGISTERED = 1, 2, 3
_STORES_AT = SLOTS * _SLOT.size + BELLS * _BELL.size
_SIZE = _STORES_AT + _BELL.size


class Seen(NamedTuple):
    pid: int
    serial: int
    state: int
    want: int


class Board:
    """The shared slot table of one coalescing journal (opened per process)."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Zero-filled (every slot empty, every bell at 0) and allocated for real: a page of a
            # sparse file written through the map on a full file system kills the process with
            # SIGBUS (ntonix/cache/lmdb_env.py reserves its writable map's blocks for that reason).
            os.posix_fallocate(fd, 0, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)

    @staticmethod
    def _at(h: int) -> int:
        return (h % SLOTS) * _SLOT.size

    def peek(self, h: int) -> Seen | None:
        """What the slot says of the leader announced for hash ``h``, or ``None``."""
        found, pid, serial, state, want = _SLOT.unpack_from(self._map, self._at(h))
        return Seen(pid, serial, state, want) if found == h and pid else None

    def announce(self, h: int, pid: int, serial: int) -> None:
        _SLOT.pack_into(self._map, self._at(h), h, pid, serial, RUNNING, 0)

    def _mine(self, h: int, pid: int, serial: int) -> int:
        """The slot's offset if it holds ``pid``'s flight ``serial`` for ``h``, else -1."""
        at = self._at(h)
        found, owner, ser, _, _ = _SLOT.unpack_from(self._map, at)
        return at if found == h and owner == pid and ser == serial else -1

    def set_state(self, h: int, pid: int, serial: int, state: int) -> bool:
        """Set the state of ``pid``'s slot for flight ``serial`` (False if it lost the slot)."""
        at = self._mine(h, pid, serial)
        if at >= 0:
            _STATE.pack_into(self._map, at + _STATE_AT, state)
        return at >= 0

    def leave(self, h: int, pid: int, serial: int) -> bool:
        """The leader's half of the handshake (under the journal's writer lock): nobody wants
        the flight: the slot is cleared and False returned; someone does: the slot says ENDING
        and True is returned (the caller registers the flight, then clears the slot)."""
        at = self._mine(h, pid, serial)
        if at < 0:
            return False  # another key took the slot: nobody can have wanted us since
        if _STATE.unpack_from(self._map, at + _WANT_AT)[0] > 0:
            _STATE.pack_into(self._map, at + _STATE_AT, ENDING)
            return True
        _SLOT.pack_into(self._map, at, 0, 0, 0, 0, 0)
        return False

    def wanted(self, h: int, pid: int, serial: int) -> bool:
        """Has some request raised ``want`` on ``pid``'s slot for flight ``serial``?"""
        at = self._mine(h, pid, serial)
        return at >= 0 and _STATE.unpack_from(self._map, at + _WANT_AT)[0] > 0

    def clear(self, h: int, pid: int, serial: int | None = None) -> None:
        at = self._at(h)
        found, owner, ser, _, _ = _SLOT.unpack_from(self._map, at)
        if found == h and owner == pid and serial in (None, ser):
            _SLOT.pack_into(self._map, at, 0, 0, 0, 0, 0)

    def want(self, h: int, pid: int, serial: int) -> bool:
        """Count a request in ``pid``'s slot for flight ``serial`` (under the journal's writer
        lock) and ring its bell; False if the slot no longer holds that flight."""
        at = self._mine(h, pid, serial)
        if at >= 0:
            n = _STATE.unpack_from(self._map, at + _WANT_AT)[0]
            _STATE.pack_into(self._map, at + _WANT_AT, min(n + 1, 0xFFFFFFFF))
        self.ring(pid)
        return at >= 0

    def ring(self, pid: int) -> None:
        """Ring ``pid``'s bell (a lost increment between two ringers is fine: it changed)."""
        at = SLOTS * _SLOT.size + (pid % BELLS) * _BELL.size
        _BELL.pack_into(self._map, at, (_BELL.unpack_from(self._map, at)[0] + 1) & 0xFFFFFFFFFFFFFFFF)

    def stores(self) -> int:
        """The store counter (a lock-free read: an aligned 8-byte load is never torn)."""
        return int(_BELL.unpack_from(self._map, _STORES_AT)[0])

    def count_store(self) -> None:
        """Something was stored in L2: move the store counter (under the writer lock)."""
        _BELL.pack_into(self._map, _STORES_AT, (_BELL.unpack_from(self._map, _STORES_AT)[0] + 1) & 0xFFFFFFFFFFFFFFFF)

    def bell(self, pid: int) -> int:
        return int(_BELL.unpack_from(self._map, SLOTS * _SLOT.size + (pid % BELLS) * _BELL.size)[0])
