"""A follower's body whose leader stops publishing midway goes on from a resumed answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import xxhash

from ntonix.cache.coalescer import LeaderFailed
from ntonix.core.record import RequestRecord
from ntonix.errors import UpstreamUnavailable
from ntonix.gateway.bodies import FollowerBody, StreamAborted


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
    asked: list[tuple[int, bytes]] = []

    def resume(sent: int, digest: bytes) -> Iterator[bytes]:
        asked.append((sent, digest))
        yield from [b"data: 3\n\n", b"data: [DONE]\n\n"]

    body, done = body_of(follower, resume)
    assert b"".join(body) == b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: [DONE]\n\n"
    assert asked == [(18, xxhash.xxh3_128(b"data: 1\n\ndata: 2\n\n").digest())]
    assert follower.closed == 1  # left the dead flight at once
    body.close()
    assert len(done) == 1 and done[0].bytes_sent == 41 and done[0].error == ""


def test_a_resumed_answer_that_differs_cuts_the_client() -> None:
    def resume(sent: int, digest: bytes) -> Iterator[bytes]:
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
