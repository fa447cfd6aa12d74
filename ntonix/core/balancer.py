"""Smooth weighted round-robin, exactly as nginx picks an upstream peer.

Theory of operation (``ngx_http_upstream_get_peer`` in ``ngx_http_upstream_round_robin.c``):
every peer carries a ``current`` weight, starting at 0. On each pick, every *eligible* peer's
``current`` grows by its weight; the peer with the largest ``current`` wins (ties go to the one
configured first) and its ``current`` drops by the sum of the eligible weights. Over any run of
``sum(weights)`` picks with a fixed eligible set each peer is chosen exactly ``weight`` times, and
the choices are interleaved (4/1/1 gives a a b a c a, never a a a a b c).

Ineligible peers (unhealthy, breaker open) are skipped for that pick and their ``current`` is
left as it is. nginx also lowers an ``effective_weight`` after failures; here that job belongs to
the breaker and health modules, which shrink the eligible set instead.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass

__all__ = ["SmoothWeightedRoundRobin"]


@dataclass(slots=True)
class _Peer:
    name: str
    weight: int
    current: int = 0


def _validated(weights: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    for i, (name, weight) in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ValueError(f"weights[{i}] ({name!r}): weight must be an integer >= 1, got {weight!r}")
        if name in seen:
            raise ValueError(f"weights[{i}]: duplicate peer name {name!r}")
        seen.add(name)
        out.append((name, weight))
    return out


class SmoothWeightedRoundRobin:
    """Picks peer names in nginx's smooth weighted round-robin order.

    >>> b = SmoothWeightedRoundRobin([("a", 4), ("b", 1), ("c", 1)])
    >>> [b.pick() for _ in range(6)]
    ['a', 'a', 'b', 'a', 'c', 'a']
    """

    __slots__ = ("_peers",)

    def __init__(self, weights: Sequence[tuple[str, int]]) -> None:
        self._peers = [_Peer(name, weight) for name, weight in _validated(weights)]

    @property
    def names(self) -> tuple[str, ...]:
        """Peer names in configured order."""
        return tuple(p.name for p in self._peers)

    def pick(self, eligible: Container[str] | None = None) -> str | None:
        """The next peer among ``eligible`` (None means all); None when no peer is eligible."""
        best: _Peer | None = None
        total = 0
        for peer in self._peers:
            if eligible is not None and peer.name not in eligible:
                continue
            peer.current += peer.weight
            total += peer.weight
            if best is None or peer.current > best.current:
                best = peer
        if best is None:
            return None
        best.current -= total
        return best.name

    def update(self, weights: Sequence[tuple[str, int]]) -> None:
        """Take a new peer list; peers that remain keep their place in the rotation.

        A remaining peer keeps its ``current`` weight (so a reload does not restart the sequence
        and favour the first peers), a new one starts at 0 and a removed one is forgotten.
        """
        validated = _validated(weights)
        old = {p.name: p.current for p in self._peers}
        self._peers = [_Peer(name, weight, old.get(name, 0)) for name, weight in validated]

    def __repr__(self) -> str:
        peers = " ".join(f"{p.name}:w={p.weight},cur={p.current}" for p in self._peers)
        return f"<SmoothWeightedRoundRobin {peers}>"
