from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ntonix.cache.coalescer import Coalescer, Follower, Leader, LeaderFailed
from tests.fakes import FakeClock
from tests.live.procs import ROOT

HEAD = (("Content-Type", "text/event-stream"),)




class Script:
    """An injected ``sleep``: advances the fake clock and runs the next scripted step (the
    other side's action), so a follower's polling loop runs without threads or real sleeps."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.steps: list[Callable[[], object]] = []
        self.sleeps = 0

    def __call__(self, seconds: float) -> None:
        self.sleeps += 1
        self.clock.advance(seconds)
        if self.steps:
            self.steps.pop(0)()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def script(clock: FakeClock) -> Script:
    return Script(clock)


def pair(tmp_path: Path, clock: FakeClock, script: Script, **kw: object) -> tuple[Coalescer, Coalescer]:
    """Two workers' coalescers on one directory."""
    def make() -> Coalescer:
        return Coalescer(str(tmp_path), stale_after_s=30, sleep=script, clock=clock, **kw)  # type: ignore[arg-type]

    return make(), make()


def rows(c: Coalescer) -> tuple[int, int, int]:
    """(inflight, flights, journal) row counts."""
    h = c.handles()
    with h.env.begin() as txn:
        return tuple(txn.stat(db)["entries"] for db in (h.inflight, h.flights, h.journal))  # type: ignore[return-value]


def lead(c: Coalescer, key: str = "k") -> Leader:
    role = c.join(key)
    assert isinstance(role, Leader)
    return role


def follow(c: Coalescer, key: str = "k") -> Follower:
    role = c.join(key)
    assert isinstance(role, Follower)
    return role


def test_alone_the_leader_writes_no_journal(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, _ = pair(tmp_path, clock, script)
    leader = lead(a)
    leader.publish_head(200, HEAD)
    for i in range(5):
        leader.publish_chunk(b"data: %d\n\n" % i)
    assert rows(a) == (1, 1, 0)
    leader.finish(True)
    leader.finish(False)  # idempotent: no effect after the first
    assert rows(a) == (0, 0, 0)
    assert isinstance(a.join("k"), Leader)  # a later request leads again


def test_follower_gets_head_and_every_chunk_in_order(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    leader.publish_head(200, HEAD)
    leader.publish_chunk(b"one ")  # before anyone follows: kept in memory only
    follower = follow(b)
    assert rows(a)[2] == 0
    script.steps = [lambda: leader.publish_chunk(b"two "), lambda: None, lambda: leader.publish_chunk(b"three "),
                    lambda: leader.finish(True)]
    assert follower.wait_head(5) == (200, HEAD)
    assert list(follower.chunks(5)) == [b"one ", b"two ", b"three "]
    assert rows(a) == (0, 1, 4)  # finished, but the follower has not left yet
    follower.close()
    follower.close()
    assert rows(a) == (0, 0, 0)


def test_plain_answer_is_head_plus_one_chunk(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    with follow(b) as follower:
        def answer() -> None:
            leader.publish_head(200, ())
            leader.publish_chunk(b'{"a":1}')
            leader.finish(True)

        script.steps = [answer]
        assert follower.wait_head(5) == (200, ())
        assert list(follower.chunks(5)) == [b'{"a":1}']
    assert rows(a) == (0, 0, 0)


def test_follower_that_joins_after_the_last_chunk_still_gets_everything(
    tmp_path: Path, clock: FakeClock, script: Script
) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    leader.publish_head(200, HEAD)
    leader.publish_chunk(b"all")
    follower = follow(b)
    leader.finish(True)  # the journal is written here, in the same transaction as DONE
    assert follower.wait_head(1) == (200, HEAD)
    assert list(follower.chunks(1)) == [b"all"]


def test_several_followers_last_one_out_cleans_up(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    followers = [follow(b), follow(a), follow(b)]
    leader.publish_head(200, HEAD)
    leader.publish_chunk(b"x")
    leader.finish(True)
    for f in followers:
        assert f.wait_head(1) == (200, HEAD)
        assert list(f.chunks(1)) == [b"x"]
    followers[0].close()
    followers[1].close()
    assert rows(a) == (0, 1, 2)
    followers[2].close()
    assert rows(a) == (0, 0, 0)


def test_leader_failing_before_the_head(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    follower = follow(b)
    script.steps = [lambda: leader.finish(False)]
    assert follower.wait_head(5) is None
    follower.close()
    assert rows(a) == (0, 0, 0)


def test_leader_failing_midway_breaks_the_follower(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    with lead(a) as leader:
        follower = follow(b)
        leader.publish_head(200, HEAD)
        leader.publish_chunk(b"one")
        assert follower.wait_head(5) == (200, HEAD)
        chunks = follower.chunks(5)
        assert next(chunks) == b"one"
    # leaving the with-block without finish() marks the flight failed
    with pytest.raises(LeaderFailed, match="failed"):
        next(chunks)


def test_failed_head_already_published_is_not_followed(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    follower = follow(b)
    leader.publish_head(200, HEAD)
    leader.finish(False)
    assert follower.wait_head(5) is None  # go to the backend instead of starting a doomed answer


def test_dead_leader_is_detected_and_taken_over(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    alive = {"value": True}
    a, b = pair(tmp_path, clock, script, is_alive=lambda pid: alive["value"])
    old = lead(a)
    old.publish_head(200, HEAD)
    follower = follow(b)
    old.publish_chunk(b"c0")
    assert follower.wait_head(1) == (200, HEAD)
    chunks = follower.chunks(60)
    assert next(chunks) == b"c0"
    alive["value"] = False  # the leader's process died
    with pytest.raises(LeaderFailed, match="gone"):
        next(chunks)
    new = lead(b)  # a dead leader's flight is taken over
    alive["value"] = True
    assert new.token != old.token
    old.publish_chunk(b"late")  # the old leader (if it were alive) can no longer disturb anything
    old.finish(True)
    new_follower = follow(a)
    new.publish_head(201, ())
    new.finish(True)
    assert new_follower.wait_head(1) == (201, ())
    follower.close()
    new_follower.close()
    assert rows(a) == (0, 0, 0)


def test_silent_leader_goes_stale(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    old = lead(a)
    follower = follow(b)
    assert follower.wait_head(60) is None  # the heartbeat is older than stale_after_s (30)
    assert script.sleeps > 100
    assert isinstance(b.join("k"), Leader)
    old.finish(True)
    assert rows(a)[0] == 1  # the new flight is untouched


def test_heartbeat_keeps_a_slow_but_live_leader(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    leader.publish_head(200, HEAD)
    for _ in range(100):  # 100 s of a slow stream, one chunk a second, nobody following
        clock.advance(1)
        leader.publish_chunk(b".")
    assert isinstance(b.join("k"), Follower)


def test_gap_longer_than_the_timeout(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    follower = follow(b)
    leader.publish_head(200, HEAD)
    assert follower.wait_head(1) is not None
    with pytest.raises(LeaderFailed, match="nothing from the leader"):
        next(follower.chunks(2))


def test_sweep_removes_flights_abandoned_by_crashed_followers(tmp_path: Path, clock: FakeClock,
                                                              script: Script) -> None:
    a, b = pair(tmp_path, clock, script)
    leader = lead(a)
    follow(b)  # never closed: its process "crashed"
    leader.publish_head(200, HEAD)
    leader.finish(True)
    assert rows(a) == (0, 1, 1)
    assert a.sweep() == 0  # too recent
    clock.advance(31)
    assert a.sweep() == 1
    assert rows(a) == (0, 0, 0)


def test_misuse_is_refused(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, _ = pair(tmp_path, clock, script)
    leader = lead(a)
    with pytest.raises(ValueError):
        leader.publish_chunk(b"x")
    leader.publish_head(200, ())
    with pytest.raises(ValueError):
        leader.publish_head(200, ())
    assert "running" in repr(leader)
    leader.finish(True)


# ----------------------------------------------------------------------------- two real processes

LEADER = r"""
import sys, time
from ntonix.cache.coalescer import Coalescer
role = Coalescer(sys.argv[1], sleep=time.sleep).join("key")
print(type(role).__name__, flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "head":
        role.publish_head(200, (("Content-Type", "text/event-stream"),))
    elif cmd == "chunk":
        role.publish_chunk(b"data: " + arg.encode() + b"\n\n")
    elif cmd == "finish":
        role.finish(True)
    print("ok", flush=True)
"""


class LeaderProcess:
    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LEADER, str(directory)], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.readline() == "Leader"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def do(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.readline() == "ok"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def test_cross_process_follower_streams_while_the_leader_writes(tmp_path: Path) -> None:
    leader = LeaderProcess(tmp_path)
    try:
        follower = follow(Coalescer(str(tmp_path), sleep=time.sleep), "key")
        leader.do("head")
        assert follower.wait_head(5) == (200, HEAD)
        chunks = follower.chunks(5)
        for i in range(3):
            leader.do(f"chunk {i}")
            # The leader is blocked on its stdin until we ask for more: this chunk crossed
            # the process boundary while the leader's request was still running.
            assert next(chunks) == b"data: %d\n\n" % i
        leader.do("finish")
        assert list(chunks) == []
        follower.close()
    finally:
        leader.stop()


def test_cross_process_leader_killed(tmp_path: Path) -> None:
    leader = LeaderProcess(tmp_path)
    try:
        c = Coalescer(str(tmp_path), sleep=time.sleep)
        follower = follow(c, "key")
        leader.do("head")
        leader.do("chunk 0")
        assert follower.wait_head(5) is not None
        chunks = follower.chunks(5)
        assert next(chunks) == b"data: 0\n\n"
    finally:
        leader.stop()  # SIGKILL, and reaped: the pid is gone
    started = time.monotonic()
    with pytest.raises(LeaderFailed):
        next(chunks)
    assert time.monotonic() - started < 1
    follower.close()
    assert isinstance(c.join("key"), Leader)


def test_greenlets_with_the_default_gevent_sleep(tmp_path: Path) -> None:
    import gevent

    c = Coalescer(str(tmp_path))  # polls with gevent.sleep
    leader = lead(c)
    follower = follow(c)
    got: list[bytes] = []

    def follow_it() -> None:
        assert follower.wait_head(5) == (200, HEAD)
        got.extend(follower.chunks(5))
        follower.close()

    def lead_it() -> None:
        leader.publish_head(200, HEAD)
        for i in range(3):
            gevent.sleep(0.01)
            leader.publish_chunk(b"%d" % i)
            gevent.sleep(0.01)
            assert got == [b"%d" % n for n in range(i + 1)]  # delivered while we still run
        leader.finish(True)

    gevent.joinall([gevent.spawn(follow_it), gevent.spawn(lead_it)], raise_error=True, timeout=5)
    assert got == [b"0", b"1", b"2"]
    assert rows(c) == (0, 0, 0)


def test_a_full_journal_fails_the_flight_not_the_leader(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script, map_size=256 * 1024)
    leader = lead(a)
    follower = follow(b)
    leader.publish_head(200, HEAD)
    assert leader.has_followers
    assert follower.wait_head(1) == (200, HEAD)
    leader.publish_chunk(b"x" * 1024 * 1024)  # does not fit the map: no exception here
    assert getattr(leader, "has_followers") is False  # noqa: B009 - not narrowed by the assert above
    leader.publish_chunk(b"more")
    leader.finish(True)
    with pytest.raises(LeaderFailed, match="failed"):
        next(follower.chunks(5))
    follower.close()
    assert rows(a) == (0, 0, 0)


def test_unusable_directory_gives_a_detached_leader(tmp_path: Path, clock: FakeClock, script: Script) -> None:
    (tmp_path / "inflight").write_text("not a directory")
    a, _ = pair(tmp_path, clock, script)
    leader = a.join("k")
    assert isinstance(leader, Leader) and leader.token is None
    leader.publish_head(200, HEAD)  # all no-ops: the request simply goes alone
    leader.publish_chunk(b"x")
    leader.finish(True)


# ----------------------------------------------------------------------------- bounds (issue #12)


def journal_rows(c: Coalescer) -> int:
    return rows(c)[2]


def test_past_max_bytes_alone_the_flight_ends_and_nothing_is_kept(tmp_path: Path, clock: FakeClock,
                                                                   script: Script) -> None:
    a, b = pair(tmp_path, clock, script, max_bytes=1000)
    leader = lead(a)
    leader.publish_head(200, HEAD)
    for _ in range(9):
        leader.publish_chunk(b"x" * 100)
    assert not leader.finished and len(leader._pending) == 10  # a follower may still join
    leader.publish_chunk(b"x" * 200)  # 1100 bytes: past the bound
    assert leader.finished and leader._pending == []
    assert rows(a) == (0, 0, 0)
    for _ in range(1000):
        leader.publish_chunk(b"x" * 100)  # relayed by the proxy, kept by nobody
    assert leader._pending == [] and rows(a) == (0, 0, 0)
    assert isinstance(b.join("k"), Leader)  # a later request does not join an answer it cannot get whole
    leader.finish(True)


def test_past_max_bytes_followers_get_everything_and_the_journal_stays_bounded(
        tmp_path: Path, clock: FakeClock, script: Script) -> None:
    a, b = pair(tmp_path, clock, script, max_bytes=1000)
    leader = lead(a)
    leader.publish_head(200, HEAD)
    leader.publish_chunk(b"start")
    followers = [follow(b), follow(b)]
    leader.publish_chunk(b"then")  # journals everything so far, now that someone follows
    streams = []
    for f in followers:
        assert f.wait_head(5) == (200, HEAD)
        streams.append(f.chunks(5))
    got: list[list[bytes]] = [[], []]
    sent = [b"start", b"then"]
    most = 0
    for i in range(300):  # 30 KB through a 1000-byte bound
        chunk = b"%04d" % i + b"y" * 96
        leader.publish_chunk(chunk)
        sent.append(chunk)
        for n, stream in enumerate(streams):
            while len(got[n]) < len(sent):
                got[n].append(next(stream))
        if i >= 10:  # past the bound (before it, up to max_bytes is kept for late joiners)
            most = max(most, journal_rows(a))
        assert leader._pending == []  # nothing kept in memory once journaled
    assert most <= 3, most  # only what a follower has not read yet (head, the chunk, one in between)
    assert isinstance(a.join("k"), Leader)  # capped: a new request starts its own flight
    leader.finish(True)
    for n, stream in enumerate(streams):
        assert list(stream) == []
        assert got[n] == sent
    for f in followers:
        f.close()


def test_a_slow_follower_holds_back_only_what_it_has_not_read(tmp_path: Path, clock: FakeClock,
                                                              script: Script) -> None:
    a, b = pair(tmp_path, clock, script, max_bytes=10)
    leader = lead(a)
    leader.publish_head(200, HEAD)
    fast, slow = follow(b), follow(b)
    leader.publish_chunk(b"go")
    assert fast.wait_head(5) and slow.wait_head(5)
    fast_stream, slow_stream = fast.chunks(5), slow.chunks(5)
    assert next(fast_stream) == next(slow_stream) == b"go"
    for i in range(50):
        leader.publish_chunk(b"%02d" % i * 10)
        assert next(fast_stream) == b"%02d" % i * 10
    assert journal_rows(a) >= 50  # the slow one has read nothing yet
    assert [next(slow_stream) for _ in range(50)] == [b"%02d" % i * 10 for i in range(50)]
    leader.publish_chunk(b"end")
    assert next(fast_stream) == next(slow_stream) == b"end"
    leader.publish_chunk(b"more")  # the next write drops what both have read
    assert journal_rows(a) <= 2
    leader.finish(True)
    fast.close()
    slow.close()


def test_a_leader_that_cannot_write_is_noticed_without_any_write(tmp_path: Path, clock: FakeClock,
                                                                  script: Script) -> None:
    """A full disk: the failed publish cannot be followed by a write marking the flight failed
    (here ``_abandon`` does nothing, as its write would fail too); the follower notices within
    a poll through the leader's lock, and a new request leads a flight of its own."""
    a, b = pair(tmp_path, clock, script, map_size=256 * 1024)
    leader = lead(a)
    leader._abandon = lambda: None  # type: ignore[method-assign]
    follower = follow(b)
    leader.publish_head(200, HEAD)
    assert follower.wait_head(1) == (200, HEAD)
    chunks = follower.chunks(60)
    leader.publish_chunk(b"x" * 1024 * 1024)  # does not fit: the publish fails
    assert leader.finished
    sleeps = script.sleeps
    with pytest.raises(LeaderFailed, match="stopped publishing"):
        next(chunks)
    assert script.sleeps - sleeps <= 1  # noticed at the first poll, not after read_timeout_s
    c = b.join("k")
    assert isinstance(c, Leader)  # nobody joins the dead flight
    c.finish(False)
    follower.close()


def test_explain_names_a_full_file_system(tmp_path: Path) -> None:
    from ntonix.cache.lmdb_env import StoreError, explain

    class Full:
        f_bavail, f_frsize = 3, 4096

    class Roomy:
        f_bavail, f_frsize = 10**6, 4096

    err = StoreError("lmdb: mdb_txn_commit: Input/output error")
    assert explain(err, str(tmp_path), statvfs=lambda p: Full()) == (
        f"lmdb: mdb_txn_commit: No space left on device (12288 bytes free on the file system of {tmp_path})")
    assert explain(err, str(tmp_path), statvfs=lambda p: Roomy()) == str(err)
    other = StoreError("lmdb: MDB_MAP_FULL")
    assert "No space left on device" in explain(other, str(tmp_path / "missing" / "x"), statvfs=lambda p: Full())
