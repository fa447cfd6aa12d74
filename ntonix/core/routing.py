"""Routing decisions: which backend gets a request, from plain values (pure).

Theory of operation
-------------------
The caller (the request flow) gathers one ``Candidate`` per backend that serves the request's
model: its weight, the requests in flight to it from this host (all workers, from
``ntonix.routing.load``), its ``max_in_flight`` (0 = none), how many leading prompt blocks it is
believed to hold in its KV cache (from ``ntonix.routing.index``) and whether it is routable
(healthy, breaker not open, not draining), and ``remote``: the requests other gateways last
said they had in flight to it (``ntonix/cluster/affinity.py``, 0 alone). ``remote`` counts in the
policies' load (below) but never against ``max_in_flight``, which bounds this gateway's own
requests. ``Router.choose`` returns a ``Decision``:

- ``CHOSEN`` with an address;
- ``AT_LIMIT``: routable backends exist but every one is at its ``max_in_flight``; the caller
  waits its turn (``ntonix.routing.load``) and asks again;
- ``NONE``: no candidate is routable (→ 503 with ``Retry-After``).

Policies, among routable backends below their limit:

- ``round_robin``: nginx's smooth weighted round-robin (``ntonix.core.balancer``).
- ``least_requests``: the fewest ``in_flight / weight`` (nginx's ``least_conn``); ties take turns
  by weight (smooth weighted round-robin over the tied, as nginx does), so idle backends of
  weights 1 and 3 get a quarter and three quarters of one-at-a-time traffic, and equal idle
  backends take turns instead of the first one taking every request.
- ``prefix`` (docs/adr/0008-prefix-routing.md says why this form):
  1. *bounded load*: a backend is allowed only if, with this request, it would carry no more than
     ``ceil(balance_factor × (total_in_flight + 1) × weight / total_weight)`` requests, as in
     consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018). The least
     loaded backend always passes, so the set is never empty.
  2. among the allowed, the highest ``matched − load_blocks × (in_flight + 1) / weight``: a
     backend holding the prompt's prefix wins unless it is markedly busier (each extra request
     in flight per weight costs ``load_blocks`` matched blocks), the Dynamo-style single
     exchange rate between cache and load; ties go to the less loaded, then rotate.
  3. no allowed backend holds any of the prompt: with an ``anchor`` (the hash of the prompt's
     first block, the same for every turn of a conversation), weighted rendezvous hashing of
     the anchor over the allowed backends; without one, the least loaded relative to weight,
     as ``least_requests``. Rendezvous spreads cold conversations as evenly as their weights
     (llm-d's lesson: do not pile cold requests on one backend) and is deterministic: gateways
     that share no state (an empty index, another host) send the same conversation to the same
     backend while the load bound lets them (docs/adr/0009-cluster-coalescing.md, option b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import xxhash

from ntonix.core.balancer import SmoothWeightedRoundRobin

__all__ = ["POLICIES", "Candidate", "Decision", "Outcome", "Peer", "PrefixSettings", "Router", "rendezvous"]

POLICIES = ("round_robin", "least_requests", "prefix")


class Peer(Protocol):
    """A backend as the round-robin fast path reads it (a ``Candidate`` is one)."""

    @property
    def address(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def routable(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    """One backend that serves the request's model, as the policy sees it."""

    address: str
    weight: int = 1
    in_flight: int = 0  # host-wide, all workers
    max_in_flight: int = 0  # 0 = no limit
    matched: int = 0  # leading prompt blocks it is believed to hold
    routable: bool = True
    remote: int = 0  # in flight from the other gateways, as last shared (not against max_in_flight)

    @property
    def at_limit(self) -> bool:
        return 0 < self.max_in_flight <= self.in_flight

    @property
    def total(self) -> int:
        """In flight from every gateway (this host's exact count plus the others' last shared)."""
        return self.in_flight + self.remote

    @property
    def busy(self) -> float:
        """Requests in flight per weight, all gateways (``least_requests``)."""
        return (self.in_flight + self.remote) / self.weight

    @property
    def load(self) -> float:
        """Requests in flight per weight once this request is added, all gateways."""
        return (self.in_flight + self.remote + 1) / self.weight


class Outcome(Enum):
    CHOSEN = "chosen"
    AT_LIMIT = "at_limit"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    address: str | None = None
    matched: int = 0  # prompt blocks the chosen backend is believed to hold


AT_LIMIT = Decision(Outcome.AT_LIMIT)
NONE = Decision(Outcome.NONE)


@dataclass(frozen=True, slots=True)
class PrefixSettings:
    balance_factor: float = 1.5
    load_blocks: int = 2


class Router:
    """Holds what a policy remembers between requests (the round-robin state, the tie rotation)."""

    __slots__ = ("_peers", "_rotation", "_rr", "_tie_credit", "policy", "prefix")

    def __init__(self, policy: str = "round_robin", prefix: PrefixSettings | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}")
        self.policy = policy
        self.prefix = prefix or PrefixSettings()
        self._rr = SmoothWeightedRoundRobin([])
        self._peers: dict[str, int] = {}  # the round-robin's peers and weights
        self._rotation = 0
        self._tie_credit: dict[str, float] = {}  # least_requests' weighted turns among the tied

    def configure(self, policy: str, prefix: PrefixSettings | None = None,
                  backends: Sequence[tuple[str, int]] | None = None) -> None:
        """Take a new policy and backend list (on HUP); the rotation state of kept backends carries over."""
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}")
        self.policy = policy
        self.prefix = prefix or PrefixSettings()
        if backends is not None:
            self._peers = dict(backends)
            self._rr.update(list(self._peers.items()))

    def choose(self, candidates: Sequence[Candidate], anchor: int | None = None) -> Decision:
        """The backend for one request among ``candidates`` (those serving its model).
        ``anchor``: the hash of the prompt's first block (``prefix`` only; see the module docstring)."""
        routable = [c for c in candidates if c.routable]
        if not routable:
            return NONE
        eligible = [c for c in routable if not c.at_limit]
        if not eligible:
            return AT_LIMIT
        if len(eligible) == 1:
            return Decision(Outcome.CHOSEN, eligible[0].address, eligible[0].matched)
        if self.policy == "round_robin":
            chosen = self._round_robin(candidates, eligible)
        elif self.policy == "least_requests":
            chosen = self._least_loaded(eligible)
        else:
            chosen = self._prefix(eligible, anchor)
        return Decision(Outcome.CHOSEN, chosen.address, chosen.matched)

    def __repr__(self) -> str:
        return f"<Router {self.policy} peers={len(self._peers)} {self.prefix}>"

    def round_robin(self, backends: Sequence[Peer]) -> str | None:
        """``round_robin`` without limits (the request flow's fast path): the next routable backend."""
        peers = self._peers
        routable = set()
        joined = False
        for b in backends:
            address = b.address
            if peers.get(address) != b.weight:
                peers[address] = b.weight
                joined = True
            if b.routable:
                routable.add(address)
        if joined:  # a new backend (or weight) joins the rotation; the others keep their place
            self._rr.update(list(peers.items()))
        if len(routable) <= 1:
            return next(iter(routable)) if routable else None
        return self._rr.pick(routable)

    def _round_robin(self, candidates: Sequence[Candidate], eligible: list[Candidate]) -> Candidate:
        if any(self._peers.get(c.address) != c.weight for c in candidates):
            # A new backend (or weight) joins the rotation; the others keep their place in it.
            self._peers.update((c.address, c.weight) for c in candidates)
            self._rr.update(list(self._peers.items()))
        by_address = {c.address: c for c in eligible}
        name = self._rr.pick(by_address)
        assert name is not None  # eligible is not empty and every eligible address is a peer
        return by_address[name]

    def _least_loaded(self, eligible: Sequence[Candidate]) -> Candidate:
        best = min(c.busy for c in eligible)
        tied = [c for c in eligible if c.busy == best]
        if len(tied) == 1:
            return tied[0]
        # Smooth weighted round-robin over the tied (nginx least_conn's tie-break): each gains
        # its weight, the one with the most credit goes and pays the tied ones' total.
        credit = self._tie_credit
        if len(credit) > 4 * len(self._peers) + 64:
            credit.clear()  # addresses of backends long gone
        for c in tied:
            credit[c.address] = credit.get(c.address, 0) + c.weight
        chosen = max(tied, key=lambda c: credit[c.address])
        credit[chosen.address] -= sum(c.weight for c in tied)
        return chosen

    def _rotate(self, tied: list[Candidate]) -> Candidate:
        if len(tied) == 1:
            return tied[0]
        self._rotation += 1
        return tied[self._rotation % len(tied)]

    def _prefix(self, eligible: list[Candidate], anchor: int | None = None) -> Candidate:
        total_in = sum(c.total for c in eligible)
        total_weight = sum(c.weight for c in eligible)
        factor = self.prefix.balance_factor
        allowed = [c for c in eligible
                   if c.total + 1 <= math.ceil(factor * (total_in + 1) * c.weight / total_weight)]
        if not any(c.matched for c in allowed):
            # A cold prompt: the least loaded, relative to weight (in flight per weight now);
            # among equals (all idle, say) the anchor's rendezvous choice, which spreads new
            # conversations by weight, and on which gateways and workers that see the same loads
            # agree.
            best_load = min(c.total / c.weight for c in allowed)
            least = [c for c in allowed if c.total / c.weight == best_load]
            return rendezvous(anchor, least) if anchor is not None else self._lightest(least)
        k = self.prefix.load_blocks
        best = max(c.matched - k * c.load for c in allowed)
        top = [c for c in allowed if c.matched - k * c.load == best]
        return self._lightest(top)

    def _lightest(self, cands: list[Candidate]) -> Candidate:
        """``prefix``'s tie-break: the least loaded once this request is added, then in turn."""
        best = min(c.load for c in cands)
        return self._rotate([c for c in cands if c.load == best])


_SPAN = float(1 << 52)  # u = (52 hash bits + 0.5) / 2**52: exact in a float, never 0 or 1


def rendezvous(anchor: int, candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the highest weighted rendezvous score for ``anchor`` (Schindelhauer
    and Schomaker's logarithmic method: ``-weight / ln(u)``, ``u`` uniform in (0, 1) from a hash
    of anchor and address), so each backend gets conversations in proportion to its weight and
    removing one moves only its own. The hash is xxh3 with no per-process salt: every gateway
    computes the same scores."""
    best, best_score = candidates[0], -1.0
    for c in candidates:
        u = ((xxhash.xxh3_64_intdigest(b"%d %s" % (anchor, c.address.encode())) >> 12) + 0.5) / _SPAN
        score = -c.weight / math.log(u)
        if score > best_score or (score == best_score and c.address < best.address):
            best, best_score = c, score
    return best
