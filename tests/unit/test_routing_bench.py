"""The routing benchmark's pure parts: workload generator, routers, statistics (tools/routing_bench)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from mock_llm.kvcache import render_prompt, tokenize
from tools.routing_bench.routers import BlockIndex, ReferenceRouter, RoundRobin, UserHash, char_block_hashes
from tools.routing_bench.stats import (
    BackendCounts,
    Row,
    Turn,
    l4_checks,
    l4_label,
    limit_checks,
    percentile,
    prefix_checks,
    real_checks,
    summarize,
)
from tools.routing_bench.workload import Spec, conversations, total_prompt_tokens, working_set_blocks

SMALL = Spec(users=6, groups=2, system_tokens=40, rounds=3, question_tokens=8, answer_tokens=8, think_ms=100)


# ----------------------------------------------------------------------------- workload


def test_the_same_spec_gives_the_same_conversations() -> None:
    assert conversations(SMALL) == conversations(SMALL)
    assert conversations(replace(SMALL, seed=2)) != conversations(SMALL)


def test_users_share_their_group_system_prompt_and_token_counts_are_exact() -> None:
    convs = conversations(SMALL)
    assert [c.group for c in convs] == [0, 1, 0, 1, 0, 1]
    assert convs[0].system == convs[2].system != convs[1].system
    assert len(tokenize(convs[0].system)) == 40 and len(convs[0].system) == 160
    assert all(len(tokenize(q)) == 8 for c in convs for q in c.questions)
    assert len({q for c in convs for q in c.questions}) == 6 * 3  # no two questions alike


def test_think_times_are_seeded_and_bounded() -> None:
    for conv in conversations(SMALL):
        assert conv.pauses[0] == 0 and len(conv.pauses) == 3
        assert all(0 <= p <= 0.1 for p in conv.pauses)
    assert all(c.pauses == (0, 0, 0) for c in conversations(replace(SMALL, think_ms=0)))


def test_each_turn_extends_the_previous_one() -> None:
    conv = conversations(SMALL)[0]
    first = conv.messages([])
    assert [m["role"] for m in first] == ["system", "user"]
    second = conv.messages([" abc" * 8])
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[:2] == first
    assert render_prompt(True, {"messages": second}).startswith(render_prompt(True, {"messages": first}))


def test_models_alternate_by_user_when_mixed() -> None:
    convs = conversations(replace(SMALL, models=("m1", "m2", "m3")))
    assert [c.model for c in convs] == ["m1", "m2", "m3", "m1", "m2", "m3"]
    assert {c.model for c in conversations(SMALL)} == {"mock-model"}


def test_working_set_counts_shared_system_prompts_once() -> None:
    one = working_set_blocks(replace(SMALL, users=1, groups=1))
    assert working_set_blocks(replace(SMALL, users=2, groups=2)) == 2 * one  # nothing shared
    shared = working_set_blocks(replace(SMALL, users=2, groups=1))
    assert one < shared < 2 * one  # the system prompt's blocks are counted once
    assert working_set_blocks(Spec()) == 4800  # the workload: 76,800 tokens


def test_total_prompt_tokens_grows_with_rounds() -> None:
    spec = replace(SMALL, users=1, groups=1, rounds=1)
    one_turn = total_prompt_tokens(spec)
    assert one_turn == len(tokenize(render_prompt(True, {"messages": conversations(spec)[0].messages([])})))
    assert total_prompt_tokens(replace(spec, rounds=2)) > 2 * one_turn


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="users"):
        Spec(users=0)
    with pytest.raises(ValueError, match="think_ms"):
        Spec(think_ms=-1)


# ----------------------------------------------------------------------------- routers


def test_round_robin_ignores_everything() -> None:
    rr = RoundRobin(3)
    assert [rr.pick(0, "x", [0]) for _ in range(4)] == [0, 1, 2, 0]
    assert rr.in_flight == [2, 1, 1]
    rr.done(0)
    assert rr.in_flight == [1, 1, 1]


def test_user_hash_is_stable_and_stays_among_candidates() -> None:
    uh = UserHash(4)
    assert len({uh.pick(7, "a", [0, 1, 2, 3]) for _ in range(5)}) == 1
    assert all(uh.pick(u, "a", [1, 3]) in (1, 3) for u in range(20))


def test_block_index_matches_leading_blocks_and_forgets_least_recent() -> None:
    index = BlockIndex(capacity=3)
    a, b = char_block_hashes("a" * 128, 64), char_block_hashes("b" * 128, 64)
    index.add(a)
    assert index.match(a) == 2 and index.match(b) == 0
    assert index.match([b[0], a[1]]) == 0  # chained: the first miss ends the match
    index.add(b)  # 4 blocks > 3: a's first block goes
    assert index.match(a) == 0 and index.match(b) == 2


def test_reference_router_follows_the_prefix_unless_that_backend_is_much_busier() -> None:
    router = ReferenceRouter(3, capacity_blocks=100, slack=2)
    text = "s" * 640
    first = router.pick(0, text, [0, 1, 2])
    assert first == 0  # cold: the least busy (the first of equals)
    assert router.pick(1, text + "more", [0, 1, 2]) == first  # same prefix, within slack
    assert router.pick(2, text + "again", [0, 1, 2]) == first  # 2 in flight there, 0 elsewhere: still ok
    # Now 3 in flight on backend 0, 0 elsewhere: beyond the slack, the prefix is not worth it.
    other = router.pick(3, text + "busy", [0, 1, 2])
    assert other in (1, 2)
    for _ in range(3):
        router.done(0)
    assert router.pick(4, text + "later", [0, 1, 2]) == 0
    # Only suitable backends are considered.
    assert router.pick(5, "t" * 640, [2]) == 2


def test_reference_router_spreads_cold_requests() -> None:
    router = ReferenceRouter(3, capacity_blocks=100)
    picks = [router.pick(u, f"{u}" * 640, [0, 1, 2]) for u in range(6)]
    assert sorted(picks) == [0, 0, 1, 1, 2, 2]


# ----------------------------------------------------------------------------- statistics


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))


def test_summary_of_a_run() -> None:
    turns = [Turn(0, 0, 200, 0.1, 1.0, 10), Turn(0, 1, 200, 0.3, 2.0, 20), Turn(1, 0, 503, None, 0.01, error="x"),
             Turn(1, 1, 200, None, 0.5)]
    backends = [BackendCounts(3, 0, 100, 40, 60, 2), BackendCounts(1, 2, 50, 50, 0, 1)]
    row = summarize("t", turns, backends, 5.0)
    assert (row.requests, row.failures) == (4, 1)
    assert row.ttft_p50 == pytest.approx(0.2) and row.e2e_p99 == pytest.approx(1.98)
    assert (row.prefill_tokens, row.prompt_tokens, row.cached_tokens) == (90, 150, 60)
    assert row.cached_ratio == pytest.approx(0.4)
    assert row.per_backend == (3, 1) and row.skew == 3.0 and row.wrong_model == 2
    assert row.peak_per_backend == (2, 1)


def _row(label: str, prefill: int, ttft_p99: float, per_backend: tuple[int, ...] = (10, 10), failures: int = 0) -> Row:
    return Row(label, 20, failures, 0.0, ttft_p99, 1.0, prefill, 1000, 0, per_backend, 0, 1.0)


def test_prefix_targets() -> None:
    rows = {
        "ntonix round_robin w1": _row("ntonix round_robin w1", 1000, 1.0),
        "ntonix least_requests w1": _row("ntonix least_requests w1", 900, 0.5),
        "ntonix prefix w1": _row("ntonix prefix w1", 300, 0.2),
        "ntonix round_robin w2": _row("ntonix round_robin w2", 1000, 1.0),
        "ntonix prefix w2": _row("ntonix prefix w2", 400, 0.2, per_backend=(16, 10), failures=1),
    }
    checks = prefix_checks(rows, [1, 2, 4])
    assert [c.ok for c in checks[:5]] == [True, True, True, True, True]
    assert [c.ok for c in checks[5:10]] == [False, True, False, False, None]  # 0.40 ×; skew 1.6; 1 failure
    assert checks[10].ok is None and "not run" in checks[10].value
    assert checks[0].line().startswith("PASS  prefix at 1 worker(s): prefill tokens")


def test_max_in_flight_target() -> None:
    held = replace(_row("ntonix round_robin w4", 1000, 1.0), peak_per_backend=(2, 2, 1, 2))
    over = replace(_row("ntonix prefix w4", 1000, 1.0), peak_per_backend=(2, 3, 2, 2))
    checks = limit_checks({"direct": _row("direct", 1, 1.0), held.label: held, over.label: over}, 2)
    assert [(c.ok, c.value) for c in checks] == [(True, "2/2/1/2"), (False, "2/3/2/2")]
    assert limit_checks({"direct": _row("direct", 1, 1.0)}, 2)[0].ok is None


def test_two_gateways_behind_the_balancer_stay_within_ten_percent_of_one_gateway() -> None:
    assert l4_label("prefix", 2, 1) == "ntonix prefix 2×w1 via haproxy"
    rows = {label: _row(label, prefill, 1.0, failures=failures) for label, prefill, failures in (
        ("ntonix prefix w1", 10_000, 0), ("ntonix prefix 2×w1 via haproxy", 10_900, 0),
        ("ntonix prefix w2", 10_000, 0), ("ntonix prefix 2×w2 via haproxy", 8_800, 2))}
    checks = l4_checks(rows, [1, 2, 4], 2)
    assert [(c.ok, c.value) for c in checks[:2]] == [(True, "10,900 vs 10,000 = 1.09 ×"), (True, "0")]
    assert [(c.ok, c.value) for c in checks[2:4]] == [(False, "8,800 vs 10,000 = 0.88 ×"), (False, "2")]
    assert checks[4].ok is None and "not run" in checks[4].value
    assert checks[0].line() == ("PASS  prefix through 2 gateways at 1 worker(s) each: prefill tokens within 10 % "
                                "of one gateway's: 10,900 vs 10,000 = 1.09 ×")
    assert l4_checks(rows, [1], 3)[0].ok is None  # three gateways were not run


def test_real_server_targets_compare_prefix_with_the_gateways_round_robin_else_direct() -> None:
    rows = {label: _row(label, prefill, 1.0, failures=failures) for label, prefill, failures in (
        ("direct", 2000, 0), ("ntonix round_robin w1", 1000, 0), ("ntonix prefix w1", 700, 1))}
    assert [(c.ok, c.value) for c in real_checks(rows, [1])] == [(True, "0.70 ×"), (False, "1")]
    del rows["ntonix round_robin w1"]
    rows["ntonix prefix w1"] = _row("ntonix prefix w1", 2100, 1.0)
    assert [(c.ok, c.value) for c in real_checks(rows, [1])] == [(False, "1.05 ×"), (True, "0")]
    assert real_checks(rows, [2])[0].ok is None
