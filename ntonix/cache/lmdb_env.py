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


def open_env(path: str, map_size: int, max_dbs: int) -> lmdb.Environment:
    """This process's environment at ``path`` (opened on first use, reopened after fork)."""
    real = ensure_private_dir(path)
    with _env_lock:
        pid = Process.pid
        held = _envs.get(real)
        if held is not None:
            if held[0] == pid:
                return held[1]
            held[1].close()  # inherited across fork: release our copy, never the parent's
        # No fsync: a lost tail after a host crash is fine for a cache. No writable map: it
        # makes a small commit ~1 µs instead of ~4.5 µs, but a full file system then kills the
        # worker with SIGBUS instead of failing the write. No spare read transaction is kept.
        env = lmdb.open(
            real, map_size=map_size, max_dbs=max_dbs, sync=False, metasync=False, lock=True,
            readahead=False, writemap=False, mode=0o600, max_spare_txns=0,
        )
        env.reader_check()  # free reader slots left by killed processes
        _envs[real] = (pid, env)
        return env


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


class Process:
    """This process's pid, refreshed in a forked child (``os.getpid()`` is a system call)."""

    pid = os.getpid()

    @classmethod
    def _forked(cls) -> None:
        cls.pid = os.getpid()


os.register_at_fork(after_in_child=Process._forked)


def read_counter(txn: Txn, db: _Database, name: bytes) -> int:
    raw = txn.get(name, db=db)
    return int(COUNTER.unpack(raw)[0]) if raw else 0


def add_counter(txn: Txn, db: _Database, name: bytes, delta: int) -> int:
    value = read_counter(txn, db, name) + delta
    txn.put(name, COUNTER.pack(value), db=db)
    return value
