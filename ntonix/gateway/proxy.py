"""The request flow: body, cache, coalescing, backend choice with failover, relaying.

Theory of operation
-------------------
1. Read the body (limit → 413). On the OpenAI endpoints parse it once as JSON (→ 400).
2. Cacheable requests compute the cache key; a hit is replayed at once (``X-Cache: HIT``).
3. A miss joins the coalescer: the first of identical requests in flight (on any worker of
   this host) is the leader and goes to a backend; the others follow the leader's answer as
   it streams (``X-Cache: HIT``). A follower whose leader failed goes to a backend itself.
   With ``cache.redis_url``, the host's leader then joins the gateways' flight the same way
   (``_join``; ntonix/cluster/relay.py): it leads for all of them, or follows another
   gateway's leader and relays its answer to the host's followers.
4. Backend choice (``ntonix.routing.select``, docs/routing.md): among the eligible backends
   that serve the request's ``model`` (none serves it → 404), by ``routing.policy``, holding a
   host-wide place under ``max_in_flight`` (queued first come, first served; → 503 when the
   wait is over). A request that could not be sent (``SendFailed``) is tried on the next
   backend, up to ``proxy.retries`` more; one that reached a backend is never sent twice.
   The backend's request is an ``Attempt`` (ntonix/core/attempt.py): in flight, the breaker's
   permission and the place (``Lease``), settled exactly once with one verdict.
5. The body is relayed piece by piece as it arrives (``ntonix.gateway.bodies.UpstreamBody``),
   recorded for the cache and published to followers on the way. Its ``close()`` always
   releases the backend connection: back to the pool only when the response was read to its end.

While the handler waits on the backend, ``disconnect.watch`` notices a client that left and
kills the handler greenlet, so the ``finally`` blocks close the backend connection.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ntonix.cache.coalescer import Follower, Leader
from ntonix.cache.remote import PREFIX as REMOTE_PREFIX
from ntonix.cluster.relay import Fanout, Publisher, Relay, Subscriber, widen
from ntonix.core.cache_entry import CachedResponse, hit_head, replayable_headers
from ntonix.core.cache_key import CACHEABLE_PATHS, cache_key, credential_keys, credentials, request_cache_policy
from ntonix.core.headers import forward_environ_headers, forward_response_headers, header_value, request_id_from
from ntonix.core.models import models_answer, request_model
from ntonix.core.record import RequestRecord
from ntonix.core.sse import ResumeMismatch, SentPrint, Splice
from ntonix.core.usage import Usage, UsageTap, usage_of_body
from ntonix.errors import (
    BackendsBusy,
    BadRequest,
    IncompleteBody,
    NoHealthyBackend,
    NtonixError,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedTransferCoding,
    UpstreamTimeout,
    UpstreamUnavailable,
    render_error,
    status_line,
)
from ntonix.gateway.bodies import Body, FollowerBody, UpstreamBody
from ntonix.server import disconnect
from ntonix.upstream import PoolBusy, SendFailed, Unanswered

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from ntonix.core.attempt import Attempt
    from ntonix.gateway.host import Host
    from ntonix.gateway.runtime import Runtime

log = logging.getLogger("ntonix.proxy")

# Entries whose rendered hit head a worker keeps (a few hundred bytes each, plus the entry itself,
# which that keeps alive after L1 dropped it); past this many, or past a quarter of L1's bytes
# in their answers, all go.
_RENDERED_MAX = 4096
# Bytes of request bodies a worker keeps to know a repeated hit by, and the largest one kept.
_KNOWN_MAX_BYTES = 1 << 20
_KNOWN_BODY_MAX = 16 << 10


@dataclass(frozen=True, slots=True)
class CachedHit:
    """A hit found before the WSGI environ was built: ``status`` (``"200 OK"``), the header
    lines from the stored answer up to its ``Content-Length`` (``hit_head``), the body, and the
    request's record (its ``X-Request-ID``; finished by ``Gateway.finished``). The server
    writes ``X-Request-ID`` and ``X-Cache: HIT`` after ``head``, as ``Proxy._replay`` orders them."""

    status: str
    head: bytes
    body: bytes
    rec: RequestRecord


@dataclass(frozen=True, slots=True)
class _Probe:
    """What cached_hit computed for a request it could not answer: handle() reuses it for the
    same request (the same ``body`` object) instead of computing the key and looking in L1
    again; ``parsed`` is None when the key was known without parsing. ``stores``: the coalescing
    board's store counter read before the probe looked in L2 (``Proxy._join``)."""

    body: bytes
    key: str
    parsed: dict[str, Any] | None
    stores: int | None




def read_body(environ: WSGIEnvironment, limit: int, timeout_s: float, host: Host) -> bytes:
    """The whole request body, within ``limit`` bytes (413); 408 when the client leaves more
    than ``timeout_s`` between two pieces of it (nginx's ``client_body_timeout``). Both errors
    close the connection after the answer (``closes_connection``): the body is left unread.
    """
    try:
        return host.read_body(environ, timeout_s, _read_body, limit)
    except TimeoutError:
        raise RequestTimeout(f"request body not received: {timeout_s:g}s without data") from None


def _read_body(environ: WSGIEnvironment, limit: int) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        n = int(length)
        if n > limit:
            raise PayloadTooLarge(f"request body of {n} bytes is over the limit of {limit} bytes")
        data = stream.read(n) if n else b""
        if len(data) < n:
            raise IncompleteBody(f"request body ended after {len(data)} of its {n} bytes (Content-Length)")
        return data
    coding = environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if coding:
        if any(c.strip() not in ("chunked", "identity", "") for c in coding.split(",")):
            raise UnsupportedTransferCoding(f"Transfer-Encoding {coding!r}: only chunked is supported")
        data = bytes(stream.read(limit + 1))
        if len(data) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        return data
    return b""


# Every byte maps to "0" (a digit) or " ": a run of 19 digits is then a plain substring search.
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_NUMBER = b"0" * 19


def sniff_model(body: bytes, content_type: str) -> str:
    """The JSON ``model`` of a request body that is not for the cache ("" if none, or not JSON)."""
    if "json" not in content_type.lower() and body[:1] != b"{":
        return ""
    try:
        return request_model(orjson.loads(body)) or ""
    except orjson.JSONDecodeError:
        return ""


def parse_json_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest("request body must be a JSON object, got an empty body")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if _LONG_NUMBER in body.translate(_DIGITS):
        # orjson reads integers beyond 64 bits as floats, where 2**64 and 2**64 + 1 are one
        # number: two different requests would share a cache key. The standard library keeps
        # them exact (orjson has checked the text already; ~1 ns per byte to look).
        try:
            parsed = json.loads(body.decode("utf-8"))
        except RecursionError:
            raise BadRequest("request body is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(parsed).__name__}")
    return parsed


def origin_form(target: str) -> str:
    """The request target for an origin server: path and query only (RFC 9112 §3.2.1).

    A client may send the absolute form (``GET http://other.host/x``); passed on as it is, the
    backend must take its host from it instead of from our ``Host`` (§3.2.2).
    """
    start = target.find("://")
    if start < 0:
        return target  # "*" (OPTIONS), or nothing we can rewrite
    rest = target[start + 3:]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    tail = rest[cut:]
    return tail if tail.startswith("/") else "/" + tail


class Proxy:
    def __init__(self, runtime: Runtime, done: Callable[[RequestRecord], None], host: Host) -> None:
        self.rt = runtime
        self._done = done
        self.host = host
        self._credential_keys = credential_keys(runtime.config.cache.partition_headers)
        # Hit fast path (cached_hit): each entry's rendered header lines and usage, by key, and
        # what a probe that missed found out, for the WSGI path of the same request.
        self._rendered: dict[str, tuple[CachedResponse, bytes, Usage | None]] = {}
        self._rendered_bytes = 0  # of the answers _rendered holds
        memory = runtime.cache.memory if runtime.cache is not None else None
        self._rendered_budget = max(1 << 20, memory.max_bytes // 4) if memory is not None else 1 << 20
        self._probe: _Probe | None = None
        # Requests that were hits, exactly as received (path, credentials, body bytes) -> their
        # key and model: a repeated one skips the JSON parse and the canonical key (the key is a
        # function of exactly these). Only hits are kept; bounded by _KNOWN_MAX_BYTES of bodies.
        self._known: dict[tuple[str, str | None, bytes], tuple[str, str]] = {}
        self._known_bytes = 0

    # ------------------------------------------------------------------ hit fast path
    def cached_hit(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
                   client: str) -> CachedHit | None:
        """A cache hit for a request the worker has parsed but not yet made a WSGI environ for
        (``headers`` as the environ's ``HTTP_*`` items would be), or ``None``: the request then
        goes through :meth:`handle`, which answers it exactly as before. The same key, policy
        and accounting as :meth:`handle` and :meth:`_replay`; only this worker's L1 is asked
        (a hit there needs no other tier), the answer's header lines are rendered once per
        entry, and a request repeated byte for byte is known by its bytes (``_known``). The
        caller writes the answer and hands the record to ``Gateway.finished``."""
        rt = self.rt
        cache = rt.cache
        if method != "POST" or path not in CACHEABLE_PATHS or cache is None or not cache.enabled:
            return None
        if not request_cache_policy(headers.get("HTTP_CACHE_CONTROL"))[0]:
            return None
        credential = credentials(headers, self._credential_keys)
        seen = (path, credential, body)
        memo = len(body) <= _KNOWN_BODY_MAX  # hashing a larger body would cost misses too much
        known = self._known.get(seen) if memo else None
        parsed: dict[str, Any] | None = None
        if known is None:
            try:
                parsed = parse_json_body(body)
            except BadRequest:
                return None  # handle() answers it
            key = cache_key(path, parsed, credential)
        else:
            key = known[0]
        entry = cache.lookup_memory(key)
        stores: int | None = None
        if entry is None:
            # L1 takes an answer on its first hit, not when it is stored (ResponseCache.store):
            # that first hit is read from L2 here (and is in L1 from then on).
            stores = self._stores()
            entry = cache.lookup_below_memory(key, count=False, remote=False)
        if entry is None:
            self._probe = _Probe(body, key, parsed, stores)
            return None
        if known is None:
            assert parsed is not None
            known = (key, request_model(parsed) or "")
            if memo:
                if self._known_bytes + len(body) > _KNOWN_MAX_BYTES:
                    self._known.clear()
                    self._known_bytes = 0
                self._known[seen] = known
                self._known_bytes += len(body)
        rendered = self._rendered.get(key)
        if rendered is None or rendered[0] is not entry:
            head = hit_head(entry.headers, len(entry.body))
            if head is None:
                return None
            size = len(entry.body)
            rendered = (entry, head, usage_of_body(entry.body, entry.streamed))
            if size <= self._rendered_budget:  # a larger answer is rendered for each hit instead
                old = self._rendered.pop(key, None)
                if old is not None:
                    self._rendered_bytes -= len(old[0].body)
                if len(self._rendered) >= _RENDERED_MAX or self._rendered_bytes + size > self._rendered_budget:
                    self._rendered.clear()
                    self._rendered_bytes = 0
                self._rendered[key] = rendered
                self._rendered_bytes += size
        _, head, usage = rendered
        rec = RequestRecord(method, path, request_id_from(headers.get("HTTP_X_REQUEST_ID")), client)
        rec.model = known[1]
        rec.cache = "HIT"
        rec.status = entry.status
        rec.streamed = entry.streamed
        rec.bytes_sent = len(entry.body)
        hit = CachedHit(status_line(entry.status), head, entry.body, rec)
        if usage is not None:
            rec.usage = usage
            rt.telemetry.tokens_saved(rec.model, usage)
        rt.telemetry.started()  # last: from here on the caller owes Gateway.finished(rec)
        return hit

    def _stores(self) -> int | None:
        """The coalescing board's store counter, read before a look in L2 (``_join``)."""
        coalescer = self.rt.coalescer
        return coalescer.stores() if coalescer is not None and self.rt.flights is None else None

    # ------------------------------------------------------------------ entry
    def handle(self, environ: WSGIEnvironment, start_response: StartResponse, rec: RequestRecord) -> Any:
        rt = self.rt
        cfg = rt.config
        method = rec.method
        path = rec.path
        body = read_body(environ, cfg.proxy.max_body_bytes, cfg.server.body_timeout_s, self.host)
        if method == "GET" and path == "/v1/models":
            known = rt.known_models()
            if known is not None:  # else forwarded, like any other request
                return self._answer(models_answer(known), start_response, rec)
        cacheable = method == "POST" and path in CACHEABLE_PATHS
        key: str | None = None
        serve_ok = store_ok = stream = False
        parsed: dict[str, Any] | None = None
        # This very request's body (``is``) missed in L1 a moment ago in cached_hit.
        probe, self._probe = self._probe, None
        if probe is not None and probe.body is not body:
            probe = None
        probed = probe is not None
        if not cacheable and body and method == "POST" and path.startswith("/v1/"):
            # Any other OpenAI-style call (/v1/responses, /v1/rerank, ...): its JSON model routes
            # it as well (INTERFACE.md); a body that is not JSON is forwarded as it is.
            rec.model = sniff_model(body, environ.get("CONTENT_TYPE", ""))
        if cacheable:
            parsed = probe.parsed if probe is not None and probe.parsed is not None else parse_json_body(body)
            rec.model = request_model(parsed) or ""
            if not rec.model and not isinstance(parsed.get("model", ""), str | None):
                raise BadRequest(f"'model' must be a string, got {type(parsed['model']).__name__}")
            stream = parsed.get("stream") is True
            if rt.cache is not None and rt.cache.enabled:
                serve_ok, store_ok = request_cache_policy(environ.get("HTTP_CACHE_CONTROL"))
                # The query string is part of the key (nginx's proxy_cache_key has $request_uri):
                # ?api-version=... may change the answer. A request without one keys as before.
                key = (probe.key if probe is not None
                       else cache_key(path, parsed, credentials(environ, self._credential_keys),
                                      variant=environ.get("QUERY_STRING", "")))
        rec.cache = "MISS" if serve_ok else "BYPASS"
        leader: Publisher | None = None
        if key is not None and serve_ok and rt.cache is not None:
            # Hits and misses are counted by telemetry from each answer's X-Cache (lock-free,
            # all workers): no write to the shared store per lookup. Across gateways, the Redis
            # tier is read in the cluster's join instead (_join): one round trip, not two.
            remote = rt.flights is None
            stores = probe.stores if probe is not None else self._stores()
            entry = (rt.cache.lookup_below_memory(key, count=False, remote=remote, local=False) if probed
                     else rt.cache.lookup(key, count=False, remote=remote))
            # Two rounds: followers whose leader failed before answering regroup behind a new
            # leader (one of them) instead of all going to the backend at once.
            for _ in range(2 if entry is None and rt.coalescer is not None else 0):
                assert rt.coalescer is not None
                role, entry = self._join(key, stores)
                if entry is not None:
                    break
                if isinstance(role, (Follower, Relay)):
                    followed = self._follow(role, environ, start_response, rec, body, stream)
                    if followed is not None:
                        return followed
                    entry = rt.cache.lookup(key, count=False)
                    if entry is not None:
                        break
                    continue
                leader = role
                break
            if entry is not None:
                return self._replay(entry, start_response, rec)
        try:
            if key is not None:
                # The cached answer must suit every client: ask the backend for identity encoding.
                environ.pop("HTTP_ACCEPT_ENCODING", None)
            return self._forward(environ, start_response, rec, body, key if store_ok else None, stream, leader,
                                 parsed=parsed)
        except UpstreamTimeout as exc:
            if leader is not None:
                # The backend sent no headers in time for this very request: the identical ones
                # waiting for it get the same 504 now (as an error answer of the backend's own
                # would reach them), rather than each asking again and waiting as long once more.
                status, headers, error = render_error(exc)
                try:
                    leader.publish_head(int(status[:3]), tuple(headers))
                    leader.publish_chunk(error)
                finally:
                    leader.finish(True)
            raise
        except BaseException:
            if leader is not None:
                leader.finish(False)
            raise

    def _answer(self, body: bytes, start_response: StartResponse, rec: RequestRecord) -> Body:
        """An answer of the gateway's own on a proxied path (``GET /v1/models``)."""
        rec.status = 200
        rec.bytes_sent = len(body)
        start_response(status_line(200), [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                          ("X-Request-ID", rec.request_id)])
        return Body([body], lambda: self._done(rec))

    def _join(self, key: str, stores: int | None) -> tuple[Leader | Follower | Fanout | Relay, CachedResponse | None]:
        """This request's part in answering ``key``: lead or follow on this host, then (a host's
        leader only) across the gateways sharing Redis (ADR 0009); or the cached answer, if a
        previous leader stored it between our miss and the join (the leader role is then ended).

        The re-check reads the host's tiers, then Redis inside the cluster's join: one round
        trip for both (ntonix/cluster/flights.py ``join_or_hit``). On this host alone, L2 is
        read again only if the board's store counter moved since ``stores`` was read, before the
        caller's look in L2: every L2 write moves it (ntonix/cache/board.py), so otherwise
        nothing was stored for the key since (one L2 read per miss)."""
        rt = self.rt
        assert rt.coalescer is not None and rt.cache is not None
        role = rt.coalescer.join(key)
        if isinstance(role, Follower):
            return role, None
        flights = rt.flights
        # The caller looked in L1 a moment ago: L1 only ever copies the tiers looked in here.
        local = flights is not None or stores is None or rt.coalescer.stores() != stores
        entry = rt.cache.lookup_below_memory(key, count=False, remote=flights is None, local=local)
        if entry is None and flights is not None:
            widened = widen(role, flights, key, REMOTE_PREFIX + key)
            if isinstance(widened, bytes):
                entry = rt.cache.adopt(key, widened)
                widened = role if entry is not None else widen(role, flights, key)  # unreadable: a miss
            assert not isinstance(widened, bytes)
            if entry is None:
                return widened, None
        if entry is not None:
            role.finish(False)
        return role, entry

    # ------------------------------------------------------------------ cache paths
    def _replay(self, entry: CachedResponse, start_response: StartResponse, rec: RequestRecord) -> Body:
        rec.cache = "HIT"
        rec.status = entry.status
        rec.streamed = entry.streamed
        usage = usage_of_body(entry.body, entry.streamed)
        if usage is not None:
            rec.usage = usage
            self.rt.telemetry.tokens_saved(rec.model, usage)
        headers = list(entry.headers)
        headers += [("Content-Length", str(len(entry.body))), ("X-Request-ID", rec.request_id), ("X-Cache", "HIT")]
        start_response(status_line(entry.status), headers)
        rec.bytes_sent = len(entry.body)
        return Body([entry.body], lambda: self._done(rec))

    def _follow(self, follower: Subscriber, environ: WSGIEnvironment, start_response: StartResponse,
                rec: RequestRecord, body: bytes, stream: bool) -> Iterator[bytes] | None:
        timeout = self.rt.config.proxy.read_timeout_s
        watch = disconnect.watch(environ.get("gunicorn.socket"))
        try:
            head = follower.wait_head(timeout)
        except BaseException:
            follower.close()
            if watch is not None:
                watch.cancel()
            raise
        if head is None:  # the leader failed before answering: go to a backend ourselves
            follower.close()
            if watch is not None:
                watch.cancel()
            return None
        status, headers = head
        rec.cache = "HIT"
        rec.status = status
        out = [*headers, ("X-Request-ID", rec.request_id), ("X-Cache", "HIT")]
        start_response(status_line(status), out)
        sized = header_value(headers, "content-length") is not None
        events = "text/event-stream" in (header_value(headers, "content-type") or "").lower()
        return FollowerBody(follower, environ, rec, timeout, watch, self._done, flush_head=not sized,
                            saved=self.rt.telemetry.tokens_saved, events=events,
                            resume=lambda sent: self._resume(environ, rec, body, stream, sent))

    def _resume(self, environ: WSGIEnvironment, rec: RequestRecord, body: bytes, stream: bool,
                sent: SentPrint) -> Iterator[bytes]:
        """The rest of a coalesced answer whose leader stopped publishing after part of it
        reached our client (its journal write failed, Redis failed under a leader on another
        gateway): the same request from a backend of our own, passed on from where the client
        is if it carries what the client was sent (``sent``: the same bytes, or of an event
        stream the same content event for event, ids and timestamps aside); else
        :class:`UpstreamUnavailable` (the client is cut). Nothing is stored or published; the
        backend call is accounted as any other."""
        status: list[str] = []

        def capture(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status.append(line)

        environ.pop("HTTP_ACCEPT_ENCODING", None)  # as the leader asked: identity
        sub = RequestRecord(rec.method, rec.path, rec.request_id, rec.client)
        sub.model = rec.model
        upstream = self._forward(environ, capture, sub, body, None, stream, None, done=lambda _: None)
        try:
            if status[:1] != ["200 OK"]:
                raise UpstreamUnavailable(f"coalesced answer broke off; the backend asked again answered {status}")
            try:
                splice = Splice(sent)
                for chunk in upstream:
                    chunk = splice.feed(chunk)
                    if chunk:
                        yield chunk
                splice.finish()
            except ResumeMismatch as exc:
                raise UpstreamUnavailable(f"coalesced answer broke off; {exc}") from None
        finally:
            upstream.close()

    # ------------------------------------------------------------------ backend path
    def _forward(self, environ: WSGIEnvironment, start_response: StartResponse, rec: RequestRecord, body: bytes,
                 store_key: str | None, stream: bool, leader: Publisher | None,
                 done: Callable[[RequestRecord], None] | None = None,
                 parsed: dict[str, Any] | None = None) -> Any:
        rt = self.rt
        cfg = rt.config
        backends = rt.serving(rec.model or None)  # 404 when no backend serves the model
        selector = rt.routing.selector
        blocks = rt.routing.blocks(parsed, environ.get("HTTP_AUTHORIZATION") or "") if parsed is not None else []
        scheme = environ.get("wsgi.url_scheme", "http")
        base_headers, real_ip = forward_environ_headers(
            environ, remote_addr=environ.get("REMOTE_ADDR", ""), scheme=scheme,
            request_id=rec.request_id, trusted=rt.trusted_proxies)
        rec.client = real_ip
        target = environ.get("RAW_URI") or rec.path
        if target[:1] != "/":
            target = origin_form(target)
        tried: list[str] = []
        last_error: Exception | None = None
        all_busy = True  # every backend tried had no free connection (PoolBusy)
        rt.fresh_view()
        watch = disconnect.watch(environ.get("gunicorn.socket"))
        try:
            for _ in range(cfg.proxy.retries + 1):
                try:
                    lease = selector.acquire(backends, blocks, exclude=tried,
                                             refresh=lambda: rt.serving(rec.model or None))
                except BackendsBusy:
                    raise
                except NoHealthyBackend:
                    if not tried:
                        raise  # backends serve the model, but none is routable: 503 + Retry-After
                    break
                backend = next((b for b in backends if b.address == lease.address), None)
                if backend is None:  # a backend that joined (HUP) while this request waited
                    backends = rt.serving(rec.model or None)
                    backend = next((b for b in backends if b.address == lease.address), None)
                    if backend is None:  # and left again at once
                        lease.release()
                        continue
                tried.append(backend.address)
                attempt = rt.attempt(backend, lease)  # in flight, breaker permission, lease: one object
                if attempt is None:
                    continue
                started = time.perf_counter()
                try:
                    resp = rt.transport.send(backend.pool, rec.method, target,
                                          [*base_headers, ("Host", backend.address)], body, cfg.proxy.read_timeout_s)
                except Unanswered as exc:
                    # Closed or reset before any response byte. If the backend now refuses new
                    # connections it died with our request: nothing was answered and nothing
                    # will be, so another backend may take it. A live backend that hung up on
                    # us is not sent the request twice.
                    rt.backend_failed(attempt, exc.message)
                    if not rt.transport.refuses_connections(backend.config.host, backend.config.port,
                                                         min(0.5, cfg.proxy.connect_timeout_s)):
                        rec.backend, rec.backend_ok = backend.address, False
                        raise
                    log.warning("backend.died_with_request", extra={
                        "backend": backend.address, "reason": exc.message, "request_id": rec.request_id})
                    all_busy = False
                    last_error = exc
                    continue
                except SendFailed as exc:
                    if isinstance(exc, PoolBusy):
                        # This worker's own limit (pool.max_size), not a failure of the backend:
                        # its breaker must not open over it (nor /health say it is down).
                        attempt.abandoned()
                    else:
                        rt.backend_failed(attempt, str(exc))
                        all_busy = False
                    log.warning("backend.send_failed", extra={"backend": backend.address, "reason": str(exc),
                                                               "request_id": rec.request_id})
                    last_error = exc
                    continue
                except NtonixError as exc:
                    rt.backend_failed(attempt, exc.message)
                    rec.backend = backend.address
                    rec.backend_ok = False
                    raise
                except BaseException:
                    attempt.abandoned()
                    raise
                try:
                    return self._relay(resp, attempt, started, environ, start_response, rec, store_key, stream,
                                       leader, watch, done or self._done)
                except BaseException:
                    if not attempt.settled:  # no body took it over (UpstreamBody settles it once)
                        resp.release()
                        attempt.abandoned()
                    raise
        except BaseException:
            if watch is not None:
                watch.cancel()
            raise
        if watch is not None:
            watch.cancel()
        if last_error is None:
            raise NoHealthyBackend("no healthy backend is available", retry_after=max(1, int(cfg.health.interval_s)))
        if all_busy and isinstance(last_error, PoolBusy):
            raise BackendsBusy(f"no free connection to any backend ({len(tried)} tried): {last_error}",
                               retry_after=1)
        raise UpstreamUnavailable(f"no backend could be reached ({len(tried)} tried); last error: {last_error}")

    def _relay(self, resp: Any, attempt: Attempt, started: float, environ: WSGIEnvironment,
               start_response: StartResponse, rec: RequestRecord, store_key: str | None, stream: bool,
               leader: Publisher | None, watch: disconnect.Watch | None,
               done: Callable[[RequestRecord], None]) -> UpstreamBody:
        backend = attempt.backend
        status = resp.status_code
        rec.status = status
        rec.backend = backend.address
        rec.backend_latency_ms = (time.perf_counter() - started) * 1000.0
        raw_headers = self.rt.transport.response_headers(resp)
        headers = forward_response_headers(raw_headers, rec.request_id)
        headers.append(("X-Cache", rec.cache))
        if status != 200 or "no-store" in (header_value(raw_headers, "cache-control") or "").lower():
            store_key = None
        if leader is not None:
            leader.publish_head(status, tuple(h for h in headers if h[0] not in ("X-Request-ID", "X-Cache")))
        start_response(status_line(status), headers)
        replay = replayable_headers(raw_headers) if store_key is not None else ()
        tap = None
        if (status == 200 and rec.method == "POST" and rec.path.startswith("/v1/")
                and not header_value(raw_headers, "content-encoding")):
            # Usage from every OpenAI-style answer: JSON, or the final usage chunk of a stream.
            kind = header_value(raw_headers, "content-type") or ""
            if "text/event-stream" in kind or "json" in kind:
                tap = UsageTap("text/event-stream" in kind)
        return UpstreamBody(self.rt, resp, attempt, environ, rec, store_key, replay, stream, leader, watch,
                            done, usage=tap)


