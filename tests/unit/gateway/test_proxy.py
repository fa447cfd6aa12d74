"""ntonix.gateway.proxy through a ScriptedTransport: backend choice, failover, retries, breaker
trials, coalescing, timeouts. Plain environ dicts, no gunicorn, no sockets (tests/unit/gateway/flow.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from ntonix.cache.coalescer import Coalescer, Follower, Leader
from ntonix.core.breaker import BreakerState
from ntonix.core.cache_entry import CachedResponse
from ntonix.core.cache_key import cache_key
from ntonix.upstream.fake import Reply
from tests.fakes import FakeClock
from tests.unit.gateway.flow import B1, B2, B3, CHAT, Flow, chat


def error(answer: object) -> dict[str, object]:
    body = answer.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    return body["error"]  # type: ignore[no-any-return]


def test_a_request_reaches_its_backend_with_the_forwarded_headers(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1)
    flow.transport.script(B1, Reply(200, chunks=[b'{"id":', b'"x"}']))
    answer = flow.request(headers={"X-Request-ID": "req-1", "Authorization": "Bearer k"})
    assert (answer.status, answer.read()) == (200, b'{"id":"x"}')
    assert answer.header("X-Request-ID") == "req-1"
    assert answer.header("X-Cache") == "BYPASS"
    (sent,) = flow.transport.exchanges
    assert (sent.address, sent.method, sent.target, sent.body) == (B1, "POST", CHAT, chat())
    headers = dict(sent.headers)
    assert headers["Host"] == B1
    assert headers["Authorization"] == "Bearer k"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert sent.response is not None and sent.response.released == "pool"


def test_a_refused_request_is_retried_on_the_next_backend(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, B2)
    flow.transport.script(B1, Reply(fail="refuse"))
    flow.transport.script(B2, Reply(200, chunks=[b"{}"]))
    answer = flow.request()
    assert (answer.status, answer.read()) == (200, b"{}")
    assert [(e.address, e.reached) for e in flow.transport.exchanges] == [(B1, False), (B2, True)]
    assert flow.backend(B1).breaker.failures == 1  # the refusal counts against B1
    assert flow.backend(B2).breaker.failures == 0
    (rec,) = flow.telemetry.records
    assert (rec.backend, rec.backend_ok, rec.status) == (B2, True, 200)


def test_retries_are_bounded_by_proxy_retries(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, B2, B3, proxy={"retries": 1})
    for address in (B1, B2, B3):
        flow.transport.script(address, Reply(fail="refuse"))
    answer = flow.request()
    assert answer.status == 502
    assert "2 tried" in str(error(answer)["message"])
    assert len(flow.transport.exchanges) == 2  # one try and one retry; the third backend untouched
    assert sum(b.in_flight for b in flow.runtime.registry.all()) == 0


def test_a_backend_that_died_holding_the_request_fails_over(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, B2)
    flow.transport.script(B1, Reply(fail="die"))
    flow.transport.script(B2, Reply(200, chunks=[b"{}"]))
    answer = flow.request()
    assert (answer.status, answer.read()) == (200, b"{}")
    assert flow.transport.probes == [B1]  # checked that it refuses connections now
    assert [e.address for e in flow.transport.exchanges] == [B1, B2]
    assert flow.telemetry.records[0].backend == B2


def test_a_live_backend_that_hung_up_is_not_sent_the_request_twice(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, B2)
    flow.transport.script(B1, Reply(fail="reset"))  # B2 has no reply scripted: a resend would fail loudly
    answer = flow.request()
    assert answer.status == 502
    assert "without answering" in str(error(answer)["message"])
    assert flow.transport.probes == [B1]
    assert [e.address for e in flow.transport.exchanges] == [B1]
    (rec,) = flow.telemetry.records
    assert (rec.backend, rec.backend_ok, rec.status) == (B1, False, 502)
    assert flow.backend(B1).in_flight == 0


def test_504_when_the_backend_sends_no_head_in_time(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, B2, proxy={"read_timeout_s": 3})
    flow.transport.script(B1, Reply(fail="timeout"))
    answer = flow.request()
    assert answer.status == 504
    assert error(answer)["message"] == "backend sent no response headers within 3s"
    assert [e.address for e in flow.transport.exchanges] == [B1]  # it may still be working on it: not resent
    assert flow.backend(B1).breaker.failures == 1


def test_503_with_retry_after_when_no_backend_is_eligible(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, circuit_breaker={"failure_threshold": 1}, health={"interval_s": 7})
    flow.transport.script(B1, Reply(fail="reset"))
    assert flow.request().status == 502
    assert flow.backend(B1).breaker.state is BreakerState.OPEN
    answer = flow.request()
    assert answer.status == 503
    assert answer.header("Retry-After") == "7"
    assert error(answer)["message"] == "no healthy backend is available"
    assert len(flow.transport.exchanges) == 1


def test_a_backend_without_a_free_connection_is_not_failed(tmp_path: Path) -> None:
    # pool.max_size reached for connect_timeout_s is this worker's own limit: the request tries
    # the next backend, and the busy one's breaker hears nothing (the audit's fullpool case).
    flow = Flow(tmp_path, B1, B2, circuit_breaker={"failure_threshold": 1})
    flow.transport.script(B1, *[Reply(fail="busy")] * 3)
    flow.transport.script(B2, *[Reply(200)] * 3)
    for _ in range(3):
        assert flow.request(headers={"Cache-Control": "no-store"}).status == 200
    assert flow.backend(B1).breaker.state is BreakerState.CLOSED
    assert flow.backend(B1).breaker.failures == 0


def test_503_backends_busy_when_no_backend_has_a_free_connection(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, circuit_breaker={"failure_threshold": 1})
    flow.transport.script(B1, Reply(fail="busy"), Reply(fail="busy"), Reply(200))
    for _ in range(2):
        answer = flow.request(headers={"Cache-Control": "no-store"})
        assert (answer.status, answer.header("Retry-After")) == (503, "1")
        assert error(answer)["code"] == "backends_busy"
    assert flow.backend(B1).breaker.state is BreakerState.CLOSED
    assert flow.request(headers={"Cache-Control": "no-store"}).status == 200  # still routable


@pytest.mark.parametrize(("trial", "after"), [(Reply(200), BreakerState.CLOSED),
                                              (Reply(fail="reset"), BreakerState.OPEN),
                                              (Reply(500, chunks=[b"{}"]), BreakerState.OPEN)],
                         ids=["success-closes", "failure-reopens", "5xx-reopens"])
def test_a_breakers_trial_request(tmp_path: Path, trial: Reply, after: BreakerState) -> None:
    flow = Flow(tmp_path, B1, circuit_breaker={"failure_threshold": 2, "cooldown_s": 10})
    flow.transport.script(B1, Reply(fail="reset"), Reply(fail="reset"), trial)
    flow.request().read()
    flow.request().read()
    breaker = flow.backend(B1).breaker
    assert breaker.state is BreakerState.OPEN
    flow.clock.advance(9.9)
    assert flow.request().status == 503  # still cooling down
    flow.clock.advance(0.1)
    answer = flow.request()  # the one trial request
    assert answer.status == (502 if trial.fail else trial.status)
    answer.read()
    assert breaker.state is after
    assert len(flow.transport.exchanges) == 3


def test_a_trial_whose_client_left_frees_the_trial_without_a_verdict(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, circuit_breaker={"failure_threshold": 1, "cooldown_s": 10})
    flow.transport.script(B1, Reply(fail="reset"), Reply(200, chunks=[b"a", b"b"]), Reply(200))
    flow.request().read()
    flow.clock.advance(10)
    trial = flow.request()
    breaker = flow.backend(B1).breaker
    assert breaker.state is BreakerState.HALF_OPEN
    assert flow.request().status == 503  # the trial slot is taken
    assert trial.next() == b"a"
    trial.close()  # the client left mid-answer
    assert breaker.state is BreakerState.HALF_OPEN  # no verdict either way
    answer = flow.request()  # the slot is free again: this one is the trial
    assert answer.status == 200
    answer.read()
    assert breaker.state is BreakerState.CLOSED


def test_the_request_target_is_sent_in_origin_form(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1)
    flow.transport.script(B1, Reply(200))
    environ = flow.environ("GET", "/v1/models")
    environ["RAW_URI"] = "http://elsewhere.example/v1/models?x=1"
    flow.call(environ).read()
    assert flow.transport.exchanges[0].target == "/v1/models?x=1"


# ---------------------------------------------------------------------- cache and coalescing


def key_of(body: bytes) -> str:
    key = cache_key(CHAT, orjson.loads(body), None)
    assert key is not None
    return key


def test_a_clean_answer_is_cached_and_replayed_without_a_backend(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, Reply(200, chunks=[b'{"a":', b"1}"]))
    first = flow.request()
    assert (first.header("X-Cache"), first.read()) == ("MISS", b'{"a":1}')
    again = flow.request()
    assert (again.status, again.header("X-Cache"), again.read()) == (200, "HIT", b'{"a":1}')
    assert len(flow.transport.exchanges) == 1
    assert ("Accept-Encoding" not in dict(flow.transport.exchanges[0].headers))


def test_a_leader_whose_backend_fails_ends_its_flight(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, Reply(fail="reset"))
    assert flow.request().status == 502
    # Nobody is left leading this request: the next one to join leads it (no stale flight).
    other = Coalescer(str(tmp_path / "cache"), stale_after_s=30)
    role = other.join(key_of(chat()))
    assert isinstance(role, Leader)
    role.finish(False)


class Steps:
    """An injected ``sleep`` for the follower's polling: runs the other worker's next action."""

    def __init__(self, clock: FakeClock, *steps: object) -> None:
        self.clock, self.steps = clock, list(steps)

    def __call__(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if self.steps:
            self.steps.pop(0)()  # type: ignore[operator]


def test_followers_of_a_leader_that_failed_regroup_and_one_goes_to_a_backend(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    directory = str(tmp_path / "cache")
    clock = FakeClock(1_700_000_000.0)
    elsewhere = Coalescer(directory, stale_after_s=30, clock=clock)  # another worker of the host
    leader = elsewhere.join(key_of(chat()))
    assert isinstance(leader, Leader)
    flow.runtime.coalescer = Coalescer(directory, stale_after_s=30, clock=clock,
                                       sleep=Steps(clock, lambda: leader.finish(False)))
    flow.transport.script(B1, Reply(200, chunks=[b"{}"]))
    answer = flow.request()  # follows, sees the leader fail before its head, leads the next round
    assert (answer.status, answer.header("X-Cache")) == (200, "MISS")
    role = elsewhere.join(key_of(chat()))
    assert isinstance(role, Follower)  # it leads: the host's next identical request follows it
    role.close()
    assert answer.read() == b"{}"
    assert len(flow.transport.exchanges) == 1
    assert flow.request().header("X-Cache") == "HIT"


def test_a_follower_relays_its_leaders_answer(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    directory = str(tmp_path / "cache")
    clock = FakeClock(1_700_000_000.0)
    elsewhere = Coalescer(directory, stale_after_s=30, clock=clock)
    leader = elsewhere.join(key_of(chat()))
    assert isinstance(leader, Leader)

    def answer_head() -> None:
        leader.publish_head(200, (("Content-Type", "application/json"), ("Content-Length", "2")))
        leader.publish_chunk(b"{}")
        leader.finish(True)

    flow.runtime.coalescer = Coalescer(directory, stale_after_s=30, clock=clock, sleep=Steps(clock, answer_head))
    answer = flow.request()
    assert (answer.status, answer.header("X-Cache"), answer.read()) == (200, "HIT", b"{}")
    assert flow.transport.exchanges == []
    (rec,) = flow.telemetry.records
    assert rec.cache == "HIT"


def test_a_trial_that_breaks_before_its_body_settles_once_without_a_verdict(tmp_path: Path) -> None:
    """The answer's head could not be handed on (the host's start_response raised): no body took
    the attempt over, so the flow abandons it itself — nothing left in flight, the routing place
    and the connection given back, and the breaker's trial slot free for the next request."""
    flow = Flow(tmp_path, B1, circuit_breaker={"failure_threshold": 1, "cooldown_s": 10})
    flow.transport.script(B1, Reply(fail="reset"), Reply(200, chunks=[b"{}"]), Reply(200, chunks=[b"{}"]))
    flow.request().read()
    flow.clock.advance(10)
    load = flow.runtime.routing.selector.load
    places = load.in_flight(B1)  # host-wide (shared memory): compared, not assumed zero

    def broken(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        flow.app(flow.environ(body=chat()), broken)  # type: ignore[arg-type]
    backend = flow.backend(B1)
    assert (backend.in_flight, load.in_flight(B1)) == (0, places)
    resp = flow.transport.exchanges[1].response
    assert resp is not None and resp.released == "closed"
    assert backend.breaker.state is BreakerState.HALF_OPEN  # no verdict either way
    assert flow.request().read() == b"{}"  # the trial slot is free again
    assert backend.breaker.state is BreakerState.CLOSED


# ---------------------------------------------------------------------- the worker's hit fast path


def hit_of(flow: Flow, body: bytes, **headers: str) -> object:
    env = {"HTTP_" + k.upper(): v for k, v in headers.items()}
    return flow.app.cached_hit("POST", CHAT, env, body, "127.0.0.1")


def test_cached_hit_answers_as_the_wsgi_path_and_accounts_it(tmp_path: Path) -> None:
    from ntonix.core.cache_entry import hit_head

    flow = Flow(tmp_path, B1, cache=True)
    answer = b'{"id":"a","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    flow.transport.script(B1, Reply(200, chunks=[answer], headers=[("Content-Type", "application/json")]))
    body = chat(content="fast")
    assert hit_of(flow, body) is None  # nothing stored yet: the WSGI path answers
    assert flow.request(body=body).read() == answer
    slow = flow.request(body=body, headers={"X-Request-ID": "rid-1"})
    assert (slow.header("X-Cache"), slow.read()) == ("HIT", answer)
    for _ in range(2):  # the second time the request is known by its bytes
        hit = hit_of(flow, body, x_request_id="rid-1")
        assert hit is not None
        assert (hit.status, hit.body, hit.rec.request_id) == ("200 OK", answer, "rid-1")  # type: ignore[attr-defined]
        # The WSGI path's headers, up to its X-Request-ID, are the rendered head.
        wsgi = [(k, v) for k, v in slow.headers if k not in ("X-Request-ID", "X-Cache")]
        assert hit.head == hit_head(tuple(wsgi[:-1]), len(answer))  # type: ignore[attr-defined]
        assert wsgi[-1] == ("Content-Length", str(len(answer)))
        flow.app.finished(hit.rec)  # type: ignore[attr-defined]
        done = flow.telemetry.records[-1]
        assert done is hit.rec  # type: ignore[attr-defined]
        assert (done.cache, done.status, done.model, done.bytes_sent) == ("HIT", 200, "m", len(answer))
        assert (done.usage.prompt, done.usage.completion) == (3, 4)  # type: ignore[union-attr]
    assert len(flow.transport.exchanges) == 1


def test_cached_hit_keeps_the_partition_and_the_request_policy(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, Reply(200, chunks=[b'{"a":1}']))
    body = chat(content="partitioned")
    assert flow.request(body=body, headers={"Authorization": "Bearer alice"}).read() == b'{"a":1}'
    assert hit_of(flow, body, authorization="Bearer alice") is not None
    assert hit_of(flow, body, authorization="Bearer alice") is not None  # known by its bytes now
    assert hit_of(flow, body) is None
    assert hit_of(flow, body, authorization="Bearer bob") is None
    assert hit_of(flow, body, authorization="Bearer alice", x_api_key="k") is None
    assert hit_of(flow, body, authorization="Bearer alice", cache_control="no-cache") is None
    assert hit_of(flow, body, authorization="Bearer alice", cache_control="no-store") is None
    assert hit_of(flow, b"{not json", authorization="Bearer alice") is None


def test_a_probe_that_missed_is_used_only_by_its_own_request(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, Reply(200, chunks=[b'{"n":1}']), Reply(200, chunks=[b'{"n":2}']))
    first, other = chat(content="probed"), chat(content="another")
    assert hit_of(flow, first) is None  # a miss: its key is kept for the WSGI path of this body
    assert flow.request(body=other).read() == b'{"n":1}'  # a different request ignores it
    assert orjson.loads(flow.transport.exchanges[0].body)["messages"][0]["content"] == "another"
    assert flow.request(body=first).read() == b'{"n":2}'
    assert hit_of(flow, other) is not None and hit_of(flow, first) is not None


# ---------------------------------------------------------------------- one look in L2 per miss


def _answer(body: bytes) -> CachedResponse:
    return CachedResponse(status=200, headers=(("Content-Type", "application/json"),), body=body,
                          created=time.time(), streamed=False)


def _another_workers_leader(flow: Flow, key: str) -> None:
    """Another worker of the host leads ``key``, stores its answer and ends its flight."""
    from ntonix.cache import build_cache

    elsewhere = Coalescer(flow.config.cache.dir, stale_after_s=30, lazy=True)
    cache = build_cache(True, 1 << 20, 60, flow.config.cache.dir, None)
    cache.on_stored = elsewhere.stored  # as the runtime wires it
    leader = elsewhere.join(key)
    assert isinstance(leader, Leader)
    cache.store(key, _answer(b'{"n":0}'))
    leader.finish(True)


def _this_workers_cache(flow: Flow, key: str) -> None:
    """A store through this worker's cache (a no-cache request's, or a leader whose flight ended early)."""
    assert flow.runtime.cache is not None
    flow.runtime.cache.store(key, _answer(b'{"n":0}'))


def _behind_the_caches_back(flow: Flow, key: str) -> None:
    """Into L2 directly, telling nobody: what shows that the join does not read L2 again."""
    assert flow.runtime.cache is not None and flow.runtime.cache.shared is not None
    flow.runtime.cache.shared.put(key, _answer(b'{"n":0}'))


@pytest.mark.parametrize(("between", "expected"), [
    (_another_workers_leader, ("HIT", b'{"n":0}', 0)),
    (_this_workers_cache, ("HIT", b'{"n":0}', 0)),
    (_behind_the_caches_back, ("MISS", b'{"n":1}', 1)),
], ids=["another-workers-leader", "this-workers-cache", "behind-the-caches-back"])
def test_the_join_looks_in_l2_again_only_if_something_was_stored_since_the_probe(
        tmp_path: Path, between: Callable[[Flow, str], None], expected: tuple[str, bytes, int]) -> None:
    # One L2 read per miss: the probe (in the hit fast path) reads the board's store counter
    # before its look in L2; the join reads L2 again only if the counter moved since.
    flow = Flow(tmp_path, B1, cache=True)
    body = chat(content="raced")
    assert hit_of(flow, body) is None  # the probe: L2 has nothing
    between(flow, key_of(body))
    flow.transport.script(B1, Reply(200, chunks=[b'{"n":1}']))
    answer = flow.request(body=body)
    assert (answer.header("X-Cache"), answer.read(), len(flow.transport.exchanges)) == expected


def test_rendered_hit_heads_keep_at_most_a_quarter_of_l1_of_answers_alive(tmp_path: Path) -> None:
    # The audit: each rendered head held its whole answer after L1 dropped it, 4,096 of them
    # per worker whatever their size (38 MB more per 100 hits of 394 KB answers, without end).
    flow = Flow(tmp_path, B1, cache={"memory_max_mb": 4, "max_size_mb": 64})
    proxy = flow.app.proxy
    answer = b'{"x":"' + b"y" * 200_000 + b'"}'
    flow.transport.script(B1, *[Reply(200, chunks=[answer])] * 40)
    for i in range(40):
        body = chat(content=f"big-{i}")
        flow.request(body=body).read()  # stored
        assert hit_of(flow, body) is not None  # rendered
        held = sum(len(e.body) for e, _, _ in proxy._rendered.values())
        assert held <= 1 << 20  # a quarter of L1 (4 MiB)
        assert proxy._rendered_bytes == held


def test_the_worker_loop_tick_expires_idle_backend_connections(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, B2)
    ticked: list[str] = []

    class Pool:
        def __init__(self, name: str) -> None:
            self.name = name

        def expire_idle(self) -> None:
            ticked.append(self.name)

    for address in (B1, B2):
        flow.backend(address).pool = Pool(address)
    flow.runtime.tick()
    assert sorted(ticked) == sorted([B1, B2])


def test_an_answer_larger_than_the_memo_budget_is_not_memoized(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache={"memory_max_mb": 4, "max_size_mb": 64})
    proxy = flow.app.proxy
    answer = b'{"x":"' + b"y" * 1_500_000 + b'"}'  # over a quarter of L1 (1 MiB)
    flow.transport.script(B1, Reply(200, chunks=[answer]))
    body = chat(content="huge")
    flow.request(body=body).read()
    for _ in range(2):
        hit = hit_of(flow, body)
        assert hit is not None and hit.body == answer  # type: ignore[attr-defined]
    assert proxy._rendered == {} and proxy._rendered_bytes == 0
