"""Request coalescing across the worker processes of one host, through an LMDB journal.

Theory of operation
-------------------
Identical cacheable requests (same cache key) that are in flight at the same time should
reach a backend once, whichever workers they landed on. An LMDB environment (its own, in
``<directory>/inflight``, so journal writes never wait on cache writes) holds:

* ``inflight``: key -> token of the flight currently answering it
* ``flights``:  token -> (leader pid, heartbeat, followers, records published, state, key)
* ``journal``:  token + sequence number -> record; record 0 is the head (status, headers),
  the others are the body's chunks in order
* ``readers``:  token + follower id -> (pid, next record to read): what each follower still
  needs, so that a capped flight (below) can drop what every follower has read

``join(key)`` (registering at once) is one write transaction: if the key has a live
running flight, register as a follower (``followers += 1``) and get a :class:`Follower`;
otherwise (none, finished, or its leader is stale: pid gone or no heartbeat for
``stale_after_s``) start a new flight and get a :class:`Leader`. A stale flight taken over
is marked failed so its followers stop.

The leader keeps the head and chunks in memory (the proxy does so anyway to store the
answer) and writes the journal only once a follower exists: before each chunk it reads the
follower count (~1 µs); the first time it is non-zero it writes everything so far, then
each chunk as it comes. Without followers a request costs two writes (join, finish) and one
read per chunk. ``finish`` publishes what is missing and marks the flight done or failed in
the same transaction as it reads the follower count, so a follower can never miss it.
Followers poll (every ``poll_interval_s``, sleeping with gevent) and read records they have
not seen; the flight and its journal are deleted by whoever leaves last, leader or follower.

Bounded (issue #12): the leader keeps in memory only records no follower has been sent,
and at most ``max_bytes`` of body (``cache.max_entry_bytes``). Past that the flight is
*capped*: its key leaves ``inflight`` (a later request could not be given the start any
more, so it starts a flight of its own); with no follower the flight simply ends (the
leader's client is served as usual); with followers, the leader goes on journaling each
chunk as it comes, followers note their progress in ``readers`` after each batch they read,
and the leader deletes every record all of them have read. Memory and journal stay bounded
by ``max_bytes`` plus what the slowest attached follower has not read yet.

Unregistered leaders (issue #14; ``lazy=True``, as the gateway runs it): almost no miss ever
gets a follower, so a leader starts outside the journal: ``join`` announces it on the board
(``ntonix.cache.board``, one slot in shared memory: key hash, pid, flight serial, state, want)
and writes nothing to LMDB, takes no lock; a solo miss costs no journal transaction at all (it
was two writes and a read per chunk, plus a liveness lock taken and released). A second request
for the key in the same process registers the leader (the write ``join`` used to do) and
follows it through the journal; one in another worker finds the slot, raises its ``want``,
rings the leader's bell and waits; the leader's process checks its bell every
``poll_interval_s`` and registers the flights that are wanted. The leader keeps what it
published meanwhile (up to ``max_bytes``), so a follower still gets the answer from its
first byte. A flight registered this way is *reserved*: a request that raised ``want`` takes
its seat by the flight's token (pid and serial, both in the slot), even after the flight ended,
so it is kept until the sweep (``RESERVE_S``) rather than deleted by the last one out.

The handshake. Invariant: *a request that raised ``want`` on a leader's slot either takes a
seat, by token, in the flight that leader registered (whatever its outcome: a 200, an error, an
answer finished for it after the leader's client left), or that leader left the board before
the want was raised, registering nothing for it; and at most one request at a time is
announced as a key's leader on the host.* It holds by construction, not by timing: every
decision on a slot is taken under the journal's writer lock (``Coalescer._lock``: LMDB's robust
process-shared mutex, a write transaction begun and aborted, ~0.3 µs), so the decisions are
totally ordered: the election (read the slot; announce, or follow the live leader it names),
a follower raising ``want``, and the leader leaving the board (an error head: no later request
may follow; the answer complete; the in-memory bound reached). Leaving, the leader reads
``want``: zero, it clears the slot, and any later ``want`` finds the slot gone and the request
goes on anew (a 200 is in the cache by then: stored before ``finish``); non-zero, it marks the
slot ENDING, registers the flight (reserved), then clears the slot, and the waiting requests
look the token up once the slot no longer says RUNNING or ENDING. A leader that dies leaves its
slot (LMDB frees the lock); followers test its pid. A registered leader's end is ordered by the
journal's own transactions as before. A leader whose answer fails (``finish(False)``) registers
nothing: requests that wanted it lead or follow anew, as followers of a failed flight do.

What is left to chance costs only a second backend call, never a wrong or lost answer: a key
whose slot another key overwrote (65,536 slots) is not seen; a follower whose seat comes after
its flight was capped (past ``max_bytes``) or failed goes to a backend itself.

Staleness: the leader refreshes its heartbeat at most once a second, but only while it
publishes, so ``stale_after_s`` must exceed the longest silence of a live backend (the
proxy's read timeout). A dead leader, and a live one that stopped publishing (a failed
write: disk full), is noticed at once through its liveness lock (``ntonix.cache.flight_lock``),
which needs no write: a leader that cannot write cannot mark its flight failed either.
Followers test it whenever they find nothing new, ``join`` before following, so nobody
joins a flight that cannot be written. Only registered flights hold that lock (taken in the
transaction that registers them): an unregistered leader has nobody to tell, and a request
waiting for one tests its pid; if registering fails (disk full), the leader goes on alone and
the waiting requests, finding no flight, go to a backend themselves. Transactions never span
a sleep or a ``yield``: records are copied out first.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import xxhash

from ntonix.cache.board import FILE as BOARD_FILE
from ntonix.cache.board import REGISTERED, Board, Seen
from ntonix.cache.flight_lock import LeaderLocks
from ntonix.cache.lmdb_env import MiB, StoreError, ensure_private_dir, explain, open_env, translated
from ntonix.core.cache_entry import Headers
from ntonix.pid import Process

if TYPE_CHECKING:
    import lmdb
    from lmdb import _Database

    Txn = lmdb.Transaction[bytes]

log = logging.getLogger("ntonix.cache")

_RECORD = struct.Struct(">IdIIB")  # pid, heartbeat (wall clock), followers, published, state
_READER = struct.Struct(">II")  # follower's pid, next record it reads
_FOLLOWERS_AT = struct.calcsize(">Id")  # where the follower count sits in a flight record
_COUNT = struct.Struct(">I")
_TOKEN = struct.Struct(">II")  # a flight token: leader's pid, per-process counter
RUNNING, DONE, FAILED = 0, 1, 2
_CAPPED = 0x10  # flag in the state byte: past max_bytes, records are dropped once read
# Flag in the state byte: registered for followers on other workers who may not have taken
# their seat yet; kept after it ends, even with no follower, until the sweep (RESERVE_S later).
_RESERVED = 0x20
RESERVE_S = 5.0
_LAG_BYTES = 2 * MiB  # a capped flight's leader waits while a follower is further behind
_READ_BYTES = 512 * 1024  # what a follower copies out of the journal at once (at least a record)
_HEARTBEAT_S = 1.0
_WARN_EVERY_S = 60.0
_REGISTER_WAIT_S = 1.0  # how long a request waits for an announced leader to register


class LeaderFailed(Exception):
    """The leader failed, vanished or went silent: the follower's answer cannot be completed."""


class _Flight(NamedTuple):
    pid: int
    heartbeat: float
    followers: int
    published: int
    state: int
    key: bytes
    capped: bool = False
    reserved: bool = False

    def pack(self) -> bytes:
        state = self.state | (_CAPPED if self.capped else 0) | (_RESERVED if self.reserved else 0)
        return _RECORD.pack(self.pid, self.heartbeat, self.followers, self.published, state) + self.key

    @classmethod
    def unpack(cls, raw: bytes) -> _Flight:
        pid, heartbeat, followers, published, state = _RECORD.unpack_from(raw)
        return cls(pid, heartbeat, followers, published, state & ~(_CAPPED | _RESERVED), raw[_RECORD.size :],
                   bool(state & _CAPPED), bool(state & _RESERVED))


class _Handles(NamedTuple):
    env: lmdb.Environment
    inflight: _Database
    flights: _Database
    journal: _Database
    readers: _Database
    locks: LeaderLocks


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gevent_sleep(seconds: float) -> None:
    import gevent

    gevent.sleep(seconds)


class Coalescer:
    """Decides, per key, who goes to the backend (:class:`Leader`) and who follows."""

    def __init__(self, directory: str, poll_interval_s: float = 0.005, stale_after_s: float = 120.0, *,
                 sleep: Callable[[float], None] = _gevent_sleep, clock: Callable[[], float] = time.time,
                 is_alive: Callable[[int], bool] = pid_alive, map_size: int = 1024 * MiB,
                 max_bytes: int = 4 * MiB, lazy: bool = False) -> None:
        self.path = os.path.join(directory, "inflight")
        self.poll_interval_s, self.stale_after_s = poll_interval_s, stale_after_s
        self.sleep, self.clock, self.is_alive = sleep, clock, is_alive
        self.map_size = map_size
        self.max_bytes = max_bytes
        self._pid = -1
        self._handles: _Handles | None = None
        self._swept_at = 0.0
        self._warned: dict[str, float] = {}
        # Lazy registration (module docstring, "Unregistered leaders"): this process's leaders
        # not in the journal yet, by key; the board; the bell as last seen; the tick's timer.
        self.lazy = lazy
        self._local: dict[str, Leader] = {}
        self._board: Board | None = None
        self._board_pid = -1
        self._bell_seen = 0
        self._timer: object | None = None
        self._timer_pid = -1
        self._serial = -1
        self._serial_pid = -1
        self._reserved_ended_at = 0.0  # when a reserved flight last ended here (0: swept since)

    def handles(self) -> _Handles:
        if self._handles is None or self._pid != Process.pid:
            env = open_env(self.path, self.map_size, max_dbs=6)
            inflight, flights, journal, readers = (env.open_db(name)
                                                   for name in (b"inflight", b"flights", b"journal", b"readers"))
            locks = LeaderLocks(os.path.join(self.path, "leaders.lock"))
            locks.held(b"\0" * 8)  # opens the lock file now: a failure means no coalescing
            self._handles = _Handles(env, inflight, flights, journal, readers, locks)
            self._pid = Process.pid
        return self._handles

    def stale(self, token: bytes, flight: _Flight, now: float) -> bool:
        """Is the flight's leader gone, silent too long, or no longer publishing?"""
        # A live leader beats at most once a second, so allow that much on top.
        return (now - flight.heartbeat > self.stale_after_s + _HEARTBEAT_S or not self.is_alive(flight.pid)
                or not self.handles().locks.held(token))

    def join(self, key: str) -> Leader | Follower:
        """Follow the live flight for ``key``, or lead a new one: unregistered (nothing written,
        module docstring) when ``lazy``, else registered at once (one write transaction)."""
        if self.lazy:
            for _ in range(3):  # each round waited for a leader that ended without us
                role = self._join_lazily(key)
                if role is None:
                    role = self._join_journal(key, lead=False)
                if role is not None:
                    return role
        role = self._join_journal(key, lead=True)
        assert role is not None
        return role

    def _join_journal(self, key: str, *, lead: bool) -> Leader | Follower | None:
        """Follow the key's live flight in the journal; else lead it, registered (``lead``), or
        ``None``. A journal that cannot be used gives a leader nobody can follow."""
        k = key.encode()
        now = self.clock()
        mine: bytes | None = None
        try:
            self._maybe_sweep(now)
            with translated():
                h = self.handles()
                with h.env.begin(write=True) as txn:
                    live = live_flight(self, h, txn, k, now)
                    if live is not None:
                        token, flight = live
                        return self._add_follower(h, txn, token, flight)
                    if not lead:
                        return None
                    mine = self.token()
                    if not start_flight(h, txn, k, mine, now, joinable=True):
                        mine = None
                        return Leader(self, key, None)
            return Leader(self, key, mine)
        except BaseException as exc:
            if mine is not None and self._handles is not None:
                self._handles.locks.release(mine)
            if not isinstance(exc, StoreError):
                raise
            self.warn("coalesce.unavailable", exc)
            return Leader(self, key, None)  # nobody can follow: the request just goes alone

    def _add_follower(self, h: _Handles, txn: Txn, token: bytes, flight: _Flight) -> Follower:
        txn.put(token, flight._replace(followers=flight.followers + 1).pack(), db=h.flights)
        fid = self.token()[4:]
        txn.put(token + fid, _READER.pack(Process.pid, 0), db=h.readers)
        return Follower(self, token, fid)

    def _maybe_sweep(self, now: float) -> None:
        if now - self._swept_at > min(self.stale_after_s, RESERVE_S):
            self._swept_at = now
            self.sweep()

    def serial(self) -> int:
        """The next flight serial of this process. It starts at random, so a restarted worker
        that gets an old pid back does not reuse the tokens of a flight its predecessor left."""
        if self._serial_pid != Process.pid:
            self._serial_pid, self._serial = Process.pid, int.from_bytes(secrets.token_bytes(4), "big")
        self._serial = (self._serial + 1) & 0xFFFFFFFF
        return self._serial

    def token(self) -> bytes:
        """A flight token unique on this host: pid and a per-process serial (8 bytes)."""
        return _TOKEN.pack(Process.pid, self.serial())

    # -- unregistered leaders -------------------------------------------------------------

    def board(self) -> Board:
        if self._board is None or self._board_pid != Process.pid:
            self._board = Board(os.path.join(ensure_private_dir(self.path), BOARD_FILE))
            self._board_pid = Process.pid
        return self._board

    def _join_lazily(self, key: str) -> Leader | Follower | None:
        """A new unregistered leader for ``key``, a follower of another worker's leader that
        registered for us, or ``None``: then look in the journal (a leader of ours or another
        worker's is registered for the key by then, or ended without us)."""
        local = self._local.get(key)
        if local is not None:
            local.register()  # a follower in our own process: it reads the journal
            return None
        try:
            board = self.board()
        except OSError as exc:
            self.warn("coalesce.unavailable", StoreError(f"cache directory: {exc}"))
            return None
        except StoreError as exc:  # e.g. the folder belongs to another user
            self.warn("coalesce.unavailable", exc)
            return None
        h = key_hash(key)
        pid = Process.pid
        try:
            lock = self._lock()
        except StoreError as exc:
            self.warn("coalesce.unavailable", exc)
            return None
        try:  # the election: one at a time on the host (the journal's writer lock)
            seen = board.peek(h)
            if seen is not None and seen.pid != pid and self.is_alive(seen.pid):
                if seen.state == REGISTERED:
                    return None
                follow: Seen | None = seen
            elif seen is not None and seen.pid == pid and seen.state == REGISTERED:
                return None  # registered by a leader of ours: it is in the journal
            else:
                follow = None
                serial = self.serial()
                board.announce(h, pid, serial)
        finally:
            lock.abort()
        if follow is not None:
            return self._await_leader(board, h, follow)
        leader = Leader(self, key, None, board_hash=h, serial=serial)
        self._local[key] = leader
        self._arm()
        return leader

    def _lock(self) -> Txn:
        """The coalescing journal's writer lock, held by a write transaction nothing is written
        in (abort it to let go): LMDB's robust process-shared mutex, ~0.3 µs uncontended, freed
        by LMDB if its holder dies. Board decisions are taken under it (ntonix.cache.board)."""
        with translated():
            return self.handles().env.begin(write=True)

    def _await_leader(self, board: Board, h: int, seen: Seen) -> Follower | None:
        """Raise ``want`` on another worker's unregistered leader, wait (bounded) until it has
        decided, and take a seat in its flight if it registered one; ``None`` if it ended
        without us (module docstring, "The handshake")."""
        pid, serial = seen.pid, seen.serial
        try:
            lock = self._lock()
        except StoreError:
            return None  # no journal to follow through
        try:
            wanting = board.want(h, pid, serial)  # ordered with the leader's leave by the lock
        finally:
            lock.abort()
        deadline = self.clock() + _REGISTER_WAIT_S
        while wanting:
            now = board.peek(h)
            if now is None or (now.pid, now.serial) != (pid, serial) or now.state == REGISTERED:
                break  # it decided: registered (for us or anyone), or left the board
            if not self.is_alive(pid):
                break
            if self.clock() >= deadline:
                # Nobody answered: e.g. a slot left by a killed worker whose pid a live process
                # has now. Clear it, so that the next request for the key does not wait again.
                self._clear(board, h, pid, serial)
                break
            self.sleep(self.poll_interval_s)
        return self._seat(_TOKEN.pack(pid, serial))

    def _seat(self, token: bytes) -> Follower | None:
        """A follower of flight ``token`` if it is in the journal and can still be read from
        its first record (not failed, not capped, its leader alive), else ``None``."""
        now = self.clock()
        try:
            self._maybe_sweep(now)
            with translated():
                h = self.handles()
                with h.env.begin(write=True) as txn:
                    raw = txn.get(token, db=h.flights)
                    if raw is None:
                        return None
                    flight = _Flight.unpack(raw)
                    if (flight.state == FAILED or flight.capped
                            or (flight.state == RUNNING and self.stale(token, flight, now))):
                        return None
                    return self._add_follower(h, txn, token, flight)
        except StoreError as exc:
            self.warn("coalesce.unavailable", exc)
            return None

    def wanted(self, leader: Leader) -> bool:
        """Has a request on another worker raised ``want`` on ``leader``'s slot?"""
        board = self._board
        return (board is not None and self._board_pid == Process.pid and leader.board_hash != 0
                and board.wanted(leader.board_hash, Process.pid, leader.serial))

    def _forget(self, leader: Leader) -> None:
        """``leader`` is off the board: off the local map, its slot cleared."""
        if self._local.get(leader.key) is leader:
            del self._local[leader.key]
        if leader.board_hash and self._board is not None and self._board_pid == Process.pid:
            self._clear(self._board, leader.board_hash, Process.pid, leader.serial)
        leader.lazy, leader.board_hash = False, 0

    def _clear(self, board: Board, h: int, pid: int, serial: int) -> None:
        """Clear a slot under the writer lock: never a newer announcement in the same slot."""
        try:
            lock = self._lock()
        except StoreError:
            board.clear(h, pid, serial)  # no journal, so nobody can be following through it
            return
        try:
            board.clear(h, pid, serial)
        finally:
            lock.abort()

    def stores(self) -> int | None:
        """The board's store counter (ntonix.cache.board), or None without a board (not lazy, or
        it cannot be opened): a request reads it before its look in L2 and again once it leads;
        the same value means nothing was stored in L2 meanwhile."""
        if not self.lazy:
            return None
        try:
            return self.board().stores()
        except (OSError, StoreError):
            return None

    def stored(self) -> None:
        """An answer went into L2 (called once its transaction committed): move the board's ends
        counter under the writer lock, so that a request which looked in L2 before that looks
        again after its join (ntonix.cache.board). One lock per batched L2 write."""
        if not self.lazy:
            return
        try:
            board = self.board()
        except (OSError, StoreError):
            return
        try:
            lock = self._lock()
        except StoreError:
            board.count_store()  # no lock to be had: a lost update costs a duplicate request at worst
            return
        try:
            board.count_store()
        finally:
            lock.abort()

    def tick(self) -> None:
        """Every poll interval while this process has unregistered leaders: if another worker
        rang our bell, register the flights it wants (in a greenlet: this runs in the hub)."""
        if not self._local:
            self._disarm()
            return
        board = self.board()
        bell = board.bell(Process.pid)
        if bell != self._bell_seen:
            self._bell_seen = bell
            import gevent

            gevent.spawn(self.register_wanted)
        if self._reserved_ended_at and self.clock() - self._reserved_ended_at > RESERVE_S:
            # Reserved flights are swept once their seats can no longer come (RESERVE_S).
            self._reserved_ended_at = 0.0
            import gevent

            gevent.spawn(self._sweep_quietly)

    def _sweep_quietly(self) -> None:
        try:
            self._swept_at = self.clock()
            self.sweep()
        except StoreError as exc:
            self.warn("coalesce.unavailable", exc)

    def register_wanted(self) -> int:
        """Register every unregistered leader of ours some request on the board waits for."""
        n = 0
        for leader in list(self._local.values()):
            if self.wanted(leader):
                leader.register()
                n += 1
        return n

    def _arm(self) -> None:
        if self._timer is None or self._timer_pid != Process.pid:
            import gevent

            self._timer = gevent.get_hub().loop.timer(self.poll_interval_s, self.poll_interval_s)
            self._timer_pid = Process.pid
        timer: Any = self._timer
        if not timer.active:
            timer.start(self.tick)

    def _disarm(self) -> None:
        timer: Any = self._timer
        if timer is not None and self._timer_pid == Process.pid:
            timer.stop()

    def warn(self, event: str, exc: StoreError) -> None:
        """Log a journal failure, each kind at most once a minute per process (a full disk
        fails every request: one line per request would flood the log)."""
        now = time.monotonic()
        if now - self._warned.get(event, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned[event] = now
            log.warning(event, extra={"path": self.path, "error": explain(exc, self.path)})

    def sweep(self) -> int:
        """Remove flights nobody will finish or read any more; returns how many."""
        now = self.clock()
        removed = 0
        with translated():
            h = self.handles()
            with h.env.begin(write=True) as txn:
                for token, raw in list(txn.cursor(db=h.flights)):
                    flight = _Flight.unpack(raw)
                    # A finished flight kept for followers who wanted it (RESERVE_S), or one
                    # whose followers died without closing (stale_after_s).
                    keep_s = RESERVE_S if flight.reserved and flight.followers == 0 else self.stale_after_s
                    if flight.state != RUNNING and now - flight.heartbeat > keep_s:
                        drop(h, txn, token, flight.key)  # its followers died without closing
                        removed += 1
                    elif flight.state == RUNNING and self.stale(token, flight, now):
                        removed += settle(h, txn, token, flight._replace(state=FAILED))
        return removed

    def __repr__(self) -> str:
        return f"<Coalescer {self.path} poll={self.poll_interval_s}s stale_after={self.stale_after_s}s>"


def live_flight(c: Coalescer, h: _Handles, txn: Txn, k: bytes, now: float) -> tuple[bytes, _Flight] | None:
    """The running flight for key ``k`` with a live leader; a stale one is failed (its
    followers stop) and ``None`` returned."""
    token = txn.get(k, db=h.inflight)
    raw = txn.get(token, db=h.flights) if token is not None else None
    if token is None or raw is None:
        return None
    flight = _Flight.unpack(raw)
    if flight.state == RUNNING and not c.stale(token, flight, now):
        return token, flight
    if flight.state == RUNNING:  # its leader is gone: stop its followers
        settle(h, txn, token, flight._replace(state=FAILED))
    return None


def start_flight(h: _Handles, txn: Txn, k: bytes, token: bytes, now: float, *, joinable: bool,
                 reserved: bool = False) -> bool:
    """Make ``token`` a running flight answering ``k`` (False: its liveness lock cannot be held),
    the key's flight for new requests if ``joinable`` (else only followers given the token join
    it). The lock is held before the flight is visible (nobody reads it before we commit), so a
    running flight without its lock is always a dead one."""
    if not h.locks.hold(token):
        return False
    if joinable:
        txn.put(k, token, db=h.inflight)
    txn.put(token, _Flight(Process.pid, now, 0, 0, RUNNING, k, reserved=reserved).pack(), db=h.flights)
    return True


def settle(h: _Handles, txn: Txn, token: bytes, flight: _Flight) -> int:
    """Write ``flight``; if it is over and nobody follows it, delete it (returns 1 if so)."""
    if flight.state == RUNNING:
        txn.put(token, flight.pack(), db=h.flights)
        return 0
    if txn.get(flight.key, db=h.inflight) == token:
        txn.delete(flight.key, db=h.inflight)
    if flight.followers > 0 or flight.reserved:  # a reserved one waits for the sweep
        txn.put(token, flight.pack(), db=h.flights)
        return 0
    drop(h, txn, token, flight.key)
    return 1


def drop(h: _Handles, txn: Txn, token: bytes, key: bytes) -> None:
    if txn.get(key, db=h.inflight) == token:
        txn.delete(key, db=h.inflight)
    txn.delete(token, db=h.flights)
    clear_journal(h, txn, token)
    with txn.cursor(db=h.readers) as cur:
        if cur.set_range(token):
            while cur.key()[:8] == token and cur.delete():
                pass


def clear_journal(h: _Handles, txn: Txn, token: bytes) -> None:
    with txn.cursor(db=h.journal) as cur:
        if cur.set_range(token):
            while cur.key()[:8] == token and cur.delete():
                pass


def least_needed(c: Coalescer, h: _Handles, txn: Txn, token: bytes, default: int) -> int:
    """The first record some live follower of ``token`` has not read (``default`` if none);
    followers whose process is gone are forgotten."""
    low = default
    gone = []
    with txn.cursor(db=h.readers) as cur:
        if cur.set_range(token):
            for rkey, raw in cur:
                if rkey[:8] != token:
                    break
                pid, nxt = _READER.unpack(raw)
                if c.is_alive(pid):
                    low = min(low, nxt)
                else:
                    gone.append(rkey)
    for rkey in gone:
        txn.delete(rkey, db=h.readers)
    return low


def key_hash(key: str) -> int:
    """The key's slot hash on the board (never 0: 0 marks an empty slot)."""
    return xxhash.xxh3_64_intdigest(key.encode()) | 1


def _seq(token: bytes, n: int) -> bytes:
    return token + n.to_bytes(4, "big")


class Leader:
    """The request that goes to the backend and publishes its answer to any followers.

    Journal failures never reach the leader's own client: the leader then stops publishing
    and lets go of its liveness lock, so its followers notice within a poll and fetch the
    answer themselves.
    """

    def __init__(self, coalescer: Coalescer, key: str, token: bytes | None, board_hash: int = 0,
                 serial: int = 0) -> None:
        self._c = coalescer
        self.key, self.token = key, token
        self.board_hash = board_hash  # announced on the board under this hash (0: not)
        self.serial = serial  # the flight's serial on the board (its token once registered)
        self.lazy = bool(board_hash)  # not in the journal (yet): nobody can follow
        # Records not in the journal yet; the head as (status, headers), JSON-encoded only if it
        # is written (most flights never are: nobody follows).
        self._pending: list[bytes | tuple[int, Headers]] = []
        self._published = 0  # records in the journal (the first pending one's number)
        self._trimmed = 0  # journal records below this were read by every follower and dropped
        self._kept: deque[int] = deque()  # sizes of journal records from _trimmed on (capped)
        self._kept_bytes = 0
        self._bytes = 0  # body bytes taken so far
        self._capped = False
        self._reserved = False  # registered for followers on other workers: journal everything
        self._journaling = False
        self._has_head = False
        self._beat = coalescer.clock()
        self.finished = token is None and not self.lazy

    @property
    def has_followers(self) -> bool:
        """Whether anyone follows (as of the last publish), or wants to (another worker's request
        on the board: the flight is registered for it now): a leader whose own client left may
        keep reading the backend for them."""
        if self.lazy and not self.finished and self._c.wanted(self):
            self.register()
        return self._journaling and not self.finished

    @property
    def solo_on_board(self) -> bool:
        """Announced on the board and not registered: until it leaves, a request for the key on
        any worker of the host waits for it (and then looks in the cache)."""
        return self.lazy and self.token is None and not self.finished

    def publish_head(self, status: int, headers: Headers) -> None:
        if self._has_head:
            raise ValueError("publish_head: the head is already published")
        self._has_head = True
        if not self.finished:
            self._pending.append((status, headers))
            if status != 200:
                # An answer that will not be cached: shared with whoever waits for it already,
                # never with a request arriving from now on.
                if self.lazy:
                    self._leave_board()
                else:
                    self._detach()
            self._sync(None)

    def publish_chunk(self, data: bytes) -> None:
        if not self._has_head:
            raise ValueError("publish_chunk: publish_head first")
        if data and not self.finished:
            self._pending.append(bytes(data))
            self._bytes += len(data)
            if self.lazy and self._bytes > self._c.max_bytes:
                # Past cache.max_entry_bytes: not stored, and too much to keep for a follower who
                # might come: nobody may join from now on (whoever wants it already gets it
                # through the journal). Up to that bound, what is kept here is the very pieces
                # the proxy records for the cache (no second copy), and the leader stays on the
                # board until its answer is stored: an identical request arriving at any moment
                # follows it or finds the answer.
                self._leave_board()
            self._sync(None)

    def finish(self, ok: bool) -> None:
        """End the flight (idempotent): ``ok`` means the answer is complete."""
        if not self.finished:
            complete = ok and bool(self._published or self._pending)
            if self.lazy and complete:
                self._leave_board()  # registers it if a request on another worker wants it
            if self.token is not None:
                self._sync(DONE if complete else FAILED)
            self._end()

    def finish_after(self, ok: bool, defer: Callable[[Callable[[], None]], object]) -> None:
        """:meth:`finish` from the callback ``defer`` is given (the worker's loop turn: after the
        batched L2 write queued before it). Safe there: ending never waits (no journal
        backpressure at the end) and talks to nothing but the journal and the board."""
        defer(functools.partial(self.finish, ok))

    def _leave_board(self) -> None:
        """An unregistered leader stops being joinable: the leader's half of the handshake
        (module docstring). If some request raised ``want``, the flight is registered for it
        (by token only, reserved) before the slot is cleared; otherwise nobody follows."""
        c = self._c
        board = c._board
        wanted = False
        if board is not None and c._board_pid == Process.pid:
            try:
                lock = c._lock()
            except StoreError:
                pass  # nothing can be registered: go alone (a waiting request finds no flight)
            else:
                try:
                    wanted = board.leave(self.board_hash, Process.pid, self.serial)
                finally:
                    lock.abort()
        if wanted:
            self.register(joinable=False)
        else:
            self.board_hash = 0  # cleared by leave (or another key's slot now)
            self._end()

    def register(self, *, joinable: bool = True) -> None:
        """Put an unregistered leader's flight into the journal, so that followers can read it
        (one write transaction, as ``Coalescer.join`` without the board). It is *reserved*:
        requests on other workers that raised ``want`` take their seat by token, maybe after it
        ended, so it is kept until the sweep (``RESERVE_S``) even with no follower left.
        ``joinable``: the key's flight for new requests too. If another worker's flight for the
        key is in the journal already, this one goes on alone. The slot says REGISTERED (or is
        cleared) only after the commit."""
        if not self.lazy or self.finished:
            return
        c = self._c
        if c._local.get(self.key) is self:
            del c._local[self.key]
        k = self.key.encode()
        now = c.clock()
        mine = _TOKEN.pack(Process.pid, self.serial)
        held = False
        try:
            c._maybe_sweep(now)
            with translated():
                hs = c.handles()
                with hs.env.begin(write=True) as txn:
                    # Someone else's flight answering the key already: ours stays private.
                    held = ((not joinable or live_flight(c, hs, txn, k, now) is None)
                            and start_flight(hs, txn, k, mine, now, joinable=joinable, reserved=True))
            if not held:
                self._end()  # after the transaction: clearing the slot takes the writer lock
                return
        except BaseException as exc:
            if held:
                hs.locks.release(mine)
            self._end()
            if not isinstance(exc, StoreError):
                raise
            c.warn("coalesce.unavailable", exc)
            return
        self.token, self._beat = mine, now
        self._reserved = self._journaling = True
        self.lazy = False
        if joinable:
            c.board().set_state(self.board_hash, Process.pid, self.serial, REGISTERED)
        else:
            c._forget(self)

    def close(self) -> None:
        """Mark the flight failed unless :meth:`finish` was called."""
        self.finish(False)

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finish(False)

    def _end(self) -> None:
        """Publish nothing more; let followers know at once (the lock) and free the memory."""
        self.finished = True
        self._pending = []
        if self._reserved:
            self._c._reserved_ended_at = self._c.clock()  # the tick sweeps it RESERVE_S later
        if self.board_hash or self.lazy:
            self._c._forget(self)  # after the journal says DONE: a waiter then finds it stored
        if self.token is not None and self._c._handles is not None:
            self._c._handles.locks.release(self.token)

    def _sync(self, end: int | None) -> None:
        """Publish what followers have not seen (if there are any), beat, cap, or end (``end``)."""
        if self.finished or self.token is None:
            return
        c = self._c
        now = c.clock()
        over = self._bytes > c.max_bytes and not self._capped
        try:
            with translated():
                h = c.handles()
                if not self._journaling and end is None and not over:
                    with h.env.begin() as txn:  # the cheap common case: one read, per chunk
                        raw = txn.get(self.token, db=h.flights)
                    self._journaling = raw is not None and _COUNT.unpack_from(raw, _FOLLOWERS_AT)[0] > 0
                    if raw is None or (not self._journaling and now - self._beat < _HEARTBEAT_S):
                        if raw is None:  # taken over as stale: nobody follows us
                            self._end()
                        return
                with h.env.begin(write=True) as txn:
                    raw = txn.get(self.token, db=h.flights)
                    gone = raw is None or _Flight.unpack(raw).state != RUNNING
                    if not gone:
                        assert raw is not None
                        end = self._publish(h, txn, _Flight.unpack(raw), now, over, end)
                if gone:
                    self._end()  # after the transaction: clearing the slot takes the writer lock
                    return
                if self._capped and self.board_hash:
                    c._forget(self)  # nobody may join a capped flight: new requests lead themselves
                self._beat = now
                if end is not None:
                    self._end()
                elif self._kept_bytes > _LAG_BYTES:
                    self._wait_for_followers()
        except StoreError as exc:
            self._c.warn("coalesce.publish_failed", exc)
            self._end()
            if end is None:
                self._abandon()

    def _publish(self, h: _Handles, txn: Txn, flight: _Flight, now: float, over: bool,
                 end: int | None) -> int | None:
        """``_sync``'s write transaction on a running flight; returns how the flight ends now."""
        assert self.token is not None
        if over:
            self._reserved = False  # nobody can take a seat in a capped flight
        flight = flight._replace(heartbeat=now, reserved=self._reserved)
        self._journaling = flight.followers > 0 or self._reserved
        if over:
            self._cap(h, txn)
            flight = flight._replace(capped=True)
            if not self._journaling and end is None:
                end = FAILED  # nobody follows and nobody can join: nothing to publish
        if self._journaling and end != FAILED:
            self._write(h, txn)
            flight = flight._replace(published=self._published)
        elif self._capped and end is None:
            end = FAILED  # every follower left a capped flight: nobody can join it
        settle(h, txn, self.token, flight if end is None else flight._replace(state=end))
        return end

    def _cap(self, h: _Handles, txn: Txn) -> None:
        """Past ``max_bytes``: no new follower may join (it would need records we drop)."""
        assert self.token is not None
        self._capped = True
        k = self.key.encode()
        if txn.get(k, db=h.inflight) == self.token:
            txn.delete(k, db=h.inflight)

    def _write(self, h: _Handles, txn: Txn) -> None:
        """Journal the pending records; on a capped flight drop what every follower has read."""
        assert self.token is not None
        for pending in self._pending:
            record = pending if isinstance(pending, bytes) else orjson.dumps(pending)
            txn.put(_seq(self.token, self._published), record, db=h.journal)
            self._published += 1
            if self._capped:
                self._kept.append(len(record))
                self._kept_bytes += len(record)
        self._pending = []
        if self._capped:
            self._trim(h, txn)

    def _trim(self, h: _Handles, txn: Txn) -> None:
        assert self.token is not None
        low = least_needed(self._c, h, txn, self.token, self._published)
        for n in range(self._trimmed, low):
            txn.delete(_seq(self.token, n), db=h.journal)
            if self._kept:
                self._kept_bytes -= self._kept.popleft()
        self._trimmed = max(self._trimmed, low)

    def _wait_for_followers(self) -> None:
        """Backpressure on a capped flight: while some follower is more than ``_LAG_BYTES``
        behind, wait for it (polling, a read each time), so that the journal, and the pages
        of it that followers map, stay small; the slowest follower paces the flight, as any
        fan-out. One that does not move for ``stale_after_s / 2`` ends the flight."""
        assert self.token is not None
        c = self._c
        waited_from = c.clock()
        while self._kept_bytes > _LAG_BYTES and not self.finished:
            c.sleep(c.poll_interval_s)
            with translated():
                h = c.handles()
                with h.env.begin(write=True) as txn:
                    self._trim(h, txn)
                    raw = txn.get(self.token, db=h.flights)
                    if raw is not None:  # a beat, so that nobody takes us for stale meanwhile
                        txn.put(self.token, _Flight.unpack(raw)._replace(heartbeat=c.clock()).pack(),
                                db=h.flights)
            if c.clock() - waited_from > c.stale_after_s / 2:
                log.warning("coalesce.followers_too_slow", extra={"path": c.path, "key": self.key})
                self._sync(FAILED)
                self._end()

    def _detach(self) -> None:
        """Take the key off the in-flight index, so that requests arriving from now on start a
        flight of their own: an answer that will not be cached (status other than 200) is shared
        with the followers already waiting for it, but never handed to a later request (e.g. one
        sent after the leader's client already had the whole error) as if it were cached."""
        assert self.token is not None
        try:
            with translated():
                h = self._c.handles()
                k = self.key.encode()
                with h.env.begin(write=True) as txn:
                    if txn.get(k, db=h.inflight) == self.token:
                        txn.delete(k, db=h.inflight)
        except StoreError as exc:
            self._c.warn("coalesce.publish_failed", exc)
        if self.board_hash:
            self._c._forget(self)  # new requests lead themselves (not through the journal)

    def _abandon(self) -> None:
        """Best effort after a failed write (e.g. a full disk): fail the flight, free its journal.
        Followers do not depend on it: the released lock already told them."""
        assert self.token is not None
        try:
            with translated():
                h = self._c.handles()
                with h.env.begin(write=True) as txn:
                    raw = txn.get(self.token, db=h.flights)
                    if raw is not None:
                        settle(h, txn, self.token, _Flight.unpack(raw)._replace(state=FAILED))
                        clear_journal(h, txn, self.token)
        except StoreError:
            pass  # the followers and the sweep clean up

    def __repr__(self) -> str:
        state = "finished" if self.finished else ("journaling" if self._journaling else "running")
        return (f"<Leader {self.key} {state}{' capped' if self._capped else ''} pending={len(self._pending)} "
                f"published={self._published} bytes={self._bytes}>")


class Follower:
    """A request waiting for an identical one in flight; reads the leader's journal."""

    def __init__(self, coalescer: Coalescer, token: bytes, fid: bytes = b"") -> None:
        self._c = coalescer
        self.token, self.fid = token, fid
        self._next = 0
        self.closed = False

    def wait_head(self, timeout_s: float) -> tuple[int, Headers] | None:
        """The leader's status and headers, or ``None`` if it failed, vanished or took longer
        than ``timeout_s`` (the caller then goes to a backend itself)."""
        try:
            head = next(self._records(0, 1, timeout_s))
        except (LeaderFailed, StopIteration):
            return None
        status, headers = orjson.loads(head)
        return int(status), tuple((str(k), str(v)) for k, v in headers)

    def chunks(self, timeout_s: float) -> Iterator[bytes]:
        """The body's chunks as the leader publishes them; ends when the leader finished.

        Raises :class:`LeaderFailed` when the leader failed or vanished, or nothing new came
        for ``timeout_s``.
        """
        return self._records(max(self._next, 1), 256, timeout_s)

    def close(self) -> None:
        """Deregister (idempotent); the last one out deletes a finished flight's journal."""
        if self.closed:
            return
        self.closed = True
        try:
            with translated():
                h = self._c.handles()
                with h.env.begin(write=True) as txn:
                    txn.delete(self.token + self.fid, db=h.readers)
                    raw = txn.get(self.token, db=h.flights)
                    if raw is not None:
                        flight = _Flight.unpack(raw)
                        settle(h, txn, self.token, flight._replace(followers=flight.followers - 1))
        except StoreError:
            pass  # the sweep removes what we could not

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def _progress(self, h: _Handles) -> None:
        """Tell a capped flight's leader which records we no longer need (best effort: if it
        cannot be written, the leader just keeps them longer)."""
        try:
            with translated(), h.env.begin(write=True) as txn:
                txn.put(self.token + self.fid, _READER.pack(Process.pid, self._next), db=h.readers)
        except StoreError:
            pass

    def _records(self, start: int, batch: int, timeout_s: float) -> Iterator[bytes]:
        c = self._c
        last_data = c.clock()
        suspect = False
        while True:
            try:
                with translated():
                    h = c.handles()
                    with h.env.begin() as txn:
                        raw = txn.get(self.token, db=h.flights)
                        flight = _Flight.unpack(raw) if raw is not None else None
                        end = min(flight.published, start + batch) if flight is not None else start
                        records = []
                        size = 0
                        for n in range(start, end):
                            record = txn.get(_seq(self.token, n), b"", db=h.journal)
                            records.append(record)
                            size += len(record)
                            if size >= _READ_BYTES:
                                break
                    if records and flight is not None and flight.capped:
                        self._next = start + len(records)
                        self._progress(h)
            except StoreError as exc:
                raise LeaderFailed(f"coalescing journal failed: {explain(exc, c.path)}") from None
            if flight is None or flight.state == FAILED:
                raise LeaderFailed("the leader's request failed")
            if records:
                start = self._next = start + len(records)
                last_data = c.clock()
                yield from records
                continue
            if flight.state == DONE:
                return
            now = c.clock()
            if c.stale(self.token, flight, now):
                if not suspect:
                    # A leader lets go of its lock just after committing its last records and
                    # DONE: read once more before calling it gone.
                    suspect = True
                    continue
                raise LeaderFailed("the leader's process is gone or stopped publishing")
            suspect = False
            if now - last_data > timeout_s:
                raise LeaderFailed(f"nothing from the leader for {timeout_s:g}s")
            c.sleep(c.poll_interval_s)

    def __repr__(self) -> str:
        return f"<Follower next={self._next} {'closed' if self.closed else 'open'}>"
