"""A shared view of prefix affinity: which backend each gateway sent a prompt prefix to (ADR 0009).

Theory of operation
-------------------
The ``prefix`` routing policy keeps, per gateway, an index of (model, block hash) -> backend
learnt from its own decisions. Gateways behind one balancer each see only part of a
conversation's turns, so their indexes drift apart. This board shares the assignments through
one Redis stream, **never on a request's critical path**:

* :meth:`AffinityBoard.record` (on the request path) appends to an in-memory batch: no I/O,
  bounded (``max_pending``; past it the oldest assignments are dropped — the newest say more
  about where a conversation is now).
* :meth:`AffinityBoard.sync` (in the background, every ``interval_s``) publishes the batch as
  one stream entry (``XADD ... MAXLEN ~ max_entries``, so the stream stays bounded, and an
  expiry, so it goes away when no gateway runs) and reads what other gateways published since
  its cursor (``XREAD COUNT``), returning their assignments for the caller to merge into its
  own index. A gateway's own entries are skipped.
* Redis slow or down: ``sync`` returns nothing and keeps the batch (bounded), after a
  failure it stays silent for ``backoff_s``; each gateway routes on its own index meanwhile.

A gateway that starts reads the stream from its start: at most ``max_entries`` batches, the
recent history of the cluster.

**Load.** The policy's load bound and exchange rate weigh each backend's requests in flight
(ntonix/core/routing.py). A gateway counts only its own, and behind a layer-4 balancer its own
are a random part of each backend's load: two gateways then see different imbalances, divert
different turns, and split conversations (and the system prompt of a group of them) over
backends that one gateway would have kept together (docs/routing-benchmark.md, "Two gateways
behind HAProxy"). So ``sync`` also exchanges load, in the same round trip: it stores this host's
in-flight counts (``local_load``, the host-wide counts every worker of the host shares, under
the host's id, so its workers overwrite one entry) in one Redis hash stamped with Redis's own
clock, and gets back the other hosts' counts no older than ``load_max_age_s`` (a gateway that
stopped drops out by itself). Their sum per backend, less one (``remote_load`` says why), goes
to ``on_remote``, which the selector adds to its own counts (``Candidate.remote``). A failed
sync hands over an empty view: alone, each gateway weighs only its own requests again, as
before Redis.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson
import redis

from ntonix.cache.remote import drop_idle
from ntonix.cluster.lua import LOAD
from ntonix.cluster.resp import ERRORS, redis_py

log = logging.getLogger("ntonix.cluster")

STREAM = "ntonix:affinity"
LOAD_KEY = "ntonix:load"
# Leading blocks shared per decision: enough for a conversation to be matched on another gateway
# (256 blocks of routing.prefix_block_chars 256 = 64 KiB of prompt), bounded per entry.
MAX_SHARED_BLOCKS = 256


class Assignment(NamedTuple):
    model: str
    block: str  # the prefix block's hash, as the index writes it
    backend: str  # host:port


def host_id(directory: str) -> str:
    """This gateway's id in the shared load (the same for all its workers): a random one kept in
    ``directory`` (the run directory, one per gateway), made by whichever worker comes first.
    Written whole, then linked into place, so no worker can read half of it."""
    path = os.path.join(directory, "cluster-host-id")
    made = secrets.token_hex(8)
    tmp = f"{path}.{os.getpid()}.{made}"
    with open(tmp, "w") as f:
        f.write(made)
    try:
        os.link(tmp, path)
    except FileExistsError:
        with open(path) as f:
            return f.read().strip()
    finally:
        os.unlink(tmp)
    return made


def remote_load(entries: Iterable[bytes | str]) -> dict[str, int]:
    """The other hosts' in-flight counts (JSON objects, as the load script returns them) summed
    per backend, less one: the counts are up to a sync or two old, and a conversation's previous
    turn, just answered through another gateway, may still be among them. Counted, it would make
    the next turn (an agent's tool call comes back within milliseconds) see its own backend
    busier than it is, and at low load the bound would send it elsewhere; one request per
    backend is nothing at high load, where the shared counts matter."""
    remote: dict[str, int] = {}
    for raw in entries:
        try:
            counts = orjson.loads(raw)
            for address, n in counts.items():
                remote[str(address)] = remote.get(str(address), 0) + int(n)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            continue  # another version's entry
    return {address: n - 1 for address, n in remote.items() if n > 1}


class AffinityBoard:
    """Publishes this gateway's assignments and collects the other gateways'."""

    def __init__(self, url: str, *, stream: str = STREAM, max_pending: int = 10_000, max_entries: int = 10_000,
                 read_batch: int = 500, ttl_s: float = 3600.0, timeout_s: float = 0.05, backoff_s: float = 1.0,
                 host: str = "", load_key: str = LOAD_KEY, load_max_age_s: float = 2.0, idle_sync_s: float = 1.0,
                 idle_read_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url, self.stream = url, stream
        self.max_entries, self.read_batch = max_entries, read_batch
        self.ttl_ms = int(ttl_s * 1000)
        self.timeout_s, self.backoff_s, self.clock = timeout_s, backoff_s, clock
        self.gateway = secrets.token_hex(6)
        self.pending: deque[Assignment] = deque(maxlen=max_pending)
        self.cursor = b"0-0"
        self.stats: dict[str, int] = dict.fromkeys(("published", "merged", "redis_errors", "load_syncs"), 0)
        # Load sharing (see the module docstring); off while ``local_load`` is None.
        self.host = host or self.gateway  # one id for all workers of a host
        self.load_key, self.load_max_age_ms = load_key, int(load_max_age_s * 1000)
        self.local_load: Callable[[], Mapping[str, int]] | None = None
        self.on_remote: Callable[[dict[str, int]], None] | None = None
        self.remote: dict[str, int] = {}
        self.idle_sync_s = idle_sync_s  # how often an idle host still syncs (below load_max_age_s)
        self.idle_read_s = idle_read_s  # how often it still reads the others' assignments
        self._read_at = -1e9
        self._load_at = -1e9  # when the others' load was last read
        self._idle_since = -1.0  # when a sync last found this host idle; -1: it was busy
        self._client: redis.Redis | None = None
        self._pid = -1
        self._down_until = 0.0
        self._down = False  # the last sync failed (logged once until one succeeds)

    @property
    def reachable(self) -> bool:
        """Redis answered this board's last sync (every ``idle_read_s`` even when idle)."""
        return not self._down

    def record(self, model: str, block: str, backend: str) -> None:
        """Note one routing decision (request path: memory only)."""
        self.pending.append(Assignment(model, block, backend))

    def share(self, blocks: Sequence[int], backend: str) -> None:
        """Note that ``backend`` was sent a prompt holding ``blocks`` (the ones the deciding host
        did not know yet; at most ``MAX_SHARED_BLOCKS`` leading ones): one assignment whose
        ``block`` is the chain of block hashes. The model is in every block's hash (its seed,
        ntonix/core/prompt.py), so ``model`` stays empty."""
        if blocks:
            self.record("", ",".join(map(str, blocks[:MAX_SHARED_BLOCKS])), backend)

    def sync(self) -> list[Assignment]:
        """Publish the batch and this host's load, take the other hosts' load (``on_remote``),
        return the other gateways' assignments since the last call: one round trip (a catch-up
        after a long silence reads on)."""
        client = self._ready()
        if client is None:
            return []
        batch = list(self.pending)
        load = self.local_load() if self.local_load is not None else None
        if not batch and load is not None and not any(load.values()):
            # Idle host: its zeros are published and it routes nothing now, so it skips the load
            # script for up to idle_sync_s (its first request then sees the others' load that
            # old; the next tick, busy again, syncs it). It still reads the other gateways'
            # assignments every idle_read_s: a conversation another gateway diverted must be
            # known here before its next turn arrives, which is after the previous answer (an
            # idle worker: 0.5 % of a core with the one-second sync alone, 1.4 % reading every
            # 50 ms tick, measured; 0.75 % at 0.2 s).
            now = self.clock()
            if self._idle_since >= 0 and now - self._idle_since < self.idle_sync_s:
                if now - self._read_at < self.idle_read_s:
                    return []
                load = None
            else:
                self._idle_since = now
        else:
            self._idle_since = -1.0
        self._read_at = self.clock()
        try:
            pipe = client.pipeline(transaction=False)
            if batch:
                pipe.xadd(self.stream, {b"g": self.gateway, b"a": orjson.dumps([tuple(x) for x in batch])},
                          maxlen=self.max_entries, approximate=True)
                pipe.pexpire(self.stream, self.ttl_ms)
            if load is not None:
                pipe.eval(LOAD, 1, self.load_key, self.host, orjson.dumps(load), self.load_max_age_ms, self.ttl_ms)
            pipe.xread({self.stream: self.cursor}, count=self.read_batch)
            replies = pipe.execute()
            if batch:
                for _ in batch:
                    # Only now: what was recorded meanwhile stays (if the deque overflowed
                    # meanwhile, a few new ones go instead: bounded, and the next ones come).
                    self.pending.popleft()
                self.stats["published"] += len(batch)
            if load is not None:
                self._load_at = self._read_at
                self._take_remote(replies[-2])
            merged = self._read(client, replies[-1])
        except ERRORS as exc:
            self._failed(exc)
            return []
        if self._down:
            self._down = False
            log.info("cluster.affinity_recovered")
        self.stats["merged"] += len(merged)
        return merged

    def refresh(self, max_age_s: float) -> None:
        """Before routing a request on a host whose last sync found it idle: the other hosts'
        load as it is now (one round trip), not as of up to ``idle_sync_s`` ago. A host that
        sent another gateway's conversation elsewhere only because that gateway's burst,
        long over, still counted, split the conversation's KV cache (an outside audit: a turn
        0.05-0.3 s after the burst went elsewhere). A busy host's background sync keeps the
        view within a tick: nothing to do then, nor within ``max_age_s`` of the last look."""
        if self._idle_since < 0 or self.local_load is None or self.clock() - self._load_at < max_age_s:
            return
        client = self._ready()
        if client is None:
            return
        # Before the round trip: the requests that arrive while it is under way route with the
        # view as it is (one round trip for a burst, not one each).
        self._load_at = self.clock()
        try:
            reply = client.eval(LOAD, 1, self.load_key, self.host, orjson.dumps(self.local_load()),
                                self.load_max_age_ms, self.ttl_ms)
        except ERRORS as exc:
            self._failed(exc)
            return
        self._take_remote(reply)

    def _take_remote(self, reply: Any) -> None:
        """The other hosts' counts (JSON objects from the load script) summed per backend."""
        self._set_remote(remote_load(reply or ()))
        self.stats["load_syncs"] += 1

    def _set_remote(self, remote: dict[str, int]) -> None:
        if remote or self.remote:
            self.remote = remote
            if self.on_remote is not None:
                self.on_remote(remote)

    @staticmethod
    def merger(record: Callable[[list[int], str], None]) -> Callable[[list[Assignment]], None]:
        """The ``merge`` callback for :meth:`run` that feeds the blocks of each shared assignment
        to ``record(blocks, backend)`` (the host's index, ntonix/routing/state.py ``merge``)."""
        def merge(got: list[Assignment]) -> None:
            for a in got:
                try:
                    blocks = [int(x) for x in a.block.split(",")]
                except ValueError:
                    continue  # another version's entry
                record(blocks, a.backend)
        return merge

    def run(self, merge: Callable[[list[Assignment]], None], interval_s: float,
            sleep: Callable[[float], object], stopped: Callable[[], bool]) -> None:
        """The background loop: :meth:`sync` every ``interval_s``, hand what came to ``merge``."""
        while not stopped():
            try:
                got = self.sync()
                if got:
                    merge(got)
            except Exception:  # noqa: BLE001 - a loop that dies would silently stop sharing
                if stopped():
                    return  # closed under it (its client went mid-call): nothing to report
                log.exception("cluster.affinity_sync_failed")
            sleep(interval_s)

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None

    def _read(self, client: redis.Redis, reply: Any) -> list[Assignment]:
        """The assignments in ``reply`` (the pipeline's XREAD), reading on while batches come full."""
        out: list[Assignment] = []
        for i in range(max(1, self.max_entries // self.read_batch)):  # bounded catch-up per sync
            if i:
                reply = client.xread({self.stream: self.cursor}, count=self.read_batch)
            entries = [e for _name, es in reply or () for e in es]
            for entry_id, fields in entries:
                self.cursor = entry_id
                if fields.get(b"g") == self.gateway.encode():
                    continue
                try:
                    rows = orjson.loads(fields.get(b"a", b"[]"))
                    out.extend(Assignment(str(m), str(b), str(be)) for m, b, be in rows)
                except (orjson.JSONDecodeError, TypeError, ValueError):
                    continue  # another version's entry: skip it
            if len(entries) < self.read_batch:
                break
        return out

    def _ready(self) -> redis.Redis | None:
        if self.clock() < self._down_until:
            return None
        if self._client is None or self._pid != os.getpid():
            try:
                self._client = redis_py(self.url, self.timeout_s)
            except (redis.RedisError, ValueError) as exc:
                self._failed(exc)
                return None
            self._pid = os.getpid()
        return self._client

    def _failed(self, exc: BaseException) -> None:
        drop_idle(self._client)  # each would fail once more after a Redis restart
        if not self._down:  # once per outage, not at every retry
            self._down = True
            log.warning("cluster.affinity_unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
        self.stats["redis_errors"] += 1
        self._down_until = self.clock() + self.backoff_s
        self._set_remote({})  # alone now: the others' last counts would only go stale

    def __repr__(self) -> str:
        return (f"<AffinityBoard {self.gateway} pending={len(self.pending)} cursor={self.cursor.decode()} "
                f"{'backing-off' if self.clock() < self._down_until else 'ok'}>")
