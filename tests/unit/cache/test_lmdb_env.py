"""The writable-map plumbing of ntonix/cache/lmdb_env.py: which file systems may use it, how far
the data file is allocated ahead, and that a store on one keeps its file allocated ahead."""

from __future__ import annotations

import os
from pathlib import Path

from ntonix.cache.lmdb_env import MiB, fs_type, reserve_target
from ntonix.cache.shared import LmdbStore
from ntonix.core.cache_entry import CachedResponse

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid 0 0
tmpfs /tmp tmpfs rw,nosuid 0 0
/dev/vdb /tmp/cache\\040dir btrfs rw 0 0
/dev/vdc /var/cache/ntonix xfs rw 0 0
overlay /srv overlay rw 0 0
"""


def test_the_longest_mount_point_that_holds_the_path_names_its_file_system() -> None:
    assert fs_type("/", MOUNTS) == "ext4"
    assert fs_type("/work/main", MOUNTS) == "ext4"
    assert fs_type("/tmp", MOUNTS) == "tmpfs"
    assert fs_type("/tmp/x/store", MOUNTS) == "tmpfs"
    assert fs_type("/tmp/cache dir/store", MOUNTS) == "btrfs"  # "\040" is a space
    assert fs_type("/tmp/cache dirt", MOUNTS) == "tmpfs"  # a prefix of a name is not a parent
    assert fs_type("/var/cache/ntonix/store", MOUNTS) == "xfs"
    assert fs_type("/srv/cache", MOUNTS) == "overlay"
    assert fs_type("/x", "") == ""


def test_the_file_is_allocated_in_chunks_ahead_of_what_a_write_may_add() -> None:
    chunk, limit = 2 * MiB, 100 * MiB
    assert reserve_target(0, MiB, 0, limit, chunk) == 2 * MiB
    assert reserve_target(MiB, MiB, 2 * MiB, limit, chunk) == 2 * MiB  # enough: unchanged
    assert reserve_target(MiB + 1, MiB, 2 * MiB, limit, chunk) == 4 * MiB
    assert reserve_target(10 * MiB, 5 * MiB, 2 * MiB, limit, chunk) == 16 * MiB  # a big entry
    assert reserve_target(99 * MiB, 5 * MiB, 98 * MiB, limit, chunk) == limit  # never past the map


def test_a_store_keeps_its_data_file_allocated_ahead_of_its_pages(tmp_path: Path) -> None:
    store = LmdbStore(str(tmp_path / "store"), 8 * MiB, 60)
    body = os.urandom(300_000)
    for i in range(20):
        store.put(f"k{i}", CachedResponse(200, (), body, 1e12, False))
    h = store._open()
    if h.reservation is None:  # a file system where no reservation is a promise: no writable map
        assert not h.env.flags()["writemap"]
        return
    assert h.env.flags()["writemap"]
    used = (h.env.info()["last_pgno"] + 1) * h.env.stat()["psize"]
    allocated = os.stat(tmp_path / "store" / "data.mdb").st_blocks * 512
    assert allocated >= used + MiB
    assert store.get("k19") is not None


def test_zeroing_the_reserved_pages_never_touches_a_stored_one(tmp_path: Path) -> None:
    # Two stores on one path, as two workers: each knows only its own reservation, so each
    # writes zeros ahead from what it last saw. Live pages (below last_pgno) are never among them.
    path = str(tmp_path / "store")
    a, b = LmdbStore(path, 64 * MiB, 60), LmdbStore(path, 64 * MiB, 60)
    bodies = {}
    for i in range(240):
        body = os.urandom(1_000 + (i * 7919) % 30_000)
        bodies[f"k{i}"] = body
        (a if (i // 40) % 2 == 0 else b).put(f"k{i}", CachedResponse(200, (), body, 1e12, False))
    for key, body in bodies.items():
        got = a.get(key, touch=False)
        assert got is not None and got.body == body, key


def test_a_cold_store_does_not_fault_a_page_in_from_the_disk_per_answer(tmp_path: Path) -> None:
    # ext4 and xfs reserve "unwritten" blocks: the first store to each page through the map was a
    # major fault (about one per 4 KB answer). The pages ahead are written with zeros instead.
    import resource

    store = LmdbStore(str(tmp_path / "store"), 64 * MiB, 60)
    store.put("warm", CachedResponse(200, (), b"x", 1e12, False))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for i in range(300):
        store.put(f"k{i}", CachedResponse(200, (), os.urandom(4_000), 1e12, False))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before < 30
