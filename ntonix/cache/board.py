"""The pending-leader board: which worker leads which key before its flight is in the journal.

Theory of operation
-------------------
Registering a flight in the coalescing journal (``ntonix.cache.coalescer``) costs a write
transaction to start it and one to end it, on every cache miss, although almost no miss ever
gets a follower. So a leader starts *unregistered*: it writes 16 bytes here, in a small file
every worker maps (``<journal dir>/pending``), and nothing to LMDB. A request for the same key
on another worker finds the leader's slot, raises its ``WANTED`` flag and rings the leading
process's *bell* (a counter); each process checks its own bell every poll interval (one
memory read) and registers the flights that are wanted, which then sets ``REGISTERED``. The
request waiting on the board then joins the flight through the journal as before.

Layout: ``SLOTS`` slots of (key hash u64, leader pid u32, flags u32), then ``BELLS`` counters
(u64) indexed by pid. A slot is chosen by the key's hash; two keys sharing a slot overwrite
each other, and the one overwritten is then simply not seen: its identical requests on other
workers go to the backend themselves, as they would without coalescing (rare and bounded:
~1/``SLOTS`` of concurrent distinct misses). Reads and writes are not atomic across processes;
a torn read is a wrong guess of the same kind, and every wait on the board is bounded.
"""

from __future__ import annotations

import mmap
import os
import struct

_SLOT = struct.Struct("<QII")  # key hash, leader pid, flags
_BELL = struct.Struct("<Q")
SLOTS = 4096
BELLS = 1024
WANTED, REGISTERED = 1, 2
_SIZE = SLOTS * _SLOT.size + BELLS * _BELL.size


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

    def peek(self, h: int) -> tuple[int, int] | None:
        """(pid, flags) of the leader announced for hash ``h``, or ``None``."""
        found, pid, flags = _SLOT.unpack_from(self._map, self._at(h))
        return (pid, flags) if found == h and pid else None

    def announce(self, h: int, pid: int) -> None:
        _SLOT.pack_into(self._map, self._at(h), h, pid, 0)

    def flag(self, h: int, pid: int, flag: int) -> None:
        """Add ``flag`` to ``pid``'s slot for ``h`` (if it still holds it)."""
        at = self._at(h)
        found, owner, flags = _SLOT.unpack_from(self._map, at)
        if found == h and owner == pid:
            _SLOT.pack_into(self._map, at, h, pid, flags | flag)

    def clear(self, h: int, pid: int) -> None:
        at = self._at(h)
        found, owner, _ = _SLOT.unpack_from(self._map, at)
        if found == h and owner == pid:
            _SLOT.pack_into(self._map, at, 0, 0, 0)

    def want(self, h: int, pid: int) -> None:
        """Ask ``pid`` to register its flight for ``h``: flag the slot, ring its bell."""
        self.flag(h, pid, WANTED)
        at = SLOTS * _SLOT.size + (pid % BELLS) * _BELL.size
        _BELL.pack_into(self._map, at, (_BELL.unpack_from(self._map, at)[0] + 1) & 0xFFFFFFFFFFFFFFFF)

    def bell(self, pid: int) -> int:
        return int(_BELL.unpack_from(self._map, SLOTS * _SLOT.size + (pid % BELLS) * _BELL.size)[0])
