"""Leader liveness through open-file-description locks: a signal that needs no disk space.

A follower must learn that its leader stopped publishing even when the journal cannot be
written (disk full: marking the flight failed is itself a write, and fails the same way;
issue #12). Each leader holds a one-byte write lock (``fcntl`` ``F_OFD_SETLK``, Linux 3.15+)
on ``<journal dir>/leaders.lock`` at an offset taken from its flight token, from before its
flight becomes visible (inside the transaction that creates it) until it finished or gave
up; the kernel drops it when the process dies. A follower tests the lock (``F_OFD_GETLK``,
~0.5 µs, no write) whenever it finds nothing new. Locks live in kernel memory: neither
taking nor testing one needs a byte on disk, and offsets past the end of the (empty) file
are fine. OFD locks belong to an open file description, not to a process, so a follower in
the leader's own process sees them too: it tests through a descriptor of its own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ntonix.pid import Process

# struct flock (Linux): l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), padding.
_FLOCK = struct.Struct("@hhqqi4x")
_OFFSET_BITS = 56  # a lock offset per token: 2**56 of them, collisions out of reach


class LeaderLocks:
    """Take, release and test the liveness lock of a flight token (one file per journal)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = -1
        self._hold_fd = -1
        self._test_fd = -1

    def _fds(self) -> tuple[int, int]:
        if self._pid != Process.pid:
            if not hasattr(fcntl, "F_OFD_SETLK"):
                # Not Linux: no coalescing (the coalescer treats this like an unusable journal).
                raise OSError(errno.ENOTSUP, "open file description locks (Linux 3.15+) are not available")
            # A forked child opens descriptors of its own: locks taken through the parent's
            # open file description would be shared with it.
            self._hold_fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._test_fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self._pid = Process.pid
        return self._hold_fd, self._test_fd

    def hold(self, token: bytes) -> bool:
        """Take ``token``'s lock; False if it cannot be had (then nobody may follow)."""
        try:
            fcntl.fcntl(self._fds()[0], fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, _offset(token), 1, 0))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self, token: bytes) -> None:
        try:
            fcntl.fcntl(self._fds()[0], fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, 0, _offset(token), 1, 0))
        except OSError:
            pass  # nothing held, or the descriptor is gone: either way nobody holds it for us

    def held(self, token: bytes) -> bool:
        """Is ``token``'s lock held (by any process, this one included)?"""
        probe = _FLOCK.pack(fcntl.F_WRLCK, 0, _offset(token), 1, 0)
        result = fcntl.fcntl(self._fds()[1], fcntl.F_OFD_GETLK, probe)
        return bool(_FLOCK.unpack(result)[0] != fcntl.F_UNLCK)

    def __repr__(self) -> str:
        return f"<LeaderLocks {self.path} {'open' if self._pid == Process.pid else 'not open'}>"


def _offset(token: bytes) -> int:
    # The token's low 56 bits: a flight token is (pid, per-process counter), so these differ
    # between any two live tokens (pids stay below 2**22 on Linux); two flights sharing a
    # lock byte would let one's release end the other's liveness.
    return int.from_bytes(token[:8], "big") & ((1 << _OFFSET_BITS) - 1)
