"""A small deterministic simulation of multi-turn chat traffic routed by each policy (pure, no time).

The workload has the shape of the issue's routing benchmark at a smaller scale: 64 users in 8
groups; each group shares a 16-block system prompt, each user's conversation grows by 4 blocks a
round for 8 rounds. Four backends, each with an LRU KV cache holding a third of the working set
(so the working set is 3 x one backend and 75 % of all four), a limited number of sequences
running at once with a queue behind them, and a service time that grows with the uncached
prompt blocks (prefill) plus a fixed decode time. Users are a closed loop: a user sends its next
turn a short think time after the previous answer.

The router sees what the gateway will see: host-wide in-flight counts and an approximate prefix
index learnt from its own decisions (block -> backends it routed that block to).
"""

from __future__ import annotations

import functools
import heapq
import random
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import orjson
import pytest

from ntonix.cluster.affinity import remote_load
from ntonix.core.routing import Candidate, PrefixSettings, Router

GROUPS, USERS_PER_GROUP, ROUNDS = 8, 8, 8
SYSTEM_BLOCKS, QUESTION_BLOCKS, ANSWER_BLOCKS = 16, 2, 2
BACKENDS = ("a", "b", "c", "d")
WORKING_SET = GROUPS * SYSTEM_BLOCKS + GROUPS * USERS_PER_GROUP * ROUNDS * (QUESTION_BLOCKS + ANSWER_BLOCKS)
CAPACITY = WORKING_SET // 3
MAX_SEQS = 8
PREFILL_PER_BLOCK, DECODE, OVERHEAD = 1.0, 20.0, 1.0


@dataclass
class Backend:
    cache: OrderedDict[object, None] = field(default_factory=OrderedDict)
    running: int = 0
    queue: list[tuple[int, list[object]]] = field(default_factory=list)

    def serve(self, blocks: list[object]) -> int:
        """Blocks it must prefill (its longest cached leading run is free); the prompt is cached after."""
        hit = 0
        for b in blocks:
            if b not in self.cache:
                break
            hit += 1
        for b in blocks:
            self.cache[b] = None
            self.cache.move_to_end(b)
        while len(self.cache) > CAPACITY:
            self.cache.popitem(last=False)
        return len(blocks) - hit


@dataclass
class Result:
    requests: Counter[str]
    prefilled: int
    prompt_blocks: int
    stuck: int  # turns that went to the same backend as the user's previous turn
    turns_after_first: int


def prompt(user: int, rnd: int, groups: int = GROUPS) -> list[object]:
    group = user % groups
    blocks: list[object] = [("s", group, i) for i in range(SYSTEM_BLOCKS)]
    blocks += [("u", user, i) for i in range(rnd * (QUESTION_BLOCKS + ANSWER_BLOCKS) + QUESTION_BLOCKS)]
    return blocks


@dataclass
class Gateway:
    """One gateway's view: its own in-flight counts and index, and what it learnt from the others."""

    in_flight: Counter[str] = field(default_factory=Counter)
    index: dict[object, set[str]] = field(default_factory=dict)
    pending: list[tuple[object, str]] = field(default_factory=list)  # assignments not yet shared
    remote: dict[str, int] = field(default_factory=dict)


def share(gateways: list[Gateway], load: bool) -> None:
    """One sync of the cluster (ntonix/cluster/affinity.py): every gateway learns the others'
    assignments and, with ``load``, their in-flight counts as ``remote_load`` sums them."""
    for g in gateways:
        others = [o for o in gateways if o is not g]
        for o in others:
            for block, backend in o.pending:
                g.index.setdefault(block, set()).add(backend)
        if load:
            g.remote = remote_load([orjson.dumps(dict(o.in_flight)) for o in others])
    for g in gateways:
        g.pending.clear()


def simulate(policy: str, settings: PrefixSettings | None = None, seed: int = 7, groups: int = GROUPS,
             gateways: int = 1, sync_every: float = 1.0, share_load: bool = False, anchors: bool = False) -> Result:
    """``gateways`` > 1: turns go to the gateways in turn (a layer-4 balancer's round-robin over
    new connections); each routes on its own counts and index, synced every ``sync_every``
    (one decode is 20). With ``anchors`` or several gateways, cold prompts use their first block as
    the rendezvous anchor, as the gateway does."""
    rng = random.Random(seed)
    router = Router(policy, settings)
    backends = {name: Backend() for name in BACKENDS}
    views = [Gateway() for _ in range(gateways)]
    via: dict[int, Gateway] = {}  # the gateway each user's request in flight went through
    turns = 0
    requests = Counter[str]()
    last: dict[int, str] = {}
    prefilled = prompt_total = stuck = later = 0
    events: list[tuple[float, int, str, int, str]] = []  # (time, seq, kind, user, backend)
    seq = 0

    def push(t: float, kind: str, user: int, backend: str = "") -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, user, backend))

    rounds_done = Counter[int]()
    users = GROUPS * USERS_PER_GROUP
    for user in range(users):
        push(rng.uniform(0, 200), "send", user)
    if gateways > 1:
        push(sync_every, "sync", -1)

    def start(now: float, name: str, user: int, blocks: list[object]) -> None:
        nonlocal prefilled
        backend = backends[name]
        backend.running += 1
        uncached = backend.serve(blocks)
        prefilled += uncached
        push(now + OVERHEAD + uncached * PREFILL_PER_BLOCK + DECODE, "done", user, name)

    while events:
        now, _, kind, user, name = heapq.heappop(events)
        if kind == "sync":
            share(views, share_load)
            if len(events) > 0:
                push(now + sync_every, "sync", -1)
            continue
        if kind == "send":
            blocks = prompt(user, rounds_done[user], groups)
            prompt_total += len(blocks)
            view = via[user] = views[turns % gateways]
            turns += 1
            candidates = []
            for b in BACKENDS:
                matched = 0
                for block in blocks:
                    if b not in view.index.get(block, ()):
                        break
                    matched += 1
                candidates.append(Candidate(b, in_flight=view.in_flight[b], matched=matched,
                                            remote=view.remote.get(b, 0)))
            anchor = zlib.crc32(repr(blocks[0]).encode()) if anchors or gateways > 1 else None
            chosen = router.choose(candidates, anchor).address
            assert chosen is not None
            for block in blocks:
                view.index.setdefault(block, set()).add(chosen)
                view.pending.append((block, chosen))
            requests[chosen] += 1
            view.in_flight[chosen] += 1
            if user in last:
                later += 1
                stuck += last[user] == chosen
            last[user] = chosen
            backend = backends[chosen]
            if backend.running < MAX_SEQS:
                start(now, chosen, user, blocks)
            else:
                backend.queue.append((user, blocks))
        else:  # done
            backend = backends[name]
            backend.running -= 1
            via[user].in_flight[name] -= 1
            if backend.queue:
                queued_user, queued_blocks = backend.queue.pop(0)
                start(now, name, queued_user, queued_blocks)
            rounds_done[user] += 1
            if rounds_done[user] < ROUNDS:
                push(now + rng.uniform(0, 10), "send", user)
    return Result(requests, prefilled, prompt_total, stuck, later)


@pytest.fixture(scope="module")
def results() -> dict[str, Result]:
    return {policy: simulate(policy) for policy in ("round_robin", "least_requests", "prefix")}


def test_every_request_is_served(results: dict[str, Result]) -> None:
    for result in results.values():
        assert sum(result.requests.values()) == GROUPS * USERS_PER_GROUP * ROUNDS


def test_prefix_computes_far_less_prefill_than_round_robin(results: dict[str, Result]) -> None:
    rr, lr, px = (results[p].prefilled for p in ("round_robin", "least_requests", "prefix"))
    assert px <= 0.35 * rr, (px, rr)
    unique = GROUPS * SYSTEM_BLOCKS + GROUPS * USERS_PER_GROUP * ((ROUNDS - 1) * 4 + QUESTION_BLOCKS)
    assert px <= 1.1 * unique, (px, unique)  # near the floor: each block prefilled about once
    assert px < 0.5 * lr, (px, lr)  # load alone does little on prefix-heavy traffic


@pytest.mark.parametrize("groups", [1, 2, 3, 8])
def test_prefix_keeps_load_balanced(groups: int) -> None:
    counts = simulate("prefix", groups=groups).requests
    assert len(counts) == len(BACKENDS)
    assert max(counts.values()) / min(counts.values()) <= 1.5, counts


def test_prefix_turns_of_a_conversation_stick(results: dict[str, Result]) -> None:
    px, rr = results["prefix"], results["round_robin"]
    assert px.stuck / px.turns_after_first >= 0.9
    assert rr.stuck / rr.turns_after_first <= 0.3


def test_affinity_without_a_load_guard_collapses() -> None:
    # One system prompt shared by every user: with the guards off, every request follows it to
    # the backend that served it first (llm-d's prefix-only collapse); with them, load spreads.
    greedy = simulate("prefix", PrefixSettings(balance_factor=1000.0, load_blocks=0), groups=1)
    assert len(greedy.requests) == 1
    guarded = simulate("prefix", groups=1)
    assert len(guarded.requests) == len(BACKENDS)
    assert guarded.prefilled < 0.5 * simulate("round_robin", groups=1).prefilled


CLUSTER_SEEDS = range(1, 13)


@functools.cache
def prefilled(seed: int, gateways: int = 1, sync_every: float = 1.0, share_load: bool = False) -> int:
    return simulate("prefix", seed=seed, gateways=gateways, sync_every=sync_every, share_load=share_load,
                    anchors=True).prefilled


def cluster_ratios(gateways: int, sync_every: float, share_load: bool = False) -> list[float]:
    """Prefill of ``prefix`` through several gateways ÷ one gateway's (anchored like the
    gateways), per seed: the routing benchmark's `ntonix_l4` against `ntonix` row."""
    return [prefilled(seed, gateways, sync_every, share_load) / prefilled(seed) for seed in CLUSTER_SEEDS]


def test_two_gateways_that_weigh_only_their_own_load_split_conversations() -> None:
    # The cause issue #17's benchmark showed (1.11-1.21 × one gateway's prefill): each gateway's
    # counts are a random half of each backend's load, so the two see different imbalances,
    # their bounds and exchange rates divert different turns, and groups and conversations end
    # up split over backends. Sharing the assignments faster does not help: it is the load view.
    # (Since cold prompts go to the least loaded backend, not to the anchor's among all within
    # the bound, one gateway prefills 2 % less and two such gateways 1.06 × that, not 1.08 ×.)
    slow = cluster_ratios(gateways=2, sync_every=16)  # a one-second sync
    fast = cluster_ratios(gateways=2, sync_every=1)
    assert sum(slow) / len(slow) >= 1.04, slow
    assert sum(fast) / len(fast) >= 1.04, fast


@pytest.mark.parametrize("gateways", [2, 3])
def test_gateways_that_share_their_load_compute_about_what_one_gateway_does(gateways: int) -> None:
    shared = cluster_ratios(gateways=gateways, sync_every=1, share_load=True)
    alone = cluster_ratios(gateways=gateways, sync_every=1)
    assert sum(shared) / len(shared) <= 1.03, shared
    assert max(shared) <= 1.15, shared  # one seed of 12 at 1.13 with three gateways
    assert sum(shared) < sum(alone) - 0.5, (shared, alone)  # 12 seeds: 4 points less on average
