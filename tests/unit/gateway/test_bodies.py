"""ntonix.gateway.bodies: through a ScriptedTransport, relaying, recording for the cache, a
stream cut mid-way, a client that leaves, and ``close()`` settling everything exactly once; and
a follower's body whose leader stops publishing midway going on from a resumed answer."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import xxhash

from ntonix.cache.coalescer import Coalescer, Follower, Leader, LeaderFailed, key_hash
from ntonix.cache.shared import LmdbStore
from ntonix.core.breaker import BreakerState
from ntonix.core.cache_key import cache_key
from ntonix.core.record import RequestRecord
from ntonix.core.sse import SentPrint
from ntonix.core.usage import Usage
from ntonix.errors import UpstreamUnavailable
from ntonix.gateway.bodies import FollowerBody, StreamAborted
from ntonix.upstream.fake import Reply
from tests.unit.gateway.flow import B1, B2, CHAT, ClientSocket, Flow, chat

SSE = (("Content-Type", "text/event-stream"),)
EVENTS = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n"]


def stream(**kw: object) -> Reply:
    return Reply(200, chunks=kw.pop("chunks", EVENTS), headers=SSE, sized=False, **kw)  # type: ignore[arg-type]


def key_of(body: bytes) -> str:
    key = cache_key(CHAT, orjson.loads(body), None)
    assert key is not None
    return key


def settled(flow: Flow, address: str = B1) -> None:
    """Everything a request took is back: nothing in flight, no response unreleased."""
    assert flow.backend(address).in_flight == 0
    assert flow.transport.pools[address].active == 0


@pytest.mark.parametrize("fail", ["cut", "stall"])
def test_a_stream_cut_mid_way_aborts_the_client_and_is_not_cached(tmp_path: Path, fail: str) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, stream(fail=fail, after=1), stream())
    sock = ClientSocket()
    answer = flow.request(body=chat(stream=True), sock=sock)
    assert answer.status == 200
    assert answer.next() == EVENTS[0]
    with pytest.raises(StreamAborted):
        answer.next()
    assert sock.shut  # the client sees a broken body, never a clean end
    # ... and the flight ended before that: a request sent at once does not follow it.
    role = Coalescer(str(tmp_path / "cache"), stale_after_s=30).join(key_of(chat(stream=True)))
    assert isinstance(role, Leader)
    role.finish(False)
    answer.close()
    resp = flow.transport.exchanges[0].response
    assert resp is not None and resp.released == "closed"  # discarded, never back in the pool
    settled(flow)
    assert flow.backend(B1).breaker.failures == 1
    (rec,) = flow.telemetry.records
    assert rec.backend_ok is False and "middle of the response" in rec.error
    # Nothing cached and no flight left behind: the same request goes to the backend again.
    again = flow.request(body=chat(stream=True))
    assert (again.header("X-Cache"), again.read()) == ("MISS", b"".join(EVENTS))
    assert len(flow.transport.exchanges) == 2


def test_a_client_that_leaves_discards_the_connection_without_a_verdict(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, stream())
    answer = flow.request(body=chat(stream=True))
    assert answer.next() == EVENTS[0]
    answer.close()
    resp = flow.transport.exchanges[0].response
    assert resp is not None and resp.released == "closed"
    settled(flow)
    breaker = flow.backend(B1).breaker
    assert (breaker.state, breaker.failures) == (BreakerState.CLOSED, 0)
    (rec,) = flow.telemetry.records
    assert (rec.backend_ok, rec.error) == (None, "client closed the connection")
    assert rec.streamed
    role = Coalescer(str(tmp_path / "cache"), stale_after_s=30).join(key_of(chat(stream=True)))
    assert isinstance(role, Leader)  # the flight ended with the request
    role.finish(False)


@pytest.mark.parametrize("how", ["read", "left", "cut"])
def test_close_settles_exactly_once(tmp_path: Path, how: str) -> None:
    flow = Flow(tmp_path, B1)
    flow.transport.script(B1, stream(fail="cut", after=1) if how == "cut" else stream())
    answer = flow.request(body=chat(stream=True))
    if how == "read":
        answer.read()
    elif how == "cut":
        answer.next()
        with pytest.raises(StreamAborted):
            answer.next()
    for _ in range(3):
        answer.close()
    settled(flow)  # a second settle would take in_flight below zero
    assert len(flow.telemetry.records) == 1
    expected = {"read": (0, True), "left": (0, None), "cut": (1, False)}[how]
    assert (flow.backend(B1).breaker.failures, flow.telemetry.records[0].backend_ok) == expected


def test_a_read_to_its_end_goes_back_to_the_pool_and_counts_a_success(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, circuit_breaker={"failure_threshold": 3})
    flow.transport.script(B1, Reply(fail="reset"), Reply(200, chunks=[b"{}"]))
    flow.request().read()
    assert flow.backend(B1).breaker.failures == 1
    flow.request().read()
    assert flow.backend(B1).breaker.failures == 0
    resp = flow.transport.exchanges[1].response
    assert resp is not None and resp.released == "pool"
    settled(flow)


def test_an_unsized_body_flushes_its_head_before_the_first_piece(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1)
    flow.transport.script(B1, stream(trickle=True), Reply(200, chunks=[b"{", b"}"], trickle=True))
    answer = flow.request(body=chat(stream=True))
    assert [answer.next() for _ in range(4)] == [b"", *EVENTS]  # b"": gunicorn writes the head now
    answer.close()
    sized = flow.request()
    assert sized.next() == b"{"  # a sized body waits for its bytes: a failure can still be a clean error
    assert sized.read() == b"}"


def test_a_stream_is_cached_only_with_its_done_event(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, stream(chunks=EVENTS[:2]), stream())
    assert flow.request(body=chat(stream=True)).read() == b"".join(EVENTS[:2])
    second = flow.request(body=chat(stream=True))
    assert (second.header("X-Cache"), second.read()) == ("MISS", b"".join(EVENTS))  # not stored without [DONE]
    hit = flow.request(body=chat(stream=True))
    assert (hit.header("X-Cache"), hit.read()) == ("HIT", b"".join(EVENTS))
    assert len(flow.transport.exchanges) == 2


def test_a_sized_answer_is_stored_before_its_last_byte_goes_to_the_client(tmp_path: Path) -> None:
    """Once the client has every byte, a request it sends at once to another worker must find the
    answer: the store may not wait for close() (the OS can preempt the worker in between)."""
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, Reply(200, chunks=[b'{"a":', b"1}"]))
    body = chat(content="stored early")
    answer = flow.request(body=body)
    assert answer.next() == b'{"a":'
    assert flow.runtime.cache is not None and flow.runtime.cache.lookup(key_of(body), count=False) is None
    assert answer.next() == b"1}"  # the last byte, handed to gunicorn: stored already
    stored = flow.runtime.cache.lookup(key_of(body), count=False)
    assert stored is not None and stored.body == b'{"a":1}'
    assert answer.read() == b""  # close(): nothing stored twice, the request settles as usual
    assert flow.request(body=body).header("X-Cache") == "HIT"
    settled(flow)


@pytest.mark.parametrize("sse", [False, True], ids=["sized", "stream"])
def test_a_batched_l2_write_comes_before_the_flights_end(tmp_path: Path, sse: bool) -> None:
    """With the worker's loop to defer to, a solo leader's answer waits in this worker's write
    queue (its own lookups find it there) and reaches L2 in the loop's next turn; its flight
    stays on the board until after that write, so another worker's request for it finds the
    flight or the answer, never neither. ``Runtime.close`` writes what is still queued."""
    flow = Flow(tmp_path, B1, cache=True)
    turn: list[Callable[[], None]] = []
    flow.runtime.defer = turn.append
    flow.transport.script(B1, stream() if sse else Reply(200, chunks=[b'{"a":', b"1}"]))
    body = chat(content=f"batched {sse}", stream=sse)
    key = key_of(body)
    rt = flow.runtime
    assert rt.cache is not None and rt.coalescer is not None
    other_worker = LmdbStore(str(tmp_path / "cache" / "store"), 1 << 20, 60)
    answer = flow.request(body=body)
    sent = answer.read()  # every byte handed to gunicorn, and close(): the request is done
    assert other_worker.get(key, touch=False) is None
    on_board = rt.coalescer.board().peek(key_hash(key))
    assert on_board is not None and on_board.pid == os.getpid()  # the flight is still up
    assert (found := rt.cache.lookup(key, count=False)) is not None and found.body == sent
    (flush,) = turn  # one callback: the write, then the flight's end (ResponseCache.then)
    on_board_at_write: list[bool] = []
    real_put = LmdbStore.put_many

    def put_many(store: LmdbStore, *args: Any, **kw: Any) -> int:
        assert rt.coalescer is not None
        on_board_at_write.append(rt.coalescer.board().peek(key_hash(key)) is not None)
        return real_put(store, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LmdbStore, "put_many", put_many)
        flush()
    assert on_board_at_write == [True]  # the flight was up while its answer was written
    assert (stored := other_worker.get(key, touch=False)) is not None and stored.body == sent
    assert rt.coalescer.board().peek(key_hash(key)) is None  # and ended right after
    settled(flow)
    # What a worker leaving still has queued is written as it closes.
    flow.transport.script(B1, Reply(200, chunks=[b'{"b":2}']))
    last = chat(content=f"queued at exit {sse}")
    assert flow.request(body=last).read() == b'{"b":2}'
    assert other_worker.get(key_of(last), touch=False) is None
    rt.close()
    assert other_worker.get(key_of(last), touch=False) is not None


def test_an_error_answer_is_relayed_but_neither_cached_nor_a_success(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, Reply(500, chunks=[b'{"error":"x"}']), Reply(200, chunks=[b"{}"]))
    answer = flow.request()
    assert (answer.status, answer.read()) == (500, b'{"error":"x"}')
    assert flow.backend(B1).breaker.failures == 1
    assert flow.request().header("X-Cache") == "MISS"


def test_an_answer_too_large_to_record_is_relayed_but_not_cached(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache={"max_entry_bytes": 4})
    flow.transport.script(B1, Reply(200, chunks=[b"abc", b"def"]), Reply(200, chunks=[b"{}"]))
    assert flow.request().read() == b"abcdef"
    assert flow.request().header("X-Cache") == "MISS"


def test_a_removed_backends_pool_closes_when_its_last_answer_ends(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, B2)
    flow.transport.script(B1, stream())
    answer = flow.request(body=chat(stream=True))
    assert answer.next() == EVENTS[0]
    flow.runtime.reload(Flow(tmp_path, B2).config)
    pool = flow.transport.pools[B1]
    assert not pool.closed  # the answer streams on
    assert answer.read() == b"".join(EVENTS[1:])
    assert pool.closed


def test_a_leader_whose_client_left_finishes_the_answer_for_its_followers(tmp_path: Path) -> None:
    flow = Flow(tmp_path, B1, cache=True)
    flow.transport.script(B1, stream())
    answer = flow.request(body=chat(stream=True))
    assert answer.next() == EVENTS[0]
    coalescer = flow.runtime.coalescer
    assert coalescer is not None
    follower = coalescer.join(key_of(chat(stream=True)))
    assert isinstance(follower, Follower)  # another request for the same answer (it registers the flight)
    assert answer.next() == EVENTS[1]  # the leader sees it has a follower
    answer.close()  # its own client left
    (rec,) = flow.telemetry.records  # this request is reported at once
    assert "coalesced followers" in rec.error
    assert len(flow.runtime.background) == 1  # the rest is read in a greenlet the worker joins at drain
    assert flow.runtime.background.join(5)
    resp = flow.transport.exchanges[0].response
    assert resp is not None and resp.released == "pool"  # read to its end in the background
    settled(flow)
    assert follower.wait_head(1) is not None
    assert b"".join(follower.chunks(1)) == b"".join(EVENTS)
    follower.close()
    hit = flow.request(body=chat(stream=True))
    assert (hit.header("X-Cache"), hit.read()) == ("HIT", b"".join(EVENTS))
    assert len(flow.telemetry.records) == 2


# ---------------------------------------------------------------------- a follower resuming from a backend


class FakeFollower:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self.closed = 0

    def chunks(self, timeout_s: float) -> Iterator[bytes]:
        yield from self._chunks
        raise LeaderFailed("the leader's process is gone or stopped publishing")

    def close(self) -> None:
        self.closed += 1


def body_of(follower: FakeFollower, resume: object) -> tuple[FollowerBody, list[RequestRecord]]:
    done: list[RequestRecord] = []
    rec = RequestRecord("POST", "/v1/chat/completions", "rid", "127.0.0.1")
    return FollowerBody(follower, {}, rec, 5.0, None, done.append, resume=resume), done  # type: ignore[arg-type]


def test_the_rest_comes_from_the_resumed_answer_with_what_was_sent_checked() -> None:
    follower = FakeFollower([b"data: 1\n\n", b"data: 2\n\n"])
    asked: list[SentPrint] = []

    def resume(sent: SentPrint) -> Iterator[bytes]:
        asked.append(sent)
        yield from [b"data: 3\n\n", b"data: [DONE]\n\n"]

    body, done = body_of(follower, resume)
    assert b"".join(body) == b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: [DONE]\n\n"
    assert len(asked) == 1 and asked[0].size == 18
    assert asked[0].digest() == xxhash.xxh3_128(b"data: 1\n\ndata: 2\n\n").digest()  # a plain body's bytes
    assert follower.closed == 1  # left the dead flight at once
    body.close()
    assert len(done) == 1 and done[0].bytes_sent == 41 and done[0].error == ""


def test_a_resumed_answer_that_differs_cuts_the_client() -> None:
    def resume(sent: SentPrint) -> Iterator[bytes]:
        raise UpstreamUnavailable("coalesced answer broke off; the backend's new answer differs")
        yield b""  # pragma: no cover - makes this a generator

    body, done = body_of(FakeFollower([b"a"]), resume)
    assert next(body) == b"a"
    with pytest.raises(StreamAborted):
        next(body)
    body.close()
    assert "differs" in done[0].error


def test_without_resume_the_client_is_cut() -> None:
    body, done = body_of(FakeFollower([b"a"]), None)
    assert next(body) == b"a"
    with pytest.raises(StreamAborted):
        next(body)
    body.close()
    assert "stopped publishing" in done[0].error


@pytest.mark.parametrize(("pieces", "events"), [
    ([b'{"id": "x", "usage": {"prompt_tokens": 7, ', b'"completion_tokens": 3}}'], False),
    ([b'data: {"choices": []}\n\n', b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n',
      b"data: [DONE]\n\n"], True),
])
def test_a_follower_counts_the_tokens_it_saved_once_it_has_them_even_if_the_end_never_came(
        pieces: list[bytes], events: bool) -> None:
    # The client read the whole answer and closed before the leader's end reached this worker.
    saved: list[tuple[str, Usage]] = []
    rec = RequestRecord("POST", "/v1/chat/completions", "rid", "127.0.0.1")
    rec.model = "m"
    body = FollowerBody(FakeFollower(pieces), {}, rec, 5.0, None, lambda r: None,  # type: ignore[arg-type]
                        saved=lambda model, usage: saved.append((model, usage)), events=events)
    for _ in pieces:
        next(body)
    body.close()
    body.close()
    assert saved == [("m", Usage(7, 3, 0))] and rec.usage == Usage(7, 3, 0)


def test_a_stream_whose_end_marker_was_lost_after_done_ends_cleanly_without_a_backend_call() -> None:
    asked: list[SentPrint] = []

    def resume(sent: SentPrint) -> Iterator[bytes]:
        asked.append(sent)
        yield b"never"

    rec = RequestRecord("POST", "/v1/chat/completions", "rid", "127.0.0.1")
    done: list[RequestRecord] = []
    events = [b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n', b"data: [DONE]\n\n"]
    body = FollowerBody(FakeFollower(events), {}, rec, 5.0, None, done.append,  # type: ignore[arg-type]
                        resume=resume, events=True)
    assert b"".join(body) == b"".join(events)
    body.close()
    assert asked == [] and done[0].error == ""


def test_a_resumed_stream_leaves_its_tokens_to_the_backend_call_that_took_over() -> None:
    saved: list[tuple[str, Usage]] = []
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'

    def resume(sent: SentPrint) -> Iterator[bytes]:
        yield from [usage, b"data: [DONE]\n\n"]  # counted by that call's own UpstreamBody

    rec = RequestRecord("POST", "/v1/chat/completions", "rid", "127.0.0.1")
    body = FollowerBody(FakeFollower([b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n']), {}, rec, 5.0,
                        None, lambda r: None, resume=resume,  # type: ignore[arg-type]
                        saved=lambda model, u: saved.append((model, u)), events=True)
    assert b"".join(body).endswith(b"data: [DONE]\n\n")
    body.close()
    assert saved == []
