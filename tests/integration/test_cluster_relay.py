"""The host's coalescer first, the cluster's second (ntonix/cluster/relay.py, ADR 0009): two
"hosts", each an LMDB coalescer of its own plus a Flights on one real redis-server; threads play
the workers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ntonix.cache.coalescer import Coalescer, LeaderFailed
from ntonix.cache.coalescer import Follower as LocalFollower
from ntonix.cache.coalescer import Leader as LocalLeader
from ntonix.cluster.flights import Flights
from ntonix.cluster.relay import Fanout, Relay, widen
from tests.live.procs import wait_until
from tests.live.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]

HEAD = (200, (("Content-Type", "text/event-stream"),))
EVENTS = [f"data: {i}\n\n".encode() for i in range(10)] + [b"data: [DONE]\n\n"]


class Host:
    def __init__(self, folder: Path, url: str) -> None:
        self.coalescer = Coalescer(str(folder), sleep=time.sleep)
        self.flights = Flights(url, spawn=lambda fn: threading.Thread(target=fn, daemon=True).start())

    def join(self, key: str) -> LocalLeader | LocalFollower | Fanout | Relay:
        return widen(self.coalescer.join(key), self.flights, key)


@pytest.fixture
def hosts(tmp_path: Path, clean_redis: RedisServer) -> Iterator[tuple[Host, Host]]:
    a, b = Host(tmp_path / "a", clean_redis.url), Host(tmp_path / "b", clean_redis.url)
    yield a, b
    a.flights.close()
    b.flights.close()


def read_all(role: LocalFollower | Relay) -> tuple[tuple[int, tuple[tuple[str, str], ...]] | None, list[bytes]]:
    head = role.wait_head(5)
    try:
        return head, list(role.chunks(5)) if head is not None else []
    finally:
        role.close()


def test_one_backend_request_for_two_hosts_and_the_hosts_followers_ride_along(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    leader = a.join("k")
    assert isinstance(leader, Fanout)
    relay = b.join("k")
    assert isinstance(relay, Relay)
    rider = b.join("k")  # another worker of host b: follows b's own flight, no Redis
    assert isinstance(rider, LocalFollower)
    assert b.flights.stats["followed"] == 1 and b.flights.stats["led"] == 0
    results: dict[str, object] = {}
    threads = [threading.Thread(target=lambda n=n, r=r: results.update({n: read_all(r)}))
               for n, r in (("relay", relay), ("rider", rider))]
    for t in threads:
        t.start()
    wait_until(lambda: leader.cluster.followers_seen, timeout=5, what="a's keeper saw b")
    leader.publish_head(*HEAD)
    for e in EVENTS:
        leader.publish_chunk(e)
        time.sleep(0.01)
    leader.finish(True)
    for t in threads:
        t.join(10)
    assert results == {"relay": (HEAD, EVENTS), "rider": (HEAD, EVENTS)}


def test_a_relay_whose_own_client_leaves_early_finishes_the_answer_for_the_hosts_riders(
        hosts: tuple[Host, Host]) -> None:
    """The relay's own client had every byte of a sized answer and hung up before the other
    gateway's end marker came (the gateway's disconnect watch then closes the relay): the
    host's riders still get the whole answer, complete, not a failed flight (which sent them to
    a backend of their own: test_cluster_gateways flaked that way under load)."""
    a, b = hosts
    leader = a.join("early")
    assert isinstance(leader, Fanout)
    relay = b.join("early")
    assert isinstance(relay, Relay)
    rider = b.join("early")
    assert isinstance(rider, LocalFollower)
    got: dict[str, object] = {}
    reader = threading.Thread(target=lambda: got.update(rider=read_all(rider)))
    reader.start()
    wait_until(lambda: leader.cluster.followers_seen, timeout=5, what="a's keeper saw b")
    leader.publish_head(*HEAD)
    leader.publish_chunk(EVENTS[0])
    assert relay.wait_head(5) == HEAD
    chunks = relay.chunks(5)
    assert next(chunks) == EVENTS[0]
    closer = threading.Thread(target=relay.close)  # our client left: close() takes the rest for the rider
    closer.start()
    for e in EVENTS[1:]:
        leader.publish_chunk(e)
    leader.finish(True)
    closer.join(10)
    reader.join(10)
    assert got == {"rider": (HEAD, EVENTS)}


def test_a_broken_answer_from_the_other_host_is_broken_for_the_riders_too(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    leader = a.join("broken")
    relay = b.join("broken")
    rider = b.join("broken")
    assert isinstance(leader, Fanout) and isinstance(relay, Relay) and isinstance(rider, LocalFollower)
    wait_until(lambda: leader.cluster.followers_seen, timeout=5, what="a's keeper saw b")
    leader.publish_head(*HEAD)
    leader.publish_chunk(EVENTS[0])
    assert relay.wait_head(5) == HEAD
    assert rider.wait_head(5) == HEAD
    leader.finish(False)
    with pytest.raises(LeaderFailed):
        list(relay.chunks(5))
    relay.close()
    with pytest.raises(LeaderFailed):
        list(rider.chunks(5))
    rider.close()


def test_when_the_other_leader_fails_before_answering_everyone_regroups(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    leader = a.join("regroup")
    relay = b.join("regroup")
    assert isinstance(leader, Fanout) and isinstance(relay, Relay)
    leader.finish(False)
    assert relay.wait_head(5) is None
    relay.close()  # settles b's own flight, so b's next join starts afresh
    again = b.join("regroup")
    assert isinstance(again, Fanout), again  # b leads on both levels now
    again.finish(False)


def test_redis_down_leaves_the_host_alone(hosts: tuple[Host, Host], clean_redis: RedisServer) -> None:
    a, _ = hosts
    clean_redis.stop()
    role = a.join("alone")
    assert isinstance(role, LocalLeader)  # the host's own coalescing goes on
    role.finish(False)
