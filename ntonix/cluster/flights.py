"""Coalescing across gateways through the Redis they share (issue #17, ADR 0009).

Theory of operation
-------------------
The same shape as :mod:`ntonix.cache.coalescer` (``join(key)`` -> :class:`Leader` | :class:`Follower`),
one level up: the proxy asks this only for keys not already led on its own host, so the
cheap local path stays first. Keys, all under ``prefix`` and all expiring:

* ``k:<key>``     -> ``"<token> <proc>"``: the flight answering ``key`` (``SET NX``-like, in the
  join script); deleted by the leader when it finishes or "detaches" (see below)
* ``a:<proc>``    -> liveness of one gateway process, ``PX lease_s``; set on every join that
  leads and renewed every ``tick_s`` by the process's keeper while it leads anything. A
  process killed with SIGKILL stops renewing: its followers notice within ``lease_s``. After
  any Redis failure the process takes a new ``<proc>``, so a flight whose end may have been
  lost (Redis unreachable at that moment) can never look alive again
* ``f:<token>``   -> how many followers joined (``INCR`` in the join script)
* ``w:<proc>``    -> a set: the tokens of this process's flights that followers joined since its
  keeper last looked (``SADD`` in the join script, ``SPOP`` by the keeper: one command per tick
  whatever the number of flights)
* ``s:<token>``   -> a Redis stream: ``h`` (head: JSON status and headers), ``c`` (a chunk of
  the body), then ``e`` (end: ``1`` complete, ``0`` failed). Followers ``XREAD BLOCK`` from
  ``0-0``, so a late joiner gets everything from the start

Cheap when nobody follows (the common miss): a leader keeps its head and chunks in memory
(bounded by ``max_bytes``) and writes nothing per chunk; it learns of followers from ``w`` (popped
by the keeper every ``tick_s``, or on a publish when no keeper runs), then writes what it has
in one pipeline and each later chunk as it comes. A miss with no follower costs one round
trip of its own (the join script; inside a worker, shared with the other joins of its event-loop
turn, resp.py ``AutoPipeline``) and a share of the keeper's batch that runs the finish script.
``finish`` reads the follower count and ends the
flight in one script, so a follower can never miss the end.

An answer that will not be cached (status other than 200) or grows past ``max_bytes``
detaches: ``k`` is deleted, so requests arriving later start their own flight (they would need
the answer from its start), while followers already reading get it whole. Past
``4 * max_bytes`` (a stream that big is too much to hold in Redis) the followers get a
clean failure, never a silently truncated answer.

Redis slow or down: every call has ``timeout_s`` socket timeouts and no retries; a failure
opens a breaker for ``backoff_s`` during which ``join`` answers "go alone" (a :class:`Leader`
without a flight) at once, without touching the network. No Redis error reaches the caller:
followers see :class:`LeaderFailed` (or ``None`` before the head), leaders stop publishing.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import orjson
import redis

from ntonix.cache.remote import drop_idle
from ntonix.cluster.follower import Follower
from ntonix.cluster.lua import FINISH, SCRIPTS, SHAS
from ntonix.cluster.resp import (
    ERRORS,
    AutoPipeline,
    Command,
    Encoded,
    Pool,
    RespError,
    bulk,
    evalsha,
    redis_py,
)
from ntonix.core.cache_entry import Headers
from ntonix.core.redis_url import redacted
from ntonix.pid import Process

log = logging.getLogger("ntonix.cluster")

PREFIX = "ntonix:flight:"
MiB = 1024 * 1024
_HARD_FACTOR = 4  # followers already reading get at most this times max_bytes
_POP_MAX = 100_000  # tokens of newly followed flights read per tick (more wait for the next)


class _Ending(NamedTuple):
    """A finish the keeper sends with the next batch (one round trip for many misses)."""

    keys: list[str]
    value: str
    ok: int
    records: list[Record]
    size: int
    store: tuple[str, bytes, int] | None  # the answer for the Redis cache tier: SET key value PX ms


# A record held for followers that may come: the head as (status, headers), encoded only if
# somebody reads it (most misses are followed by nobody), or a chunk of the body.
Record = tuple[bytes, "bytes | tuple[int, Headers]"]


def _wire(records: list[Record]) -> list[tuple[bytes, bytes]]:
    """Records as the stream's fields: the head as JSON."""
    return [(kind, orjson.dumps(data) if isinstance(data, tuple) else data) for kind, data in records]


def _finish_call(keys: list[str], value: str, journaling: int, ok: int, grace_ms: int,
                 store: tuple[str, bytes, int] | None,
                 records: list[Record] | None = None) -> Command:
    """The finish script (lua.py FINISH) as EVALSHA's arguments: the answer for the cache tier
    goes in the same script, just before the end (no ``SET`` of its own)."""
    args: list[Any] = [value, journaling, ok, grace_ms, *(store[1:] if store else ("", 0))]
    if records:
        args.extend(x for rec in _wire(records) for x in rec)
    if store:
        keys = [*keys, store[0]]
    return ("EVALSHA", SHAS["finish"], len(keys), *keys, *args)


class _Frames:
    """The parts of the join and finish commands that stay the same for a process identity,
    framed once (resp.py :class:`Encoded`): a miss frames only its own keys and values."""

    def __init__(self, f: Flights) -> None:
        self.proc = f._proc
        self.ascii = f.prefix.isascii()
        self.join = bulk("EVALSHA") + bulk(SHAS["join"])
        self.finish = bulk("EVALSHA") + bulk(SHAS["finish"])
        self.a = bulk(f.prefix + "a:" + f._proc)
        self.join_tail = bulk(str(f.lease_ms)) + bulk(str(f.flight_ttl_ms)) + bulk(f.prefix)
        self.grace = bulk(str(f.grace_ms))


class Flights:
    """Decides, per key, which gateway goes to the backend (:class:`Leader`) and who follows.

    ``spawn`` (e.g. ``gevent.spawn``) starts the per-process keeper on the first join that
    leads; without it, leaders renew on publish only, so a silent backend longer than
    ``lease_s`` makes followers regroup (correct, but the answer is fetched twice).
    """

    def __init__(self, url: str, *, timeout_s: float = 0.05, backoff_s: float = 1.0, lease_s: float = 1.0,
                 tick_s: float = 0.1, block_s: float = 0.25, max_bytes: int = 8 * MiB,
                 flight_ttl_s: float = 600.0, grace_s: float = 60.0, max_followers: int = 256,
                 max_pending_bytes: int = 16 * MiB,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 spawn: Callable[[Callable[[], None]], object] | None = None, prefix: str = PREFIX,
                 lock: Callable[[], AbstractContextManager[Any]] = threading.RLock) -> None:
        self.url, self.prefix = url, prefix
        self.timeout_s, self.backoff_s, self.lease_s, self.tick_s = timeout_s, backoff_s, lease_s, tick_s
        self.block_s, self.max_bytes, self.max_followers = block_s, max_bytes, max_followers
        self.max_pending_bytes = max_pending_bytes
        self.flight_ttl_ms, self.grace_ms = int(flight_ttl_s * 1000), int(grace_s * 1000)
        self.lease_ms = int(lease_s * 1000)
        self.clock, self.sleep, self.spawn = clock, sleep, spawn
        self.lock = lock  # each leader's (a gevent worker sets gevent's: ntonix/gateway/runtime.py)
        # Set inside a gevent worker: greenlets switch only where one waits (on I/O), so a
        # leader nobody follows yet, which only holds its records in memory, takes no lock.
        self.cooperative = False
        self.stats: dict[str, int] = dict.fromkeys(
            ("led", "followed", "alone", "hits", "detached", "leader_failed", "redis_errors", "batched_finishes"),
            0)
        self._pid = -1
        self._proc = ""
        self._fast: redis.Redis | None = None
        self._blocking: redis.Redis | None = None
        self._raw: Pool | None = None
        self._auto: AutoPipeline | None = None
        # Inside a gevent worker (ntonix/gateway/runtime.py ``start``): the joins and finishes of
        # one turn of the event loop share one round trip (resp.py ``AutoPipeline``).
        self.auto_pipeline = False
        self._serial = 0
        self._down_until = 0.0
        self._outage = False
        self._leaders: dict[str, Leader] = {}
        self._following = 0
        self._pending: list[_Ending] = []
        self._pending_bytes = 0
        self._keeper_pid = -1
        self._beat_at = -1e9
        self._probed_at = -1e9
        self._frames: _Frames | None = None
        self.stopped = False

    # -- public ----------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while backing off after a Redis failure."""
        return self.clock() >= self._down_until

    @property
    def reachable(self) -> bool:
        """Redis answered this process's last command (or :meth:`probe`): the figure /metrics
        reports. False from a failure until a command succeeds again, not only while backing off."""
        return self.available and not self._outage

    def probe(self, every_s: float = 1.0) -> None:
        """From the worker's main loop: a PING at most every ``every_s`` while this process
        leads nothing, so that an idle gateway's availability figure follows Redis, and a Redis
        restart costs the ping's connection instead of the first coalesced request's (a failure
        drops every idle connection). The ping goes the way the joins go (``_send``: the
        auto-pipeline's connection, or the pool's), whose connections a restart leaves stale;
        redis-py's own client would quietly reconnect and see nothing. A process that leads
        is not pinged: its requests' own commands say it, and a failed ping would abandon them."""
        now = self.clock()
        if now - self._probed_at < every_s or self._leaders or not self._ready():
            return
        self._probed_at = now
        try:
            self._send((b"PING",))
        except ERRORS as exc:
            if not self._leaders:  # the ping waited: a request may lead by now
                self._failed(exc)
            else:
                self.stats["redis_errors"] += 1
            return
        self._succeeded()

    def join(self, key: str) -> Leader | Follower:
        """Follow the live flight for ``key`` on any gateway, or lead a new one; a Leader
        without a flight ("go alone") when Redis is down or too many already wait here."""
        role = self.join_or_hit(key, None)
        assert not isinstance(role, bytes)
        return role

    def join_or_hit(self, key: str, cache_key: str | None) -> Leader | Follower | bytes:
        """:meth:`join`, but first (in the same round trip) read the Redis key ``cache_key``
        (the cache tier's entry, ntonix/cache/remote.py): its raw value if it exists. A miss
        re-checks the cache after joining anyway; this makes the re-check and the join one
        round trip instead of two."""
        if self._following >= self.max_followers or not self._ready():
            self.stats["alone"] += 1
            return Leader(self, key, None)
        self._serial += 1
        token = f"{self._proc}{self._serial:x}"  # unique: _proc is new per process and per Redis failure
        value = f"{token} {self._proc}"
        try:
            found = self._script("join", self._join_command(key, token, value, cache_key))
        except ERRORS as exc:
            self._failed(exc)
            self.stats["alone"] += 1
            return Leader(self, key, None)
        self._succeeded()
        if isinstance(found, list):
            self.stats["hits"] += 1
            return bytes(found[0])
        if found is not None:
            self.stats["followed"] += 1
            token, _, proc = found.decode().partition(" ")
            return Follower(self, token, proc)
        self.stats["led"] += 1
        self._beat_at = self.clock()
        leader = Leader(self, key, value)
        self._leaders[token] = leader
        self._ensure_keeper()
        return leader

    def _join_command(self, key: str, token: str, value: str, cache_key: str | None) -> Command:
        """KEYS: k, f, a[, cache key]; ARGV: value, lease ms, flight ttl ms, prefix (lua.py JOIN)."""
        fr = self._framed()
        p = self.prefix
        if fr.ascii and key.isascii() and (cache_key is None or cache_key.isascii()):
            n = 3 if cache_key is None else 4
            return Encoded((f"*{n + 7}\r\n{fr.join}$1\r\n{n}\r\n" + bulk(p + "k:" + key) + bulk(p + "f:" + token)
                            + fr.a + ("" if cache_key is None else bulk(cache_key)) + bulk(value)
                            + fr.join_tail).encode())
        keys = [p + "k:" + key, p + "f:" + token, p + "a:" + self._proc]
        if cache_key is not None:
            keys.append(cache_key)
        return ("EVALSHA", SHAS["join"], len(keys), *keys, value, self.lease_ms, self.flight_ttl_ms, p)

    def _finish_command(self, e: _Ending) -> Command:
        """The keeper's finish of a flight nobody followed (no records): :func:`_finish_call`,
        framed from the process's constant parts."""
        fr = self._framed()
        store = e.store
        k, f, s = e.keys
        if not (fr.ascii and k.isascii() and (store is None or store[0].isascii())):
            return _finish_call(e.keys, e.value, 0, e.ok, self.grace_ms, store)
        n = 3 if store is None else 4
        head = f"*{n + 9}\r\n{fr.finish}$1\r\n{n}\r\n" + bulk(k) + bulk(f) + bulk(s)
        if store is None:
            return Encoded((head + bulk(e.value) + f"$1\r\n0\r\n$1\r\n{e.ok}\r\n{fr.grace}$0\r\n\r\n$1\r\n0\r\n")
                           .encode())
        ck, answer, px = store
        head += bulk(ck) + bulk(e.value) + f"$1\r\n0\r\n$1\r\n{e.ok}\r\n{fr.grace}${len(answer)}\r\n"
        return Encoded(head.encode(), answer, ("\r\n" + bulk(str(px))).encode())

    def _framed(self) -> _Frames:
        fr = self._frames
        if fr is None or fr.proc != self._proc:
            fr = self._frames = _Frames(self)
        return fr

    def tick(self) -> list[Leader]:
        """One keeper round: renew this process's liveness and tell leaders about followers
        (one pipeline; nothing when this process leads nothing). Returns the leaders that
        learnt of their first follower."""
        if not self._leaders or not self._ready():
            return []
        assert self._raw is not None
        try:
            # One round trip whatever the number of flights this process leads: the followers'
            # join script added the tokens of the flights they joined to w:<proc>; pop them all.
            # (An MGET of every flight's follower count cost O(flights) ten times a second.)
            replies = self._raw.pipeline([
                ("SET", self.prefix + "a:" + self._proc, b"1", "PX", self.lease_ms),
                ("SPOP", self.prefix + "w:" + self._proc, _POP_MAX)])
            for r in replies:
                if isinstance(r, RespError):
                    raise r
        except ERRORS as exc:
            self._failed(exc)
            return []
        self._succeeded()
        self._beat_at = self.clock()
        seen = []
        for token in replies[1] or ():
            ld = self._leaders.get(token.decode())
            if ld is not None and not ld.finished and not ld.followers_seen:
                ld.followers_seen = True
                seen.append(ld)
        return seen

    def flush(self) -> None:
        """Send the finishes queued since the last round, pipelined (the keeper calls this)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending or not self._ready():
            return
        try:
            # Each script stores the answer for the cache tier, then ends the flight: a gateway
            # asking meanwhile finds either the flight (and follows it) or the stored answer.
            replies = self._batch([self._finish_command(e) for e in pending])
            # Followers joined after all: everything, then the end, in one go.
            late = [e for e, r in zip(pending, replies, strict=True) if r == 1]
            if late:
                self._batch([_finish_call(e.keys, e.value, 1, 1, self.grace_ms, e.store, e.records) for e in late])
        except ERRORS as exc:
            self._failed(exc)
            return
        self.stats["batched_finishes"] += len(pending)

    def _batch(self, cmds: list[Command]) -> list[Any]:
        """The finish scripts ``cmds`` in one pipeline."""
        assert self._raw is not None
        replies = self._raw.pipeline(cmds)
        if any(isinstance(r, RespError) and str(r).startswith("NOSCRIPT") for r in replies):
            self._raw.call("SCRIPT", "LOAD", FINISH)
            replies = self._raw.pipeline(cmds)
        for r in replies:
            if isinstance(r, RespError):
                raise r
        return replies

    def _defer(self, ending: _Ending) -> bool:
        """Queue a finish for the keeper's next batch, within ``max_pending_bytes``."""
        if self.spawn is None or self._pending_bytes + ending.size > self.max_pending_bytes:
            return False
        self._pending.append(ending)
        self._pending_bytes += ending.size
        return True

    def keep(self) -> None:
        """The keeper loop (run by ``spawn``): :meth:`tick` every ``tick_s`` until :attr:`stopped`."""
        while not self.stopped:
            self.sleep(self.tick_s)
            try:
                self.flush()
                for leader in self.tick():
                    leader.catch_up()
            except Exception:  # a keeper that dies would silently stop every lease
                log.exception("cluster.keeper_failed")

    def close(self) -> None:
        self.stopped = True
        if self._pid == Process.pid:
            for client in (self._fast, self._blocking, self._raw, self._auto):
                if client is not None:
                    client.close()
        self._fast = self._blocking = self._raw = self._auto = None

    def __repr__(self) -> str:
        state = "backing-off" if not self.available else ("outage" if self._outage else "ok")
        return (f"<Flights {redacted(self.url)} {state} leading={len(self._leaders)} "
                f"following={self._following}>")

    # -- internals -------------------------------------------------------------------

    def _ready(self) -> bool:
        if self.clock() < self._down_until or self.stopped:
            return False
        if self._fast is None or self._pid != Process.pid:
            try:
                self._fast = redis_py(self.url, self.timeout_s)
                # XREAD BLOCK holds its connection for block_s: a longer timeout, its own pool.
                self._blocking = redis_py(self.url, self.timeout_s, self.block_s + 1.0)
                self._raw = Pool(self.url, self.timeout_s)
            except (redis.RedisError, ValueError, OSError) as exc:
                self._fast = self._blocking = None
                self._failed(exc)
                return False
            # Not over TLS: the pipeline reads a connection in one greenlet while others write to
            # it, and an SSL socket is not safe for that (Redis answered with a TLS alert).
            self._auto = AutoPipeline(self._raw) if self.auto_pipeline and not self._raw.address.tls else None
            self._pid, self._proc = Process.pid, secrets.token_hex(6)
            self._leaders = {}
        return True

    def _client(self) -> redis.Redis:
        assert self._fast is not None
        return self._fast

    def _script(self, name: str, command: Command) -> Any:
        return evalsha(self._send, SCRIPTS[name], command)

    def _send(self, command: Command) -> Any:
        if self._auto is not None:
            return self._auto.send(command)
        assert self._raw is not None
        return self._raw.send(command)

    def _blocking_client(self) -> redis.Redis:
        assert self._blocking is not None
        return self._blocking

    def _ensure_keeper(self) -> None:
        if self.spawn is not None and self._keeper_pid != Process.pid:
            self._keeper_pid = Process.pid
            self.spawn(self.keep)

    def _maybe_beat(self) -> None:
        """Without a keeper, a publishing leader renews its process's liveness itself."""
        if self.spawn is None and self.clock() - self._beat_at >= self.tick_s:
            self.tick()

    def _failed(self, exc: BaseException) -> None:
        self.stats["redis_errors"] += 1
        self._down_until = self.clock() + self.backoff_s
        # Every idle connection goes: after a Redis restart each would fail once more when next
        # used (another back-off each, and another "unavailable" line, for minutes).
        drop_idle(self._fast)
        drop_idle(self._blocking)
        if self._raw is not None:
            self._raw.drop_idle()
        if self._auto is not None:
            self._auto.drop_idle()
        if self._pid == Process.pid:
            # A new identity for this process: whatever it led may have been left half-written
            # (a finish, a chunk or an end that did not go through) and must never look alive
            # again. Those flights' liveness lapses within lease_s; their followers regroup,
            # so their leaders stop publishing (and holding records) now.
            self._proc = secrets.token_hex(6)
            for leader in list(self._leaders.values()):
                leader.abandon()
            self._leaders = {}
        if not self._outage:
            self._outage = True
            log.warning("cluster.redis_unavailable", extra={
                "url": redacted(self.url), "error": f"{type(exc).__name__}: {exc}", "backoff_s": self.backoff_s})

    def _succeeded(self) -> None:
        if self._outage:
            self._outage = False
            log.info("cluster.redis_recovered", extra={"url": redacted(self.url)})

    def _forget(self, leader: Leader) -> None:
        if leader.token:
            self._leaders.pop(leader.token, None)


class Leader:
    """The request that goes to the backend and publishes its answer to followers anywhere.

    Redis failures never reach the leader's own client: the leader then stops publishing, and
    its followers see the flight fail (or the process's liveness lapse) and go alone.
    """

    def __init__(self, flights: Flights, key: str, value: str | None) -> None:
        self._f = flights
        self.key = key
        self.value = value
        self.token = value.split(" ", 1)[0] if value else ""
        self.finished = value is None
        self.followers_seen = False  # set by the keeper
        self._records: list[Record] = []
        self._held = 0  # bytes in _records
        self._published = 0  # bytes written to the stream
        self._journaling = False
        self._overflow = False  # dropped its records: cannot serve a follower whole any more
        self._closed = False  # detached for size: followers already reading still get it all
        self._has_head = False
        self._store: tuple[str, bytes, int] | None = None  # see store_at_end
        self._checked = flights.clock() if flights.spawn is None else 0.0
        # The keeper's catch-up and the request's publishes must not interleave their writes
        # (cooperative: made when first needed, once a follower is seen; most leaders never need it).
        self._cooperative = flights.cooperative
        self._lock: AbstractContextManager[Any] | None = None if self._cooperative else flights.lock()

    @property
    def has_followers(self) -> bool:
        """Whether followers read this answer (as of the last publish)."""
        return self._journaling and not self.finished

    def publish_head(self, status: int, headers: Headers) -> None:
        if self._has_head:
            raise ValueError("publish_head: the head is already published")
        self._has_head = True
        self._publish(b"h", (status, headers))
        if status != 200 and not self.finished:
            self._detach()

    def publish_chunk(self, data: bytes) -> None:
        if not self._has_head:
            raise ValueError("publish_chunk: publish_head first")
        if data:
            self._publish(b"c", bytes(data))

    def store_at_end(self, key: str, value: bytes, px_ms: int) -> bool:
        """Send ``SET key value PX px_ms`` (the answer for the Redis cache tier) with the end of
        this flight, before it: in the keeper's batch, no round trip of its own. False when
        this leader has no flight (alone, finished): the caller stores it itself."""
        if self._unfollowed():
            return self._keep_store(key, value, px_ms)
        with self._locked():
            return self._keep_store(key, value, px_ms)

    def _keep_store(self, key: str, value: bytes, px_ms: int) -> bool:
        if self.finished or self.value is None:
            return False
        self._store = (key, value, px_ms)
        return True

    def finish(self, ok: bool) -> None:
        """End the flight (idempotent): ``ok`` means the answer is complete."""
        if self._unfollowed():
            self._finish(ok)  # no keeper's catch-up can be under way (see _unfollowed)
            return
        with self._locked():
            self._finish(ok)

    def _unfollowed(self) -> bool:
        """Cooperative (gevent) and no follower seen: the keeper's catch-up, the only other
        writer, starts only for a leader whose followers it saw, so no lock is needed."""
        return self._cooperative and not self.followers_seen

    def _locked(self) -> AbstractContextManager[Any]:
        lock = self._lock
        if lock is None:
            lock = self._lock = self._f.lock()
        return lock

    def _finish(self, ok: bool) -> None:
        if self.finished:
            return
        self.finished = True
        f = self._f
        f._forget(self)
        assert self.value is not None
        ok = ok and self._has_head and not self._overflow
        keys = [f.prefix + "k:" + self.key, f.prefix + "f:" + self.token, f.prefix + "s:" + self.token]
        store, self._store = self._store, None
        size = self._held + (len(store[1]) if store else 0)
        if not self._journaling and f._defer(_Ending(keys, self.value, int(ok), self._records, size, store)):
            # Nobody followed so far: the flight ends with the keeper's next batch, and anyone
            # who joins until then still gets the whole answer from these records.
            self._records = []
            return
        try:
            if f._script("finish", _finish_call(keys, self.value, int(self._journaling), int(ok), f.grace_ms,
                                                store)) == 1:
                # Followers joined but never got a byte: everything, then the end, in one go.
                f._script("finish", _finish_call(keys, self.value, 1, 1, f.grace_ms, store, self._records))
        except ERRORS as exc:
            f._failed(exc)
        self._records = []

    def close(self) -> None:
        self.finish(False)

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finish(False)

    def _publish(self, kind: bytes, data: bytes | tuple[int, Headers]) -> None:
        f = self._f
        if (self._unfollowed() and not self.finished and not self._overflow and f.spawn is not None
                and (not isinstance(data, bytes) or self._held + len(data) <= f.max_bytes)):
            # The common miss: held in memory only, nothing to write, no lock to take.
            self._records.append((kind, data))
            if isinstance(data, bytes):
                self._held += len(data)
            return
        with self._locked():
            if self.finished:
                return
            f = self._f
            if self._journaling:
                self._write([(kind, data)])
                return
            if not self._overflow:
                self._records.append((kind, data))
                if isinstance(data, bytes):
                    self._held += len(data)
                    if self._held > f.max_bytes:
                        self._overflowed()
            if f.spawn is None and not self.followers_seen:
                now = f.clock()
                if now - self._checked >= f.tick_s:
                    self._checked = now
                    f._maybe_beat()  # without a keeper: renews liveness and reads follower counts
            self._catch_up()

    def catch_up(self) -> None:
        """Once followers exist, publish what they have not seen (the keeper calls this, so a
        follower does not wait for the leader's next chunk)."""
        with self._locked():
            self._catch_up()

    def _catch_up(self) -> None:
        if self.followers_seen and not self._journaling and not self.finished:
            if self._overflow:
                self._fail_followers()
                return
            self._journaling = True
            self._write(self._records)
            self._records, self._held = [], 0

    def _write(self, records: list[Record]) -> None:
        f = self._f
        stream = f.prefix + "s:" + self.token
        try:
            pipe = f._client().pipeline(transaction=False)
            for kind, data in _wire(records):
                pipe.xadd(stream, {kind: data})
                self._published += len(data)
            pipe.pexpire(stream, f.flight_ttl_ms)
            pipe.execute()
        except ERRORS as exc:
            self._broken(exc)
            return
        if self._published > f.max_bytes and not self._closed:
            self._closed = True  # late joiners would need it all from the start: no more of them
            self._detach()
        if self._published > _HARD_FACTOR * f.max_bytes:
            self._fail_followers()

    def _overflowed(self) -> None:
        """Too big to hold for followers that may come: drop it, take no more followers."""
        self._overflow = True
        self._records, self._held = [], 0
        self._detach()

    def _fail_followers(self) -> None:
        self._f.stats["leader_failed"] += 1
        self._finish(False)

    def _detach(self) -> None:
        f = self._f
        f.stats["detached"] += 1
        try:
            f._script("detach", ("EVALSHA", SHAS["detach"], 1, f.prefix + "k:" + self.key, self.value or ""))
        except ERRORS as exc:
            self._broken(exc)

    def _broken(self, exc: BaseException) -> None:
        self._f._failed(exc)  # abandons every leader of this process, this one included

    def abandon(self) -> None:
        """Stop publishing: the flight's liveness lapses by itself (see Flights._failed)."""
        self.finished = True
        self._records, self._held = [], 0

    def __repr__(self) -> str:
        state = "alone" if self.value is None else (
            "finished" if self.finished else ("journaling" if self._journaling else "running"))
        return f"<Leader {self.key} {state} held={self._held} published={self._published}>"
