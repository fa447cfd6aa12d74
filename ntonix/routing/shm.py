"""A small shared-memory file of 64-bit cells, with byte-range locks: the base of host-wide routing state.

Every worker process of a host opens the same file in the run directory and maps it; a cell
written by one process is seen by the others at once, with no system call. Locks are POSIX
byte-range locks (``fcntl.lockf``) on the file, one byte per lock number, so they are held by
a process, vanish when it dies, and never need a lock file of their own. A lock held by this
process is not exclusive among its own greenlets: callers keep critical sections free of any
gevent switch (no I/O, no sleep), which makes them atomic within the process too.

The file starts with a magic number and a layout signature; a file with another layout (an older
gateway's, or another ``slots``/``backends`` setting) is reinitialised, under the lock, by the
first process that opens it.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator

__all__ = ["NamesFull", "SharedCells"]

_MAGIC = 0x4E544F4E49585348  # "NTONIXSH"
_HEADER_CELLS = 2  # magic, layout signature
NAME_BYTES = 64


class NamesFull(Exception):
    """More distinct names (backend addresses) than the shared file has room for."""


class SharedCells:
    """``cells`` int64 cells after a 2-cell header, then a table of ``names`` names (host-wide numbering).

    A name (a backend address) gets the first free number on first use, under lock 0, and keeps it
    for the life of the file, so every process maps an address to the same column or bit.
    """

    __slots__ = ("_base", "_fd", "_map", "_numbers", "cells", "names", "names_offset", "path", "q")

    def __init__(self, path: str, cells: int, *, names: int = 0, signature: int = 0) -> None:
        self.path = path
        self.cells = cells
        self.names = names
        self._numbers: dict[str, int] = {}
        self.names_offset = (_HEADER_CELLS + cells) * 8
        size = self.names_offset + names * NAME_BYTES
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked(0):
            if os.fstat(self._fd).st_size != size:
                os.ftruncate(self._fd, 0)  # another layout: start from zeros
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size)
            self._base = memoryview(self._map)
            self.q = self._base.cast("q")
            if self.q[0] != _MAGIC or self.q[1] != signature:
                self._map[:] = bytes(size)
                self.q[1] = signature
                self.q[0] = _MAGIC

    def number(self, name: str) -> int:
        """The host-wide number of ``name`` (0 .. names - 1), assigned on first use."""
        found = self._numbers.get(name)
        if found is not None:
            return found
        key = name.encode()[:NAME_BYTES]
        with self._locked(0):
            free = -1
            for number, stored in self._stored():
                if stored == key:
                    self._numbers[name] = number
                    return number
                if not stored and free < 0:
                    free = number
            if free < 0:
                raise NamesFull(f"more than {self.names} backend addresses in {self.path}")
            start = self.names_offset + free * NAME_BYTES
            self._map[start:start + NAME_BYTES] = key.ljust(NAME_BYTES, b"\0")
        self._numbers[name] = free
        return free

    def numbered(self) -> list[tuple[int, str]]:
        """Every name assigned so far, with its number."""
        return [(number, stored.decode(errors="replace")) for number, stored in self._stored() if stored]

    def _stored(self) -> Iterator[tuple[int, bytes]]:
        for number in range(self.names):
            start = self.names_offset + number * NAME_BYTES
            yield number, self._map[start:start + NAME_BYTES].rstrip(b"\0")

    def lock(self, number: int) -> contextlib.AbstractContextManager[None]:
        """Exclusive across processes for lock ``number`` (0 and up); see the module docstring."""
        return self._locked(number)

    @contextlib.contextmanager
    def _locked(self, number: int) -> Iterator[None]:
        # Lock bytes lie past the end of the mapped data; POSIX allows locking beyond EOF.
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, (1 << 40) + number, os.SEEK_SET)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, (1 << 40) + number, os.SEEK_SET)

    def cell(self, index: int) -> int:
        """The index of cell ``index`` in ``q`` (after the header)."""
        return _HEADER_CELLS + index

    def close(self) -> None:
        self.q.release()
        self._base.release()
        self._map.close()
        os.close(self._fd)
