"""Unregistered leaders (issue #14): a miss touches the journal only once someone follows."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ntonix.cache.board import FILE as BOARD_FILE
from ntonix.cache.board import REGISTERED, RUNNING, Board
from ntonix.cache.coalescer import Coalescer, Follower, Leader, key_hash
from tests.live.procs import ROOT

HEAD = (("Content-Type", "application/json"),)


def rows(c: Coalescer) -> tuple[int, int, int]:
    """(inflight, flights, journal) row counts."""
    h = c.handles()
    with h.env.begin() as txn:
        return tuple(txn.stat(db)["entries"] for db in (h.inflight, h.flights, h.journal))  # type: ignore[return-value]


def test_a_leader_nobody_follows_never_writes_the_journal(tmp_path: Path) -> None:
    c = Coalescer(str(tmp_path), sleep=time.sleep, lazy=True)
    leader = c.join("k")
    assert isinstance(leader, Leader) and leader.lazy and not leader.finished
    assert c.board().peek(key_hash("k")) is not None  # announced for other workers
    leader.publish_head(200, HEAD)
    leader.publish_chunk(b"{}")
    leader.finish(True)
    assert rows(c) == (0, 0, 0)
    assert c.board().peek(key_hash("k")) is None
    assert isinstance(c.join("k"), Leader)  # the next miss leads again


def test_a_follower_in_the_same_process_registers_the_leader_and_gets_everything(tmp_path: Path) -> None:
    c = Coalescer(str(tmp_path), sleep=time.sleep, lazy=True)
    leader = c.join("k")
    assert isinstance(leader, Leader)
    leader.publish_head(200, HEAD)
    leader.publish_chunk(b"part 1 ")  # before anyone followed: kept, then journaled
    follower = c.join("k")
    assert isinstance(follower, Follower)
    assert not leader.lazy and leader.token is not None
    seen = c.board().peek(key_hash("k"))
    assert seen is not None and seen.state == REGISTERED
    leader.publish_chunk(b"part 2")
    leader.finish(True)
    assert follower.wait_head(1) == (200, HEAD)
    assert b"".join(follower.chunks(1)) == b"part 1 part 2"
    follower.close()
    assert rows(c) == (0, 1, 3)  # reserved for followers on other workers until the sweep
    assert c.board().peek(key_hash("k")) is None


def test_an_error_or_an_oversized_answer_is_never_registered(tmp_path: Path) -> None:
    c = Coalescer(str(tmp_path), sleep=time.sleep, lazy=True, max_bytes=4)
    failed = c.join("e")
    assert isinstance(failed, Leader)
    failed.publish_head(503, HEAD)
    assert failed.finished and c.board().peek(key_hash("e")) is None
    assert isinstance(c.join("e"), Leader)  # a later request does not follow the error
    big = c.join("b")
    assert isinstance(big, Leader)
    big.publish_head(200, HEAD)
    big.publish_chunk(b"12345")  # past max_bytes: nobody could be given the start any more
    assert big.finished and c.board().peek(key_hash("b")) is None
    assert rows(c) == (0, 0, 0)


def test_board_slots_hold_one_leader_per_hash_and_bells_count(tmp_path: Path) -> None:
    board = Board(str(tmp_path / "board"))
    board.announce(7, 100, 5)
    assert board.peek(7) == (100, 5, RUNNING, 0)
    assert board.peek(7 + 4096) is None  # same slot, other hash
    before = board.bell(100)
    board.want(7, 100, 5)
    assert board.peek(7) == (100, 5, RUNNING, 1) and board.bell(100) == before + 1
    assert board.wanted(7, 100, 5) and not board.wanted(7, 100, 6)  # another flight of that worker
    board.clear(7, 101)  # not the owner: left alone
    assert board.set_state(7, 100, 5, REGISTERED) and board.peek(7) == (100, 5, REGISTERED, 1)
    board.clear(7, 100)
    assert board.peek(7) is None and not board.set_state(7, 100, 5, RUNNING)


LAZY_LEADER = r"""
import sys
import time
from ntonix.cache.coalescer import Coalescer
c = Coalescer(sys.argv[1], sleep=time.sleep, lazy=True)
role = c.join("key")
print(type(role).__name__, role.lazy, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "register":
        print(c.register_wanted(), flush=True)
    elif cmd == "answer":
        role.publish_head(200, (("Content-Type", "application/json"),))
        role.publish_chunk(b"{}")
        role.finish(True)
        print("ok", flush=True)
"""


def test_a_follower_in_another_process_rings_and_the_leader_registers(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", LAZY_LEADER, str(tmp_path)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "Leader True"
        asked: list[str] = []

        def sleep(seconds: float) -> None:
            # The leader's worker would notice its bell within a poll interval (its tick).
            proc.stdin.write("register\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            asked.append(proc.stdout.readline().strip())  # type: ignore[union-attr]

        follower = Coalescer(str(tmp_path), sleep=sleep, lazy=True).join("key")
        assert isinstance(follower, Follower)
        assert asked == ["1"]  # the leader registered the one flight we wanted
        proc.stdin.write("answer\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"
        assert follower.wait_head(5) == (200, HEAD)
        assert list(follower.chunks(5)) == [b"{}"]
        follower.close()
    finally:
        proc.kill()
        proc.wait(5)
        proc.stdin.close()
        proc.stdout.close()


def test_consecutive_flight_tokens_have_locks_of_their_own(tmp_path: Path) -> None:
    c = Coalescer(str(tmp_path), sleep=time.sleep)
    locks = c.handles().locks
    first, second = c.token(), c.token()  # same pid, counters one apart
    assert locks.hold(first) and locks.hold(second)
    locks.release(first)
    assert locks.held(second) and not locks.held(first)
    locks.release(second)


def test_an_announcement_nobody_answers_is_waited_for_once(tmp_path: Path) -> None:
    """A slot left by a killed worker whose pid a live process (here: pid 1) now has."""
    slept: list[float] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    c = Coalescer(str(tmp_path), sleep=sleep, clock=lambda: now[0], lazy=True)
    c.board().announce(key_hash("k"), 1, 77)
    first = c.join("k")
    assert isinstance(first, Leader) and first.lazy  # leads itself, announced in the slot it cleared
    assert 0.9 <= sum(slept) <= 1.1
    first.finish(False)
    slept.clear()
    again = c.join("k")
    assert isinstance(again, Leader) and slept == []
    again.finish(False)


def test_a_registered_leader_leaves_the_board_when_capped_or_taken_over(tmp_path: Path) -> None:
    """Clearing the slot takes the journal's writer lock, so it happens after the write
    transaction that capped or found the flight gone (py-lmdb refuses a second one)."""
    c = Coalescer(str(tmp_path), sleep=time.sleep, lazy=True, max_bytes=4)
    leader = c.join("k")
    assert isinstance(leader, Leader)
    follower = c.join("k")  # registers the leader, joinable: the slot says REGISTERED
    assert isinstance(follower, Follower)
    leader.publish_head(200, HEAD)
    leader.publish_chunk(b"12345")  # past max_bytes: capped, off the board
    assert c.board().peek(key_hash("k")) is None and not leader.finished
    follower.close()
    leader.finish(True)

    taken = c.join("t")
    assert isinstance(taken, Leader)
    taken.register()
    h = c.handles()
    assert taken.token is not None
    with h.env.begin(write=True) as txn:  # what a takeover of a stale flight leaves
        txn.delete(taken.token, db=h.flights)
    taken.publish_head(200, HEAD)
    assert taken.finished and c.board().peek(key_hash("t")) is None


def test_the_store_counter_moves_on_each_stored_answer_and_nothing_else(tmp_path: Path) -> None:
    # Proxy._join reads L2 a second time only when this counter moved since its first look.
    c = Coalescer(str(tmp_path), sleep=time.sleep, lazy=True)
    start = c.stores()
    assert start is not None
    leader = c.join("k")
    assert isinstance(leader, Leader)
    leader.publish_head(200, HEAD)
    leader.publish_chunk(b"{}")
    leader.finish(True)
    assert c.stores() == start  # joining and ending move nothing
    c.stored()  # what ResponseCache tells after an L2 write commits
    assert c.stores() == start + 1
    other = Board(str(tmp_path / "inflight" / BOARD_FILE))  # what another worker reads
    assert other.stores() == c.stores()
    assert Coalescer(str(tmp_path / "eager"), lazy=False).stores() is None  # no board: always look again


def test_a_board_that_cannot_be_opened_means_always_look_again(tmp_path: Path) -> None:
    # The review: a cache folder owned by another user raises StoreError (not OSError) from
    # board(); it reached the hit fast path as a 500.
    from ntonix.cache.lmdb_env import StoreError

    c = Coalescer(str(tmp_path), sleep=time.sleep, lazy=True)

    def refused() -> Board:
        raise StoreError("cache directory owned by another user")

    c.board = refused  # type: ignore[method-assign]
    assert c.stores() is None
    c.stored()  # nothing to move, nothing raised
    leader = c.join("k")
    assert isinstance(leader, Leader)
    leader.finish(False)
