"""Response bodies handed to gunicorn: relayed, replayed or followed, each settling once.

``UpstreamBody`` relays a backend's body piece by piece as it arrives (never whole), records
it for the cache and publishes it to coalesced followers on the way. Its ``close()`` — called
by gunicorn when the body ended, broke off or the client left — releases the backend
connection (back to the pool only when read to its end), gives the routing place back, gives
the breaker its verdict, counts the answer's tokens, stores a clean answer, ends the coalesced
flight and reports the request, exactly once.
A body that breaks after its headers went out cuts the client connection
(``StreamAborted``), so the client sees a broken chunked body, never a clean end.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import gevent

from ntonix.cache.coalescer import LeaderFailed
from ntonix.cluster.relay import Fanout
from ntonix.core.cache_entry import CachedResponse
from ntonix.core.record import RequestRecord
from ntonix.core.sse import SentPrint, StreamRecorder
from ntonix.core.usage import Usage, UsageTap
from ntonix.errors import NtonixError
from ntonix.server import disconnect

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

    from ntonix.cluster.relay import Publisher, Subscriber
    from ntonix.core.attempt import Attempt
    from ntonix.gateway.runtime import Runtime

log = logging.getLogger("ntonix.proxy")

class StreamAborted(gevent.GreenletExit):  # type: ignore[misc]
    """The answer broke off after its headers went out; the client connection was cut."""


def abort_client(environ: WSGIEnvironment) -> None:
    """Cut the client connection so it sees a broken body, never a clean end."""
    sock = environ.get("gunicorn.socket")
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Body:
    """A finished answer (list of chunks) whose ``close`` reports the request."""

    __slots__ = ("_chunks", "_on_close")

    def __init__(self, chunks: list[bytes], on_close: Callable[[], None]) -> None:
        self._chunks, self._on_close = chunks, on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)

    def close(self) -> None:
        self._on_close()


class UpstreamBody:
    """The backend's body, relayed piece by piece; ``close`` settles everything once."""

    closed = False  # close() was called: a second call must not settle again

    def __init__(self, rt: Runtime, resp: Any, attempt: Attempt, environ: WSGIEnvironment, rec: RequestRecord,
                 store_key: str | None, replay_headers: tuple[tuple[str, str], ...], stream: bool,
                 leader: Publisher | None, watch: disconnect.Watch | None, done: Callable[[RequestRecord], None],
                 usage: UsageTap | None = None) -> None:
        self.rt, self.resp, self.environ, self.rec = rt, resp, environ, rec
        self.attempt, self.backend, self.usage = attempt, attempt.backend, usage
        self.store_key, self.replay_headers, self.leader, self.watch = store_key, replay_headers, leader, watch
        self._done = done
        self.recorder: StreamRecorder | None = StreamRecorder() if (store_key is not None and stream) else None
        self.chunks: list[bytes] | None = [] if (store_key is not None and not stream) else None
        self.recorded = 0
        self.max_record = rt.config.cache.max_entry_bytes
        self.stream = stream
        self.ended = False  # the backend's body ended cleanly
        self.failed: str = ""
        # A body without Content-Length (SSE, chunked) may be long in coming: headers go out at
        # once. A sized body waits for its bytes, so a backend dying in between costs a clean
        # error rather than a truncated 200.
        self._head_flushed = resp.content_length is not None
        # A sized answer to store is stored as soon as its last byte is in, before gunicorn
        # writes it: once the client has every byte, a request it sends at once to another
        # worker must find the answer or its flight (a solo leader's L2 write then waits for
        # the loop's turn, its flight ends after it: _store, _settle).
        self._whole_at: int | None = resp.content_length if self.chunks is not None else None
        self._stored = False
        self._deferred: Callable[[Callable[[], None]], object] | None = None  # the L2 write waits

    def __iter__(self) -> UpstreamBody:
        return self

    def __next__(self) -> bytes:
        if self.ended:
            raise StopIteration
        if not self._head_flushed:
            self._head_flushed = True
            if not self.rt.transport.body_ready(self.resp):
                # gunicorn sends the headers with the first write: send them now, not with the
                # first token (a stream's headers come long before its first event).
                return b""
        try:
            chunk = self.rt.transport.read_some(self.resp)
        except NtonixError as exc:
            self.failed = exc.message
            self.rec.error = exc.message
            log.warning("stream.broken", extra={"backend": self.backend.address, "reason": exc.message,
                                                "request_id": self.rec.request_id})
            if self.leader is not None:
                # Before the client sees the cut: a request it sends at once must not follow
                # this doomed flight (close() would end it only after the cut).
                self.leader.finish(False)
            abort_client(self.environ)
            raise StreamAborted(exc.message) from None
        if not chunk:
            self.ended = True
            raise StopIteration
        rec = self.rec
        if rec.ttft_ms is None:
            rec.ttft_ms = (time.perf_counter() - rec.started) * 1000.0
        rec.bytes_sent += len(chunk)
        self._take(chunk)
        if self._whole_at is not None and self.recorded >= self._whole_at and self.chunks is not None:
            self._store()
        return chunk

    def _take(self, chunk: bytes) -> None:
        """Record a piece for the cache and publish it to coalesced followers."""
        if self.store_key is not None:
            self.recorded += len(chunk)
            if self.recorded > self.max_record:
                # cache.max_entry_bytes: relayed as usual, never stored, and not held meanwhile.
                self.store_key, self.recorder, self.chunks = None, None, None
            elif self.recorder is not None:
                self.recorder.feed(chunk)
            elif self.chunks is not None:
                self.chunks.append(chunk)
        if self.leader is not None:
            self.leader.publish_chunk(chunk)
        if self.usage is not None:
            self.usage.feed(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watch is not None:
            self.watch.cancel()
        if not self.ended and not self.failed and self.leader is not None and self.leader.has_followers:
            # Our client left but others follow this answer: finish reading it for them (and
            # for the cache) in the background; this request is reported now.
            self.rec.error = "client closed the connection; answer finished for coalesced followers"
            if not self.rec.finished:
                self._done(self.rec)
            self.rt.background.spawn(self._finish_for_followers)
            return
        self._settle()

    def _finish_for_followers(self) -> None:
        try:
            while True:
                chunk = self.rt.transport.read_some(self.resp)
                if not chunk:
                    self.ended = True
                    break
                self._take(chunk)
        except NtonixError as exc:
            self.failed = exc.message
        finally:
            self._settle()

    def _settle(self) -> None:
        """Release the backend connection and settle breaker, cache, followers and telemetry once."""
        rt, backend, rec = self.rt, self.backend, self.rec
        self.resp.release()  # back to the pool only if read to its end
        rec.streamed = self.recorder is not None or self.stream
        if self.usage is not None:
            # Whenever the backend reported it, also in a stream that broke (or whose client left)
            # after its usage chunk: those tokens were processed.
            usage = self.usage.finish()
            if usage is not None:
                rec.usage = usage
                rt.telemetry.tokens(rec.model, backend.address, usage)
        if self.ended:
            self._settle_ok()
        elif self.failed:
            rt.backend_failed(self.attempt, self.failed)
            rec.backend_ok = False
        else:  # the client left (or the worker is stopping): no verdict on the backend
            self.attempt.abandoned()
            rec.error = rec.error or "client closed the connection"
        if self.leader is not None:
            if self._deferred is not None:
                # Right after the batched L2 write, in its callback (ResponseCache.then): a request
                # that waits on the host's flight then finds the answer in L2 (ntonix/cache/coalescer.py,
                # "The handshake": a 200 is in the cache before the leader leaves the board).
                assert rt.cache is not None
                self.leader.finish_after(self.ended, functools.partial(rt.cache.then, defer=self._deferred))
            else:
                self.leader.finish(self.ended)
        if not rec.finished:
            self._done(rec)
        if backend.removed and backend.in_flight == 0:
            rt.reap_drained()

    def _settle_ok(self) -> None:
        rt, rec = self.rt, self.rec
        if rec.status >= 500:
            rt.backend_failed(self.attempt, f"answered {rec.status}")
            rec.backend_ok = False
        else:
            rt.backend_succeeded(self.attempt, rec.backend_latency_ms or 0.0)
            rec.backend_ok = True
        self._store()

    def _store(self) -> None:
        """Keep the answer in the cache (once): at close(), or as soon as a sized one is whole."""
        rt, rec = self.rt, self.rec
        if self._stored or self.store_key is None or rt.cache is None:
            return
        self._stored = True
        if self.recorder is not None:
            if not self.recorder.done:
                return  # a stream without its [DONE] is never stored
            body = self.recorder.body
        elif self.chunks is not None:
            body = b"".join(self.chunks)
        else:
            return
        entry = CachedResponse(status=rec.status, headers=self.replay_headers, body=body, created=time.time(),
                               streamed=self.recorder is not None)
        # Leading across gateways: the Redis tier's copy goes with the flight's end, in the
        # keeper's batched round trip (ntonix/cluster/flights.py ``store_at_end``), not one of its own.
        remote, encoded = True, None
        if isinstance(self.leader, Fanout):
            args = rt.cache.remote_set_args(self.store_key, entry)
            if args is not None:
                encoded = args[1]  # L2 stores the same bytes
                remote = not self.leader.cluster.store_at_end(*args)
        # The L2 write of a solo leader's answer waits for the end of the loop's turn, in one
        # write transaction with every answer stored meanwhile (ntonix/cache/__init__.py
        # ``store``); its flight ends after that write (_settle), so an identical request the
        # client sends at once, to any worker, finds the flight or the answer (a flight across
        # gateways ends at once: Fanout.finish_after). Any other flight (registered: others
        # follow it; off the board) stores at once.
        defer = rt.defer if self.leader is not None and self.leader.solo_on_board else None
        self._deferred = defer
        rt.cache.store(self.store_key, entry, remote=remote, defer=defer, encoded=encoded)


class FollowerBody:
    """A coalesced request's answer, read from the leader's journal as it grows.

    If the leader stops publishing after some of the answer went out, ``resume(sent)`` (the
    proxy's) fetches the rest from a backend, checking that it carries what was sent
    (``sent``: ntonix/core/sse.py ``SentPrint``; of an event stream, the content of its events);
    only when that fails is the client cut."""

    def __init__(self, follower: Subscriber, environ: WSGIEnvironment, rec: RequestRecord, timeout: float,
                 watch: disconnect.Watch | None, done: Callable[[RequestRecord], None],
                 flush_head: bool = False,
                 resume: Callable[[SentPrint], Iterator[bytes]] | None = None,
                 saved: Callable[[str, Usage], None] | None = None, events: bool = False) -> None:
        self.follower, self.environ, self.rec, self.watch, self._done = follower, environ, rec, watch, done
        self._chunks: Iterator[bytes] = follower.chunks(timeout)
        self._flush_head = flush_head  # an unsized (streamed) answer: headers go out at once
        self._resume = resume
        self._resumed: Iterator[bytes] | None = None
        self._sent = SentPrint(events)
        rec.streamed = flush_head
        # The tokens this answer saved the backends (a coalesced follower is a HIT). ``events``:
        # an event stream (by its content type; an unsized answer may be plain JSON, chunked).
        self._saved = saved
        self._usage: UsageTap | None = UsageTap(events) if saved is not None else None

    def __iter__(self) -> FollowerBody:
        return self

    def __next__(self) -> bytes:
        if self._flush_head:
            self._flush_head = False
            return b""
        try:
            chunk = next(self._chunks)
        except LeaderFailed as exc:
            chunk = self._take_over(str(exc))
        except NtonixError as exc:  # the resumed answer failed
            self._cut(exc.message)
        rec = self.rec
        if rec.ttft_ms is None:
            rec.ttft_ms = (time.perf_counter() - rec.started) * 1000.0
        rec.bytes_sent += len(chunk)
        if self._resume is not None and self._resumed is None:
            self._sent.feed(chunk)
        if self._usage is not None:
            self._usage.feed(chunk)
        return chunk

    def _take_over(self, why: str) -> bytes:
        """The leader stopped publishing: go on from a backend of our own (once), or cut."""
        if self._resume is None or self._resumed is not None:
            self._cut(why)
        sent = self._sent
        sent.settle()
        if sent.done and not sent.pending.strip():
            # The client has the whole stream, data: [DONE] included: only its end was lost.
            self.follower.close()
            raise StopIteration
        if not sent.resumable:
            self._cut(why)
        log.warning("coalesce.follower_resumed", extra={"reason": why, "request_id": self.rec.request_id,
                                                        "bytes_sent": self.rec.bytes_sent})
        self.follower.close()
        # The backend call that takes over counts its own tokens (its UpstreamBody): counted
        # here as saved too, they would be counted twice.
        self._usage = None
        self._resumed = self._chunks = self._resume(sent)
        try:
            return next(self._chunks)
        except NtonixError as exc:
            self._cut(exc.message)

    def _cut(self, why: str) -> NoReturn:
        self.rec.error = f"coalesced answer broke off: {why}"
        abort_client(self.environ)
        raise StreamAborted(why) from None

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        self.follower.close()
        if self._resumed is not None:
            close = getattr(self._resumed, "close", None)
            if close is not None:
                close()  # releases the backend connection of a resumed answer
        # Counted once the usage arrived, whether or not the end did: a client that has the
        # whole answer may close before the leader's end reaches this worker.
        if self._usage is not None and self._saved is not None:
            usage, self._usage = self._usage.finish(), None
            if usage is not None:
                self.rec.usage = usage
                self._saved(self.rec.model, usage)
        if not self.rec.finished:
            self._done(self.rec)
