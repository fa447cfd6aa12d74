"""ntonix.core.routing: policy decisions from plain values."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ntonix.core.routing import Candidate, Decision, Outcome, PrefixSettings, Router


def picks(router: Router, candidates: list[Candidate], n: int) -> list[str | None]:
    return [router.choose(candidates).address for _ in range(n)]


def test_round_robin_is_smooth_weighted() -> None:
    cands = [Candidate("a", 4), Candidate("b", 1), Candidate("c", 1)]
    assert picks(Router("round_robin"), cands, 6) == ["a", "a", "b", "a", "c", "a"]


def test_round_robin_skips_unroutable_and_at_limit() -> None:
    cands = [Candidate("a"), Candidate("b", routable=False), Candidate("c", in_flight=2, max_in_flight=2),
             Candidate("d")]
    assert set(picks(Router("round_robin"), cands, 10)) == {"a", "d"}


def test_round_robin_keeps_its_place_when_a_backend_joins() -> None:
    r = Router("round_robin")
    two = [Candidate("a"), Candidate("b")]
    assert picks(r, two, 3) == ["a", "b", "a"]
    assert picks(r, [*two, Candidate("c")], 3) == ["b", "c", "a"]


def test_none_and_at_limit_outcomes() -> None:
    r = Router("least_requests")
    assert r.choose([]) == Decision(Outcome.NONE)
    assert r.choose([Candidate("a", routable=False)]).outcome is Outcome.NONE
    full = [Candidate("a", in_flight=3, max_in_flight=3), Candidate("b", in_flight=5, max_in_flight=4),
            Candidate("c", in_flight=9, routable=False)]
    assert r.choose(full).outcome is Outcome.AT_LIMIT
    assert r.choose([*full, Candidate("d", in_flight=50)]).address == "d"


@pytest.mark.parametrize("policy", ["round_robin", "least_requests", "prefix"])
def test_no_limit_means_never_at_limit(policy: str) -> None:
    assert Router(policy).choose([Candidate("a", in_flight=10_000)]).address == "a"


def test_least_requests_relative_to_weight() -> None:
    r = Router("least_requests")
    assert r.choose([Candidate("a", 1, in_flight=2), Candidate("b", 1, in_flight=1)]).address == "b"
    assert r.choose([Candidate("a", 1, in_flight=1), Candidate("b", 3, in_flight=2)]).address == "b"  # 1 > 2/3
    # Idle, one request at a time: ties go by weight, as nginx's least_conn (the weight-1 backend
    # got nothing when the heavier one won every tie).
    assert Counter(picks(r, [Candidate("a", 1), Candidate("b", 3)], 400)) == {"a": 100, "b": 300}
    # 3 in flight on weight 3 against 1 on weight 1: a tie, shared by weight, interleaved
    tied = [Candidate("a", 1, in_flight=1), Candidate("b", 3, in_flight=3)]
    assert sorted(picks(r, tied, 4)) == ["a", "b", "b", "b"]


def test_least_requests_ties_rotate_fairly() -> None:
    r = Router("least_requests")
    idle = [Candidate("a"), Candidate("b"), Candidate("c")]
    assert Counter(picks(r, idle, 300)) == {"a": 100, "b": 100, "c": 100}


def test_prefix_follows_the_match_when_loads_are_close() -> None:
    r = Router("prefix", PrefixSettings(balance_factor=1.5, load_blocks=4))
    cands = [Candidate("a", in_flight=2), Candidate("b", in_flight=3, matched=40), Candidate("c", in_flight=2)]
    assert r.choose(cands) == Decision(Outcome.CHOSEN, "b", 40)


def test_prefix_longer_match_wins() -> None:
    r = Router("prefix")
    cands = [Candidate("a", matched=10), Candidate("b", matched=30), Candidate("c", matched=20)]
    assert r.choose(cands).address == "b"


def test_prefix_leaves_a_markedly_busier_backend() -> None:
    r = Router("prefix", PrefixSettings(balance_factor=1.5, load_blocks=4))
    # b holds the prefix but carries 12 of 15 requests: above 1.5 x the average
    cands = [Candidate("a", in_flight=1), Candidate("b", in_flight=12, matched=100), Candidate("c", in_flight=2)]
    assert r.choose(cands).address == "a"


def test_prefix_exchange_rate_trades_match_for_load() -> None:
    # within the balance bound, 10 matched blocks are worth less than 3 requests at 4 blocks each
    r = Router("prefix", PrefixSettings(balance_factor=100, load_blocks=4))
    assert r.choose([Candidate("a", in_flight=5, matched=10), Candidate("b", in_flight=2)]).address == "b"
    assert r.choose([Candidate("a", in_flight=5, matched=13), Candidate("b", in_flight=2)]).address == "a"
    # load_blocks 0: the longest match wins inside the bound, whatever the load
    r0 = Router("prefix", PrefixSettings(balance_factor=100, load_blocks=0))
    assert r0.choose([Candidate("a", in_flight=50, matched=1), Candidate("b")]).address == "a"


def test_prefix_cold_prompt_goes_to_least_loaded_relative_to_weight() -> None:
    r = Router("prefix")
    cands = [Candidate("a", 1, in_flight=2), Candidate("b", 4, in_flight=4), Candidate("c", 1, in_flight=1)]
    assert r.choose(cands).address == "b"  # 5/4 < 2/1 < 3/1
    idle = [Candidate("a"), Candidate("b"), Candidate("c"), Candidate("d")]
    assert Counter(picks(r, idle, 400)) == {"a": 100, "b": 100, "c": 100, "d": 100}


def test_prefix_bound_respects_weights() -> None:
    r = Router("prefix", PrefixSettings(balance_factor=1.0, load_blocks=0))
    # total 7 in flight (+1 = 8), weights 3:1: capacity of a = ceil(8 * 3/4) = 6 > 5 -> allowed
    assert r.choose([Candidate("a", 3, in_flight=5, matched=9), Candidate("b", 1, in_flight=2)]).address == "a"
    # capacity of b = ceil(8 * 1/4) = 2, b would carry 3: not allowed despite its match
    assert r.choose([Candidate("a", 3, in_flight=5), Candidate("b", 1, in_flight=2, matched=9)]).address == "a"


def test_prefix_skips_unroutable_holder() -> None:
    r = Router("prefix")
    assert r.choose([Candidate("a", matched=50, routable=False), Candidate("b")]).address == "b"
    assert r.choose([Candidate("a", matched=50, in_flight=1, max_in_flight=1), Candidate("b")]).address == "b"


def test_policy_change_keeps_rotation_state() -> None:
    r = Router("round_robin")
    two = [Candidate("a"), Candidate("b")]
    assert picks(r, two, 1) == ["a"]
    r.configure("least_requests")
    assert r.policy == "least_requests"
    r.configure("round_robin", backends=[("a", 1), ("b", 1)])
    assert picks(r, two, 1) == ["b"]
    with pytest.raises(ValueError, match="unknown routing policy"):
        r.configure("random")
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router("fastest")
    assert "round_robin" in repr(r)


def test_prefix_cold_prompt_with_an_anchor_is_the_same_choice_on_every_gateway() -> None:
    idle = [Candidate("10.0.0.1:8000"), Candidate("10.0.0.2:8000"), Candidate("10.0.0.3:8000")]
    gateway_a, gateway_b = Router("prefix"), Router("prefix")
    picks(gateway_b, idle, 7)  # b's tie rotation is elsewhere: the anchor must not depend on it
    for anchor in range(200):
        assert gateway_a.choose(idle, anchor).address == gateway_b.choose(idle, anchor).address
    # ... in the order the candidates come in, too.
    assert all(gateway_a.choose(idle, n).address == gateway_a.choose(idle[::-1], n).address for n in range(200))


def test_prefix_anchor_spreads_conversations_by_weight_and_a_removal_moves_only_its_own() -> None:
    r = Router("prefix")
    cands = [Candidate("a", 1), Candidate("b", 2), Candidate("c", 1)]
    placed = {n: r.choose(cands, n).address for n in range(4000)}
    share = Counter(placed.values())
    assert 0.45 < share["b"] / 4000 < 0.55 and 0.2 < share["a"] / 4000 < 0.3, share
    without_c = {n: r.choose(cands[:2], n).address for n in range(4000)}
    assert all(without_c[n] == placed[n] for n in placed if placed[n] != "c")


def test_prefix_anchor_yields_to_the_load_bound_and_to_a_known_prefix() -> None:
    r = Router("prefix")
    idle = [Candidate("a"), Candidate("b")]
    anchor = next(n for n in range(100) if r.choose(idle, n).address == "a")
    # a carries 3 of 3 in flight: over the bound ceil(1.5 * 4 / 2) = 3, so the cold prompt goes to b
    assert r.choose([Candidate("a", in_flight=3), Candidate("b")], anchor).address == "b"
    # a backend believed to hold the prompt wins over the hash
    assert r.choose([Candidate("a"), Candidate("b", matched=4)], anchor).address == "b"


def test_rendezvous_never_divides_by_zero_at_the_ends_of_the_hash_range() -> None:
    from ntonix.core.routing import rendezvous

    cands = [Candidate(str(i)) for i in range(50)]
    assert {rendezvous(n, cands).address for n in range(-3, 3000)} == {c.address for c in cands}


def test_prefix_weighs_the_other_gateways_load_but_max_in_flight_counts_only_its_own() -> None:
    r = Router("prefix")
    # This gateway sends nothing to a, the others 4: a, holding the prompt, is over the bound
    # ceil(1.5 * (4 + 1) / 2) = 4 once they are counted, and the turn goes to b.
    assert r.choose([Candidate("a", matched=10), Candidate("b")]).address == "a"
    assert r.choose([Candidate("a", matched=10, remote=4), Candidate("b")]).address == "b"
    # ... and in the exchange rate: 3 more in flight elsewhere cost 6 blocks of match (load_blocks 2).
    close = [Candidate("a", matched=10), Candidate("b", matched=7)]
    assert r.choose(close).address == "a"
    assert r.choose([Candidate("a", matched=10, remote=2), Candidate("b", matched=7)]).address == "b"
    # max_in_flight bounds this gateway's own requests: the others' do not fill it.
    assert not Candidate("a", in_flight=1, max_in_flight=2, remote=9).at_limit
    assert Candidate("a", in_flight=2, max_in_flight=2).at_limit
    assert Candidate("a", in_flight=2, remote=3).total == 5


@pytest.mark.parametrize("seed", range(20))
def test_gateways_sharing_their_counts_decide_as_one_gateway_would(seed: int) -> None:
    # Each backend's requests split at random between two gateways: each gateway's own counts
    # plus the other's (as ``remote``) give the same choice as one gateway counting them all,
    # whatever the split; their own counts alone often do not.
    rng = random.Random(seed)
    names = [f"10.0.0.{i}:8000" for i in range(4)]
    differ = 0
    for _ in range(50):
        here = [rng.randint(0, 8) for _ in names]
        there = [rng.randint(0, 8) for _ in names]
        matched = [rng.choice((0, 0, 16, 17, 19)) for _ in names]
        anchor = rng.getrandbits(64)

        def choice(own: list[int], other: list[int] | None, matched: list[int] = matched,
                   anchor: int = anchor) -> str | None:
            cands = [Candidate(n, in_flight=i, matched=m, remote=o)
                     for n, i, m, o in zip(names, own, matched, other or [0] * len(names), strict=True)]
            return Router("prefix").choose(cands, anchor).address

        one = choice([a + b for a, b in zip(here, there, strict=True)], None)
        assert choice(here, there) == one == choice(there, here)
        differ += choice(here, None) != one or choice(there, None) != one
    assert differ > 5  # the property is not vacuous: alone, the gateways disagree


def test_prefix_sends_a_cold_prompt_to_the_least_loaded_backend_relative_to_weight() -> None:
    """INTERFACE.md: a prompt with no known prefix goes to the least loaded suitable backend,
    relative to weight; the anchor only chooses among equally loaded ones."""
    r = Router("prefix")
    for anchor in range(200):
        assert r.choose([Candidate("a", in_flight=1), Candidate("b")], anchor).address == "b"
        assert r.choose([Candidate("a", in_flight=1, weight=2), Candidate("b", in_flight=1)], anchor).address == "a"
        assert r.choose([Candidate("a"), Candidate("b", remote=1)], anchor).address == "a"  # other gateways' too
    idle = {r.choose([Candidate("a"), Candidate("b")], n).address for n in range(200)}
    assert idle == {"a", "b"}  # all idle: the anchors spread them
