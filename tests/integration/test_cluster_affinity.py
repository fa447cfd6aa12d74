"""The shared view of prefix affinity (ntonix/cluster/affinity.py, ADR 0009) on a real redis-server:
two boards stand for two gateways."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from unittest import mock

import pytest

from ntonix.cluster.affinity import AffinityBoard, Assignment
from ntonix.config.model import BackendConfig, CacheConfig, Config, RoutingConfig
from ntonix.core.routing import Candidate, Router
from ntonix.gateway.runtime import Runtime
from ntonix.routing.state import RoutingState
from ntonix.telemetry.recorder import Telemetry
from ntonix.upstream.fake import ScriptedTransport
from tests.live.procs import free_port, wait_until
from tests.live.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]


def test_each_gateway_learns_the_others_assignments_and_not_its_own(clean_redis: RedisServer) -> None:
    a, b = AffinityBoard(clean_redis.url), AffinityBoard(clean_redis.url)
    try:
        a.record("m1", "h1", "10.0.0.1:8000")
        a.record("m1", "h2", "10.0.0.2:8000")
        b.record("m2", "h9", "10.0.0.3:8000")
        assert a.sync() == []  # publishes; nothing from b yet
        assert b.sync() == [Assignment("m1", "h1", "10.0.0.1:8000"), Assignment("m1", "h2", "10.0.0.2:8000")]
        assert a.sync() == [Assignment("m2", "h9", "10.0.0.3:8000")]
        assert a.sync() == [] and b.sync() == []  # each entry once
        assert not a.pending and not b.pending
        # A gateway that starts later reads the recent history.
        c = AffinityBoard(clean_redis.url)
        assert len(c.sync()) == 3
        c.close()
    finally:
        a.close()
        b.close()


def test_the_stream_and_the_batch_stay_bounded(clean_redis: RedisServer) -> None:
    a = AffinityBoard(clean_redis.url, max_pending=5, max_entries=100)
    try:
        for i in range(12):
            a.record("m", f"h{i}", "b:1")
        assert [x.block for x in a.pending] == [f"h{i}" for i in range(7, 12)]  # the newest kept
        for _ in range(300):
            a.record("m", "h", "b:1")
            a.sync()
        assert int(clean_redis.command("XLEN", "ntonix:affinity")[1:].split(b"\r\n")[0]) < 200
        assert int(clean_redis.command("PTTL", "ntonix:affinity")[1:].split(b"\r\n")[0]) > 0
    finally:
        a.close()


def test_redis_down_keeps_the_batch_and_recovers(clean_redis: RedisServer) -> None:
    a = AffinityBoard(clean_redis.url, backoff_s=0.2)
    b = AffinityBoard(clean_redis.url, backoff_s=0.2)
    try:
        a.sync()
        b.sync()
        clean_redis.stop()
        a.record("m", "h1", "b:1")
        t = time.perf_counter()
        assert a.sync() == [] and a.sync() == []  # no exception; the second call does no I/O
        assert time.perf_counter() - t < 0.5
        assert list(a.pending) == [Assignment("m", "h1", "b:1")]
        clean_redis.start()
        wait_until(lambda: a.sync() == [] and not a.pending, timeout=5, what="a published again")
        got = wait_until(lambda: b.sync(), timeout=5, what="b learns it")
        assert got == [Assignment("m", "h1", "b:1")]
    finally:
        a.close()
        b.close()


def test_an_unreachable_redis_is_no_error() -> None:
    a = AffinityBoard(f"redis://127.0.0.1:{free_port()}/0", backoff_s=30)
    a.record("m", "h", "b:1")
    assert a.sync() == [] and a.sync() == []
    assert a.stats["redis_errors"] == 1 and "backing-off" in repr(a)


def test_each_host_gets_the_other_hosts_load_and_a_silent_host_drops_out(clean_redis: RedisServer) -> None:
    a = AffinityBoard(clean_redis.url, host="host-a")
    a2 = AffinityBoard(clean_redis.url, host="host-a")  # another worker of host a
    b = AffinityBoard(clean_redis.url, host="host-b", load_max_age_s=0.3)
    seen: list[dict[str, int]] = []
    a.local_load = a2.local_load = lambda: {"x:1": 4, "y:1": 1}
    b.local_load = lambda: {"x:1": 1, "y:1": 3}
    b.on_remote = seen.append
    try:
        a.sync()
        b.sync()
        assert b.remote == {"x:1": 3} and seen == [{"x:1": 3}]  # less one each: y's 1 is 0
        assert a.sync() == [] and a.remote == {"y:1": 2}
        assert a2.sync() == [] and a2.remote == {"y:1": 2}  # its own host is not "the others"
        assert b.stats["load_syncs"] == 1 and a.stats["load_syncs"] == 2
        # Host a stops syncing (its gateway stopped): after load_max_age_s, b counts it no more.
        wait_until(lambda: b.sync() == [] and b.remote == {}, timeout=5, interval=0.05, what="host a aged out")
        assert seen[-1] == {}
    finally:
        for board in (a, a2, b):
            board.close()


def test_an_idle_host_syncs_once_a_second_and_at_once_when_busy_again(clean_redis: RedisServer) -> None:
    now = [0.0]
    a = AffinityBoard(clean_redis.url, host="host-a", idle_sync_s=1.0, clock=lambda: now[0])
    load: dict[str, int] = {}
    a.local_load = lambda: load
    try:
        a.sync()  # idle: publishes its zeros once
        assert a.stats["load_syncs"] == 1
        now[0] = 0.5
        a.sync()  # still idle, within idle_sync_s: no round trip
        assert a.stats["load_syncs"] == 1
        now[0] = 1.1
        a.sync()
        assert a.stats["load_syncs"] == 2
        load["x:1"] = 1  # a request in flight: every tick syncs
        now[0] = 1.2
        a.sync()
        a.sync()
        assert a.stats["load_syncs"] == 4
        load["x:1"] = 0  # idle again: one sync says so, then quiet
        a.sync()
        a.sync()
        assert a.stats["load_syncs"] == 5
        a.record("m", "h", "x:1")  # an assignment to publish: synced, idle or not
        a.sync()
        assert a.stats["load_syncs"] == 6 and not a.pending
        # Idle, within idle_sync_s, it still reads the other gateways' assignments every
        # idle_read_s (a conversation one of them diverted must be known before its next turn
        # comes here).
        b = AffinityBoard(clean_redis.url, host="host-b")
        try:
            a.sync()  # idle: the zeros, once
            b.record("m", "diverted", "y:1")
            b.sync()
            now[0] += 0.25
            assert [x.block for x in a.sync()] == ["diverted"]
            assert a.stats["load_syncs"] == 7  # and no load round trip for it
        finally:
            b.close()
    finally:
        a.close()


def test_an_idle_host_reads_the_others_load_before_it_routes(clean_redis: RedisServer) -> None:
    # Host b idles (its view of a's load ages up to idle_sync_s); a's burst on x ends. b's next
    # request must not see a's burst: refresh() reads the load now, once per tick at most.
    now = [0.0]
    a = AffinityBoard(clean_redis.url, host="host-a")
    b = AffinityBoard(clean_redis.url, host="host-b", idle_sync_s=1.0, clock=lambda: now[0])
    a_load = {"x:1": 6}
    a.local_load = lambda: a_load
    b.local_load = dict
    try:
        a.sync()
        b.sync()  # idle: publishes its zeros, reads a's burst
        assert b.remote == {"x:1": 5}
        a_load["x:1"] = 0
        a.sync()  # a's burst is over
        now[0] = 0.3
        b.sync()  # idle, within idle_sync_s: no load read, the view is a's burst still
        assert b.remote == {"x:1": 5}
        b.refresh(0.05)  # a request arrives: the view now
        assert b.remote == {} and b.stats["load_syncs"] == 2
        b.refresh(0.05)  # within the tick: no second round trip
        assert b.stats["load_syncs"] == 2
        # A burst arriving together: one round trip, the others route meanwhile with the view.
        now[0] = 0.45
        seen_during: list[int] = []
        real_eval = b._ready().eval  # type: ignore[union-attr]

        def eval_and_meanwhile(*args: object) -> object:
            b.refresh(0.05)  # a second request, while the first one's round trip is under way
            seen_during.append(b.stats["load_syncs"])
            return real_eval(*args)

        b._client.eval = eval_and_meanwhile  # type: ignore[union-attr,method-assign]
        b.refresh(0.05)
        del b._client.eval  # type: ignore[union-attr]
        assert seen_during == [2] and b.stats["load_syncs"] == 3
        b.local_load = lambda: {"x:1": 1}
        now[0] = 0.6
        b.sync()  # busy: the background sync keeps the view, refresh() does nothing
        b.refresh(0.05)
        assert b.stats["load_syncs"] == 4
    finally:
        a.close()
        b.close()


def test_a_redis_outage_is_logged_once_and_its_end_too(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there
    now = [0.0]
    a = AffinityBoard(f"redis://127.0.0.1:{port}/0", backoff_s=0.1, clock=lambda: now[0])
    try:
        with caplog.at_level("INFO", logger="ntonix"):
            for _ in range(5):
                now[0] += 0.2  # past the back-off: a retry each time
                a.sync()
        assert a.stats["redis_errors"] == 5
        assert [r.message for r in caplog.records].count("cluster.affinity_unavailable") == 1
    finally:
        a.close()


def test_with_redis_down_a_host_weighs_its_own_load_alone(clean_redis: RedisServer) -> None:
    a = AffinityBoard(clean_redis.url, host="host-a", backoff_s=0.2)
    b = AffinityBoard(clean_redis.url, host="host-b", backoff_s=0.2)
    seen: list[dict[str, int]] = []
    a.local_load = lambda: {"x:1": 5}
    b.local_load = lambda: {"y:1": 1}
    b.on_remote = seen.append
    try:
        a.sync()
        b.sync()
        assert b.remote == {"x:1": 4}
        clean_redis.stop()
        assert b.sync() == []
        assert b.remote == {} and seen[-1] == {}  # no stale count from a gateway it cannot hear
        clean_redis.start()
        a.local_load = lambda: {"x:1": 2}
        wait_until(lambda: a.sync() == [] and a.stats["load_syncs"] >= 2, timeout=5, what="a shares again")
        wait_until(lambda: b.sync() == [] and b.remote == {"x:1": 1}, timeout=5, what="b hears a again")
    finally:
        a.close()
        b.close()


def test_the_background_loop_merges_into_the_local_index(clean_redis: RedisServer) -> None:
    a, b = AffinityBoard(clean_redis.url), AffinityBoard(clean_redis.url)
    index: dict[tuple[str, str], str] = {}
    stop = threading.Event()

    def merge(got: list[Assignment]) -> None:
        index.update({(x.model, x.block): x.backend for x in got})

    t = threading.Thread(target=b.run, args=(merge, 0.02, time.sleep, stop.is_set), daemon=True)
    t.start()
    try:
        a.record("m", "conversation-1", "10.0.0.7:8000")
        a.sync()
        wait_until(lambda: index.get(("m", "conversation-1")) == "10.0.0.7:8000", timeout=5, what="merged")
    finally:
        stop.set()
        t.join(5)
        a.close()
        b.close()


def two_hosts(tmp_path: Path, redis_url: str) -> list[tuple[Runtime, RoutingState]]:
    """Two gateways in this process (a Runtime and routing state each, with a run directory of
    their own; threads for greenlets) in front of backends 127.0.0.1:1 and :2, on one Redis."""
    hosts = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = Config(backends=(BackendConfig("127.0.0.1", 1), BackendConfig("127.0.0.1", 2)),
                     cache=CacheConfig(dir=str(tmp_path / name / "cache"), redis_url=redis_url),
                     routing=RoutingConfig(policy="prefix", prefix_index_entries=4096))
        rt = Runtime(cfg, Telemetry(cfg, metrics_dir=""), ScriptedTransport())
        state = RoutingState(cfg, str(tmp_path / name))
        with mock.patch("ntonix.gateway.runtime.run_dir", return_value=str(tmp_path / name)):
            rt.share_routing(state)
        rt.start(lambda fn: threading.Thread(target=fn, daemon=True).start())
        hosts.append((rt, state))
    return hosts


def test_a_conversation_diverted_by_load_on_one_host_is_followed_on_the_other(tmp_path: Path,
                                                                              clean_redis: RedisServer) -> None:
    """Two hosts (a Runtime and routing state each, threads for greenlets) on one Redis: host a's
    load bound sends a new conversation away from the backend the hash names; host b, whose index
    is empty, would send the next turn to the hash's backend, until the background sync tells it
    where the conversation went (Runtime.share_routing, ADR 0009 option c)."""
    x, y = "127.0.0.1:1", "127.0.0.1:2"
    hosts = two_hosts(tmp_path, clean_redis.url)
    (rt_a, a), (rt_b, b) = hosts
    try:
        targets = list(a.targets.values())
        idle = [Candidate(x), Candidate(y)]
        conversation = next([n, n + 1, n + 2] for n in range(1000) if Router("prefix").choose(idle, n).address == x)
        busy = [a.selector.load.begin(x, 0) for _ in range(3)]  # x is over host a's load bound
        assert all(busy)
        lease = a.selector.acquire(targets, conversation)
        assert lease.address == y
        lease.release()
        assert b.selector.index is not None

        def learnt() -> bool:
            assert b.selector.index is not None
            return b.selector.index.matched(conversation, [x, y])[y] == 3

        wait_until(learnt, timeout=5, interval=0.05, what="host b merging host a's assignment")
        turn2 = b.selector.acquire(list(b.targets.values()), [*conversation, 7])
        assert turn2.address == y, "the next turn on the other host did not follow the conversation"
        turn2.release()
        assert rt_a.affinity is not None and rt_a.affinity.stats["published"] >= 1
        assert rt_b.affinity is not None and rt_b.affinity.stats["merged"] >= 1
        assert rt_b.telemetry.snapshot([])["cluster"]["affinity"]["merged"] >= 1  # /metrics
    finally:
        for rt, state in hosts:
            rt.close()
            state.close()


def test_one_hosts_load_bound_counts_the_other_hosts_requests(tmp_path: Path, clean_redis: RedisServer) -> None:
    """Host a has 4 requests in flight to x, host b none: a new conversation whose hash names x
    goes to y through either host, as one gateway carrying all 4 would send it; b, weighing only
    its own load, would have sent it to x (ntonix/cluster/affinity.py, "Load")."""
    x, y = "127.0.0.1:1", "127.0.0.1:2"
    hosts = two_hosts(tmp_path, clean_redis.url)
    (rt_a, a), (rt_b, b) = hosts
    try:
        idle = [Candidate(x), Candidate(y)]
        conversation = next([n, n + 1] for n in range(1000) if Router("prefix").choose(idle, n).address == x)
        assert b.selector.acquire(list(b.targets.values()), [conversation[0], 99]).address == x
        b.selector.load.end(x)
        busy = [a.selector.load.begin(x, 0) for _ in range(4)]
        assert all(busy)
        # b hears it within a sync or two: 4 less one (ntonix/cluster/affinity.py remote_load).
        wait_until(lambda: b.selector.remote == {x: 3}, timeout=5, interval=0.02, what="host b hearing host a's load")
        assert a.selector.remote == {}  # b has nothing in flight
        turn = b.selector.acquire(list(b.targets.values()), conversation)
        assert turn.address == y, "host b's bound did not count host a's requests"
        turn.release()
        assert rt_b.affinity is not None and rt_b.affinity.stats["load_syncs"] >= 1
        assert rt_b.telemetry.snapshot([])["cluster"]["affinity"]["load_syncs"] >= 1  # /metrics
        # Host a's requests end: b's view empties with its next syncs, and x is x again.
        for _ in range(4):
            a.selector.load.end(x)
        wait_until(lambda: b.selector.remote == {}, timeout=5, interval=0.02, what="host b hearing a is idle")
        fresh = next(n for n in range(1000, 2000) if Router("prefix").choose(idle, n).address == x)
        again = b.selector.acquire(list(b.targets.values()), [fresh])
        assert again.address == x
        again.release()
    finally:
        for rt, state in hosts:
            rt.close()
            state.close()
