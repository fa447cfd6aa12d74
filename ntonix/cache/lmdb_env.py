"""LMDB environments for the shared cache and the coalescing journal, one place for the plumbing.

Processes: LMDB forbids using an environment across ``fork()`` and opening the same files
twice in one process (py-lmdb refuses). :func:`open_env` keeps one environment per path per
process; a child that inherited its parent's closes that copy (safe: no transaction is ever
left open between calls, so nothing of the parent's reader table is touched) and opens its
own. LMDB and file-system failures become :class:`StoreError` in :func:`translated`.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lmdb

from ntonix.pid import Process

if TYPE_CHECKING:
    from lmdb import _Database

    Txn = lmdb.Transaction[bytes]

MiB = 1 << 20
COUNTER = struct.Struct("<q")

_env_lock = threading.Lock()
_envs: dict[str, tuple[int, lmdb.Environment]] = {}


class StoreError(Exception):
    """The shared store failed (disk, map full, permissions); callers treat it as a miss."""


def ensure_private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if missing; refuse a directory another user owns."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise StoreError(f"{path}: owned by uid {st.st_uid}, not by us")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return os.path.realpath(path)


def open_env(path: str, map_size: int, max_dbs: int, *, writemap: bool = False) -> lmdb.Environment:
    """This process's environment at ``path`` (opened on first use, reopened after fork).

    ``writemap``: commits write the map's pages in place instead of copying them out with
    ``pwrite`` (a store commit ~3.5 instead of ~13 µs, ``LmdbStore``). A page written through
    the map that the file system cannot back kills the process with SIGBUS, so a caller that
    asks for it must reserve the space first (:class:`Reservation`); on file systems where a
    reservation is no promise (copy-on-write ones) :func:`writemap_safe` says no.
    """
    real = ensure_private_dir(path)
    with _env_lock:
        pid = Process.pid
        held = _envs.get(real)
        if held is not None:
            if held[0] == pid:
                return held[1]
            held[1].close()  # inherited across fork: release our copy, never the parent's
        # No fsync: a lost tail after a host crash is fine for a cache. No spare read
        # transaction is kept.
        env = lmdb.open(
            real, map_size=map_size, max_dbs=max_dbs, sync=False, metasync=False, lock=True,
            readahead=False, writemap=writemap, mode=0o600, max_spare_txns=0,
        )
        env.reader_check()  # free reader slots left by killed processes
        _envs[real] = (pid, env)
        return env


# File systems on which posix_fallocate() allocates blocks that later writes use in place, so
# a reserved page can always be written. Not btrfs/ZFS (copy on write: an overwrite needs new
# blocks), not network or FUSE file systems, not overlayfs (its upper layer could be anything).
_RESERVING_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs"})


def fs_type(path: str, mounts: str) -> str:
    """The type of the file system ``path`` (absolute, resolved) is on, from ``mounts`` in the
    format of /proc/self/mounts (the longest mount point that contains it); "" if none."""
    best, kind = -1, ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def writemap_safe(path: str) -> bool:
    """Can an LMDB environment at ``path`` use a writable map (its space reserved ahead)?"""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = f.read()
    except OSError:
        return False
    return fs_type(os.path.realpath(path), mounts) in _RESERVING_FS


_ZEROS = memoryview(bytes(MiB))
RESERVE_CHUNK = 2 * MiB  # a small file system (an 8 MiB tmpfs in the tests) must still fit a few


def reserve_target(used: int, need: int, reserved: int, limit: int, chunk: int = RESERVE_CHUNK) -> int:
    """How far the data file must be allocated before a write that may add up to ``need``
    bytes to the ``used`` ones: ``reserved`` when that is enough, else the next multiple of
    ``chunk`` past ``used + need`` (at most ``limit``, the map size)."""
    want = used + need
    if want <= reserved:
        return reserved
    return min(limit, -(-want // chunk) * chunk)


class Reservation:
    """The allocated prefix of an environment's data file, grown ahead of a writable map.

    Called inside a write transaction (so no other process grows the file meanwhile):
    :meth:`ensure` reads the committed size of the data (``last_pgno``) and, when the write
    to come could reach past what is allocated, allocates the next chunks with
    ``posix_fallocate``, which fails cleanly (``ENOSPC``) on a full file system: the write is
    then refused as any failed write is, and no page of the map is ever left without a block.

    It then writes zeros over the new part that no transaction has used (past ``last_pgno``,
    which only the writer, us, can move). ext4 and xfs allocate "unwritten" blocks, and the
    first store to each page of the map was a major fault that converted its block through the
    journal: one per 4 KB answer stored (3,135 faults for 3,000; 7 now), and while the journal
    was busy writing back, a stall of milliseconds. Streamed answers showed it: after the
    bench's cache-miss runs, SSE C = 500 TTFT p99 15.0 → 4.7 ms, CPU per stream 1,741 →
    1,486 µs. One ``pwrite`` of zeros per MiB costs well under 1 µs a page.
    """

    def __init__(self, env: lmdb.Environment, path: str) -> None:
        self._env = env
        self._path = os.path.join(path, "data.mdb")
        self._psize = int(env.stat()["psize"])
        self._limit = int(env.info()["map_size"])
        self._reserved = 0  # known allocated in this process; 0: not checked yet

    def ensure(self, need: int) -> None:
        used = (int(self._env.info()["last_pgno"]) + 1) * self._psize
        target = reserve_target(used, need, self._reserved, self._limit)
        if target <= self._reserved:
            return
        fd = os.open(self._path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, self._reserved, target - self._reserved)
            start = max(used, self._reserved)
            while start < target:
                start += os.pwrite(fd, _ZEROS[: min(MiB, target - start)], start)
        finally:
            os.close(fd)
        self._reserved = target


class _Translated:
    """Turns LMDB and file-system failures into :class:`StoreError`, the one place it happens.
    A class, not ``@contextmanager``: this runs on every cache call and costs 0.1 µs, not 1."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None and issubclass(exc_type, lmdb.Error):
            raise StoreError(f"lmdb: {exc}") from exc
        if exc_type is not None and issubclass(exc_type, OSError):
            raise StoreError(f"cache directory: {exc}") from exc


_TRANSLATED = _Translated()


def translated() -> _Translated:
    return _TRANSLATED


_NEARLY_FULL = MiB  # less than this free: a failed write is put down to a full file system


def explain(error: BaseException, path: str, statvfs: Callable[[str], Any] = os.statvfs) -> str:
    """``error``'s message, naming its real cause. LMDB reports a write that the file system
    cut short for want of space as ``EIO``, "Input/output error" (seen on a full tmpfs, issue
    #12); when the file system under ``path`` is (nearly) full, that is what it was."""
    text = str(error)
    if "No space left" in text:
        return text
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        st = statvfs(probe or ".")
    except OSError:
        return text
    free = st.f_bavail * st.f_frsize
    if free >= _NEARLY_FULL:
        return text
    where = f"({free} bytes free on the file system of {path})"
    if "Input/output error" in text:
        return text.replace("Input/output error", f"No space left on device {where}")
    return f"{text}: No space left on device {where}"


def read_counter(txn: Txn, db: _Database, name: bytes) -> int:
    raw = txn.get(name, db=db)
    return int(COUNTER.unpack(raw)[0]) if raw else 0


def add_counter(txn: Txn, db: _Database, name: bytes, delta: int) -> int:
    value = read_counter(txn, db, name) + delta
    txn.put(name, COUNTER.pack(value), db=db)
    return value
