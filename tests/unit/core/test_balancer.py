from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Container

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.balancer import SmoothWeightedRoundRobin


def picks(b: SmoothWeightedRoundRobin, n: int, eligible: Container[str] | None = None) -> list[str | None]:
    return [b.pick(eligible) for _ in range(n)]


def test_nginx_sequence_4_1_1() -> None:
    b = SmoothWeightedRoundRobin([("a", 4), ("b", 1), ("c", 1)])
    assert picks(b, 6) == ["a", "a", "b", "a", "c", "a"]
    assert picks(b, 6) == ["a", "a", "b", "a", "c", "a"]  # the cycle repeats


def test_nginx_sequence_5_1_1() -> None:
    # The example from nginx's commit introducing smooth weighted round-robin.
    b = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])
    assert picks(b, 7) == ["a", "a", "b", "a", "c", "a", "a"]


def test_weights_1_3_split_exactly() -> None:
    b = SmoothWeightedRoundRobin([("x", 1), ("y", 3)])
    assert Counter(picks(b, 400)) == {"x": 100, "y": 300}


def test_equal_weights_alternate_in_configured_order() -> None:
    b = SmoothWeightedRoundRobin([("a", 1), ("b", 1), ("c", 1)])
    assert picks(b, 6) == ["a", "b", "c", "a", "b", "c"]


def test_ineligible_peer_is_skipped_and_its_weight_untouched() -> None:
    b = SmoothWeightedRoundRobin([("a", 4), ("b", 1), ("c", 1)])
    b.pick()  # a: a=-2, b=1, c=1
    before = repr(b)
    assert "a:w=4,cur=-2 b:w=1,cur=1 c:w=1,cur=1" in before
    assert b.pick({"b", "c"}) == "b"  # b and c get +1; b wins the tie, b -= 2
    assert "a:w=4,cur=-2 b:w=1,cur=0 c:w=1,cur=2" in repr(b)
    assert Counter(picks(b, 100, {"a", "c"})) == {"a": 80, "c": 20}


def test_ineligible_by_any_container() -> None:
    b = SmoothWeightedRoundRobin([("a", 1), ("b", 1)])
    assert picks(b, 3, eligible=["b"]) == ["b", "b", "b"]
    assert picks(b, 2, eligible=("a",)) == ["a", "a"]


def test_no_eligible_peer_gives_none_and_changes_nothing() -> None:
    b = SmoothWeightedRoundRobin([("a", 2), ("b", 1)])
    b.pick()
    state = repr(b)
    assert b.pick(set()) is None
    assert b.pick({"zzz"}) is None
    assert repr(b) == state


def test_empty_pool() -> None:
    b = SmoothWeightedRoundRobin([])
    assert b.pick() is None
    assert b.names == ()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_weight_must_be_positive_integer(bad: object) -> None:
    with pytest.raises(ValueError, match=r"weights\[1\].*>= 1"):
        SmoothWeightedRoundRobin([("a", 1), ("b", bad)])  # type: ignore[list-item]
    b = SmoothWeightedRoundRobin([("a", 1)])
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        b.update([("a", bad)])  # type: ignore[list-item]
    assert b.names == ("a",)  # a rejected update leaves the balancer as it was


def test_duplicate_names_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        SmoothWeightedRoundRobin([("a", 1), ("a", 2)])


def test_names_and_repr() -> None:
    b = SmoothWeightedRoundRobin([("10.0.0.5:8000", 3), ("10.0.0.6:8000", 1)])
    assert b.names == ("10.0.0.5:8000", "10.0.0.6:8000")
    assert repr(b) == "<SmoothWeightedRoundRobin 10.0.0.5:8000:w=3,cur=0 10.0.0.6:8000:w=1,cur=0>"


def test_update_with_same_weights_continues_the_sequence() -> None:
    ref = SmoothWeightedRoundRobin([("a", 4), ("b", 1), ("c", 1)])
    b = SmoothWeightedRoundRobin([("a", 4), ("b", 1), ("c", 1)])
    picks(ref, 3)
    picks(b, 3)
    b.update([("a", 4), ("b", 1), ("c", 1)])
    assert picks(b, 9) == picks(ref, 9)


def test_update_keeps_remaining_current_weights() -> None:
    b = SmoothWeightedRoundRobin([("a", 4), ("b", 1), ("c", 1)])
    b.pick()  # a=-2 b=1 c=1
    b.update([("c", 2), ("a", 4), ("d", 1)])
    assert b.names == ("c", "a", "d")
    assert repr(b) == "<SmoothWeightedRoundRobin c:w=2,cur=1 a:w=4,cur=-2 d:w=1,cur=0>"


def test_update_stays_smooth() -> None:
    b = SmoothWeightedRoundRobin([("a", 1), ("b", 1)])
    picks(b, 1)  # a=-1 b=1
    b.update([("a", 1), ("b", 1), ("c", 1)])
    # No burst: the new peer joins the rotation instead of taking several picks in a row,
    # and after the first full cycle every peer has been picked once per cycle.
    seq = picks(b, 30)
    assert all(x != y for x, y in itertools.pairwise(seq))
    for i in range(3, 30, 3):
        assert sorted(str(s) for s in seq[i : i + 3]) == ["a", "b", "c"]


def test_update_adding_heavy_peer_is_interleaved() -> None:
    b = SmoothWeightedRoundRobin([("a", 1), ("b", 1)])
    picks(b, 5)
    b.update([("a", 1), ("b", 1), ("big", 4)])
    seq = picks(b, 60)
    assert max(len(run) for run in "".join("x" if s == "big" else "." for s in seq).split(".")) <= 2
    assert Counter(seq[6:]) == {"big": 36, "a": 9, "b": 9}


def test_update_removing_peer() -> None:
    b = SmoothWeightedRoundRobin([("a", 1), ("b", 1), ("c", 1)])
    picks(b, 2)
    b.update([("a", 1), ("c", 1)])
    assert set(picks(b, 10)) == {"a", "c"}


@given(
    weights=st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8),
    k=st.integers(min_value=1, max_value=4),
)
def test_every_period_gives_exact_shares(weights: list[int], k: int) -> None:
    b = SmoothWeightedRoundRobin([(f"p{i}", w) for i, w in enumerate(weights)])
    counts = Counter(picks(b, sum(weights) * k))
    assert counts == {f"p{i}": w * k for i, w in enumerate(weights)}


@given(
    weights=st.lists(st.integers(min_value=1, max_value=10), min_size=2, max_size=6),
    data=st.data(),
)
def test_exact_shares_among_eligible_subset(weights: list[int], data: st.DataObject) -> None:
    names = [f"p{i}" for i in range(len(weights))]
    b = SmoothWeightedRoundRobin(list(zip(names, weights, strict=True)))
    eligible = set(data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True)))
    counts = Counter(picks(b, sum(w for n, w in zip(names, weights, strict=True) if n in eligible) * 2, eligible))
    assert counts == {n: 2 * w for n, w in zip(names, weights, strict=True) if n in eligible}
