"""ntonix.routing.select: policy + host-shared counts + prefix index, in one process with a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from ntonix.config.model import BackendConfig, Config, RoutingConfig
from ntonix.core.routing import Router
from ntonix.errors import BackendsBusy, NoHealthyBackend, render_error
from ntonix.routing.index import PrefixIndex
from ntonix.routing.load import HostLoad
from ntonix.routing.select import Selector, Target
from ntonix.routing.state import RoutingState
from tests.fakes import FakeClock

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def selector(tmp_path: Path, clock: FakeClock, policy: str = "prefix", timeout: float = 5.0,
             pid: int = 101) -> Selector:
    load = HostLoad(str(tmp_path / "load"), clock=clock, sleep=clock.advance, poll_s=0.01, pid=pid,
                    alive=lambda p: True, slots=8, backends=8)
    index = PrefixIndex(str(tmp_path / "index"), entries=4096, clock=clock)
    return Selector(Router(policy), load, index, queue_timeout_s=timeout)


def test_a_conversation_sticks_and_others_spread(tmp_path: Path, clock: FakeClock) -> None:
    sel = selector(tmp_path, clock)
    targets = [Target(A), Target(B), Target(C)]
    conversation = list(range(1, 21))
    first = sel.acquire(targets, conversation)
    assert first.matched == 0
    # another cold prompt goes elsewhere while the first is in flight
    other = sel.acquire(targets, list(range(100, 120)))
    assert other.address != first.address
    first.release()
    other.release()
    # the next turn (its history plus new blocks) follows the first
    turn2 = sel.acquire(targets, [*conversation, 21, 22])
    assert turn2.address == first.address
    assert turn2.matched == 20
    turn2.release()
    turn2.release()  # idempotent
    assert sel.load.in_flight(first.address) == 0


def test_another_worker_sees_the_same_index_and_counts(tmp_path: Path, clock: FakeClock) -> None:
    w1, w2 = selector(tmp_path, clock, pid=101), selector(tmp_path, clock, pid=102)
    targets = [Target(A), Target(B)]
    lease = w1.acquire(targets, list(range(1, 11)))
    again = w2.acquire(targets, list(range(1, 13)))
    assert again.address == lease.address
    assert w2.load.in_flight(lease.address) == 2


def test_unroutable_and_excluded(tmp_path: Path, clock: FakeClock) -> None:
    sel = selector(tmp_path, clock, policy="round_robin")
    assert sel.acquire([Target(A, routable=False), Target(B)]).address == B
    assert sel.acquire([Target(A), Target(B)], exclude={A}).address == B
    with pytest.raises(NoHealthyBackend) as info:
        sel.acquire([Target(A, routable=False)])
    assert info.value.retry_after == 1


def test_at_limit_waits_then_times_out_with_503(tmp_path: Path, clock: FakeClock) -> None:
    sel = selector(tmp_path, clock, policy="least_requests", timeout=2.0)
    targets = [Target(A, max_in_flight=1), Target(B, max_in_flight=1)]
    held = [sel.acquire(targets), sel.acquire(targets)]
    assert {h.address for h in held} == {A, B}
    start = clock()
    with pytest.raises(BackendsBusy) as info:
        sel.acquire(targets)
    assert clock() - start >= 2.0
    status, headers, body = render_error(info.value)
    assert status.startswith("503")
    assert ("Retry-After", "1") in headers
    assert b"backends_busy" in body
    assert sel.load.queued(A) == 0


def test_a_waiter_gets_the_place_that_frees(tmp_path: Path, clock: FakeClock) -> None:
    sel = selector(tmp_path, clock, policy="least_requests")
    targets = [Target(A, max_in_flight=1)]
    held = sel.acquire(targets)
    # the holder finishes while the newcomer waits: the fake sleep is where it happens
    sleep = sel.load._sleep

    def finish_then_sleep(seconds: float) -> None:
        held.release()
        sleep(seconds)

    sel.load._sleep = finish_then_sleep
    lease = sel.acquire(targets)
    assert lease.address == A
    assert lease.waited
    assert sel.load.in_flight(A) == 1


def test_a_waiter_follows_the_targets_when_they_change(tmp_path: Path, clock: FakeClock) -> None:
    """A HUP while requests wait: the backend they wait for is replaced by another, or its
    limit is raised. They go on at once, not after the queue timeout."""
    sel = selector(tmp_path, clock, policy="least_requests", timeout=10.0)
    old = [Target(A, max_in_flight=1)]
    held = sel.acquire(old)
    now: list[Target] = old
    start = clock()
    clock_at_change = start + 0.5

    def refresh() -> list[Target]:
        return now if clock() < clock_at_change else [Target(B, max_in_flight=1)]

    lease = sel.acquire(old, refresh=refresh)
    assert lease.address == B and lease.waited
    assert clock() - start < 0.6
    assert sel.load.queued(A) == 0
    lease.release()
    # The limit raised from 1 to 2 on the backend still held.
    start = clock()
    clock_at_change = start + 0.3
    now = old
    raised = [Target(A, max_in_flight=2)]
    lease = sel.acquire(old, refresh=lambda: now if clock() < clock_at_change else raised)
    assert lease.address == A and clock() - start < 0.4
    assert sel.load.in_flight(A) == 2
    lease.release()
    # No backend left routable while it waits: 503 at once, not at the queue timeout.
    start = clock()
    with pytest.raises(NoHealthyBackend):
        sel.acquire(old, refresh=lambda: [Target(A, max_in_flight=1, routable=False)])
    assert clock() - start < 0.2
    held.release()


def test_weights_and_limits_reach_the_policy(tmp_path: Path, clock: FakeClock) -> None:
    sel = selector(tmp_path, clock, policy="least_requests")
    targets = [Target(A, weight=3), Target(B, weight=1)]
    got = [sel.acquire(targets).address for _ in range(8)]
    assert got.count(A) == 6 and got.count(B) == 2  # in flight stays 3:1


def test_round_robin_fast_path_counts_places_and_skips_unroutable(tmp_path: Path, clock: FakeClock) -> None:
    sel = selector(tmp_path, clock, policy="round_robin")
    targets = [Target(A, weight=2), Target(B), Target(C, routable=False)]
    leases = [sel.acquire(targets) for _ in range(6)]
    assert [lease.address for lease in leases] == [A, B, A] * 2
    assert (sel.load.in_flight(A), sel.load.in_flight(B), sel.load.in_flight(C)) == (4, 2, 0)
    for lease in leases:
        lease.release()
        lease.release()  # once only
    assert sel.load.in_flight(A) == sel.load.in_flight(B) == 0
    assert sel.acquire(targets, exclude={A}).address == B
    with pytest.raises(NoHealthyBackend):
        sel.acquire(targets, exclude={A, B})


def test_round_robin_with_a_limit_takes_the_counted_path(tmp_path: Path, clock: FakeClock) -> None:
    sel = selector(tmp_path, clock, policy="round_robin", timeout=0.05)
    targets = [Target(A, max_in_flight=1), Target(B, max_in_flight=1)]
    first, second = sel.acquire(targets), sel.acquire(targets)
    assert {first.address, second.address} == {A, B}
    with pytest.raises(BackendsBusy):
        sel.acquire(targets)
    first.release()
    assert sel.acquire(targets).address == first.address


def gateways(tmp_path: Path, clock: FakeClock) -> tuple[Selector, Selector]:
    """Two hosts: each its own index and counts."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    return selector(tmp_path / "a", clock), selector(tmp_path / "b", clock)


def test_two_gateways_with_their_own_indexes_agree_on_a_new_conversation(tmp_path: Path, clock: FakeClock) -> None:
    gw_a, gw_b = gateways(tmp_path, clock)
    targets = [Target(A), Target(B), Target(C)]
    for first in range(1, 400, 20):
        conversation = list(range(first, first + 10))
        on_a = gw_a.acquire(targets, conversation)
        on_b = gw_b.acquire(targets, [*conversation, 99])  # the next turn, on the other gateway
        assert on_a.address == on_b.address
        on_a.release()
        on_b.release()


def test_new_blocks_are_shared_and_merged_into_another_hosts_index(tmp_path: Path, clock: FakeClock) -> None:
    (tmp_path / "a").mkdir()
    gw_a = selector(tmp_path / "a", clock)
    backends = tuple(BackendConfig(host, int(port)) for host, port in (a.split(":") for a in (A, B, C)))
    gw_b = RoutingState(Config(backends=backends, routing=RoutingConfig(policy="prefix", prefix_index_entries=4096)),
                        str(tmp_path))
    shared: list[tuple[list[int], str]] = []
    gw_a.share = lambda blocks, address: shared.append((list(blocks), address))
    targets = [Target(A), Target(B), Target(C)]
    conversation = list(range(1, 11))
    lease = gw_a.acquire(targets, conversation)
    assert shared == [(conversation, lease.address)]
    lease.release()
    gw_a.acquire(targets, [*conversation, 11, 12]).release()
    assert shared[1] == ([11, 12], lease.address)  # only what this host did not know
    for blocks, address in shared:
        gw_b.merge(blocks, address)
    gw_b.merge([1, 2], "10.9.9.9:1")  # not a backend here: ignored
    index = gw_b.selector.index
    assert index is not None
    assert index.matched([*conversation, 11, 12], [A, B, C]) == {
        a: 12 if a == lease.address else 0 for a in (A, B, C)}
    # ... and gateway b now sends the conversation's next turn where gateway a did.
    assert gw_b.selector.acquire(list(gw_b.targets.values()), [*conversation, 11, 12, 13]).address == lease.address
    gw_b.close()
