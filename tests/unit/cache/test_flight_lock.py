"""Leader liveness locks: taken, tested and released without any write, seen across
descriptors of one process and across processes, dropped by the kernel when a holder dies."""

from __future__ import annotations

import os
from pathlib import Path

from ntonix.cache.flight_lock import LeaderLocks


def test_hold_test_release_in_one_process(tmp_path: Path) -> None:
    locks = LeaderLocks(str(tmp_path / "leaders.lock"))
    a, b = b"\x01" * 8, b"\x02" * 8
    assert not locks.held(a)
    assert locks.hold(a)
    assert locks.held(a) and not locks.held(b)  # a follower in the leader's own process sees it
    other = LeaderLocks(str(tmp_path / "leaders.lock"))
    assert other.held(a)  # ... and so does any other open of the file
    assert not other.hold(a)  # taken
    locks.release(a)
    assert not locks.held(a) and not other.held(a)
    assert os.path.getsize(tmp_path / "leaders.lock") == 0  # nothing ever written


def test_a_dead_holder_releases(tmp_path: Path) -> None:
    locks = LeaderLocks(str(tmp_path / "leaders.lock"))
    token = b"\xfe" * 8
    to_parent, from_child = os.pipe()
    to_child, from_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a leader that takes its lock, says so, and dies without releasing
        try:
            child = LeaderLocks(str(tmp_path / "leaders.lock"))
            os.write(from_child, b"1" if child.hold(token) else b"0")
            os.read(to_child, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(to_parent, 1) == b"1"
        assert locks.held(token)
    finally:
        os.write(from_parent, b"x")
        os.waitpid(pid, 0)
        for fd in (to_parent, from_child, to_child, from_parent):
            os.close(fd)
    assert not locks.held(token)
