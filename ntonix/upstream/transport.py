"""The one I/O edge towards backends: keep-alive pools and HTTP/1.1 exchanges.

Theory of operation
-------------------
Each backend gets a ``Pool`` per worker process. ``pool.size`` idle connections are kept warm;
under load the pool grows up to ``pool.max_size`` connections; idle connections beyond
``size`` are closed after ``pool.idle_timeout_s``. A connection goes back to the pool only
when its response was read to the end and the backend allows keep-alive (geventhttpclient's
``should_close``: ``Connection: close``; and the ``Keep-Alive: max=, timeout=`` limits kept
per connection in ``ntonix.core.keepalive.ConnState``); anything else is closed.

A backend may close a keep-alive connection at any time, and some close one right after
answering while announcing keep-alive (llama.cpp's server does after every streamed answer,
issue 13). So every idle connection is checked before reuse with one zero-timeout ``poll``
(readable means a FIN or stray bytes: it is dead; about a microsecond). A reused connection
that fails before a single response byte (the FIN was still on its way) is retried once on a
fresh connection when that cannot run the request twice: when writing it failed (the backend
was gone before it had all of it), when its method is idempotent (GET, HEAD, OPTIONS, TRACE,
PUT, DELETE: RFC 9110 §9.2.2, nginx's default for ``proxy_next_upstream``), or when the hang-up
came within ``QUICK_CLOSE_S`` of sending: the close that crossed our request (llama.cpp's, a
few µs after its last answer; the poll before reuse, never skipped for a POST, sees it when it
came first). A POST the backend held longer is never resent: it may have read it and be the
one that hung up (an inference run twice).

A backend's address is resolved once, not per connection (``connect``): gevent resolves
names in its thread pool (ten threads, each waiting for the GIL the busy worker holds), so a
worker opening hundreds of backend connections at once — a cold start under load, a 1 s
backend at c = 1,000, 1,000 SSE streams — queued them there for seconds (issue #14: the
slowest requests of a fresh gateway under load waited 2–4 s, every one of them in
``getaddrinfo``). A numeric address needs no resolving at all; a name is resolved by one
greenlet at a time and kept for ``RESOLVE_TTL_S``, so a backend's DNS change is seen within that.

geventhttpclient (llhttp) parses the response. We write the request ourselves in one
``sendall`` and read the body with ``read_some``, which hands over whatever bytes have arrived
instead of waiting for a 4 KiB block (``resp.read(n)`` buffered whole SSE streams, see
docs/notes/stack.md §3). That uses the response's ``_body_buffer``/``_sock``: geventhttpclient is pinned.

Failures are translated here, in one place, into three outcomes the proxy acts on:
``SendFailed`` (the request never reached the backend: safe to try another one),
``UpstreamTimeout`` and ``UpstreamBroken``/``UpstreamUnavailable`` (``ntonix.upstream.base``).
The flow reaches these functions through ``GeventTransport``, the ``Transport`` of
``ntonix.upstream.base`` that the composition root hands it.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.lock
import gevent.select
import gevent.socket
from gevent import monkey
from geventhttpclient.response import HTTPConnectionClosed, HTTPParseError, HTTPSocketPoolResponse

from ntonix.core.keepalive import ConnState
from ntonix.errors import UpstreamTimeout, UpstreamUnavailable
from ntonix.upstream.base import PoolBusy, SendFailed, Unanswered, UpstreamBroken

__all__ = ["GeventTransport", "Pool", "SendFailed", "Unanswered", "UpstreamBroken", "probe"]

BLOCK = 64 * 1024
# llhttp sets no limit on a response head and geventhttpclient keeps every header it parses:
# without one a backend could make us buffer (and relay) megabytes of headers.
MAX_HEAD_BYTES = 64 * 1024


class HeadTooLarge(HTTPParseError):
    """The backend's status line and headers went past ``MAX_HEAD_BYTES``."""


class BoundedResponse(HTTPSocketPoolResponse):
    """geventhttpclient's pool response with a bounded head: the head must end within
    ``MAX_HEAD_BYTES`` (give or take one ``recv``) and by ``head_deadline`` (a
    ``time.monotonic`` value). The socket timeout only bounds
    each ``recv``, so a backend trickling header bytes would otherwise hold a request forever.
    The checks run only until the final head is in; ``_read_headers`` releases the socket
    (closed: the message is incomplete) when they raise."""

    def __init__(self, sock: Any, pool: Any, *, method: str, block_size: int, head_deadline: float) -> None:
        self._head_left: int | None = MAX_HEAD_BYTES
        self._head_deadline = head_deadline
        self._owner: Pool | None = pool if isinstance(pool, Pool) else None
        try:
            super().__init__(sock, pool, method=method, block_size=block_size)
        except ConnectionError as exc:
            # geventhttpclient turns only ECONNRESET on the first recv into
            # HTTPConnectionClosed; any reset before a single byte means the same to us.
            if self._head_left == MAX_HEAD_BYTES:
                raise HTTPConnectionClosed(f"connection failed before any response byte: {exc}") from exc
            raise
        self._head_left = None  # the head is in: body bytes are not counted

    def _on_headers_complete(self) -> int | bool | None:
        result = super()._on_headers_complete()
        # Here, before a complete small body releases the socket into the pool. (``in`` first:
        # ``get`` of a missing header raises and catches a KeyError, 0.3 µs per response.)
        index = self._headers_index
        if "keep-alive" in index and self._owner is not None and self.get_code() >= 200:
            keep_alive = index["keep-alive"]
            self._owner.answered(self._sock, keep_alive if isinstance(keep_alive, str) else keep_alive[-1])
        return result

    def feed(self, data: str | bytes) -> None:
        super().feed(data)
        left = self._head_left
        if left is None or (self.headers_complete and self.get_code() >= 200):
            return
        left -= len(data)
        self._head_left = left
        if left < 0:
            raise HeadTooLarge(f"response headers over {MAX_HEAD_BYTES} bytes")
        if time.monotonic() > self._head_deadline:
            raise TimeoutError("response head not complete in time")


class Pool:
    """Keep-alive connections to one backend, for one worker process (greenlet-safe)."""

    def __init__(self, host: str, port: int, *, size: int, max_size: int, idle_timeout_s: float,
                 connect_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.host, self.port = host, port
        self.size, self.max_size = size, max_size
        self.idle_timeout_s = idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._clock = clock
        self._idle: list[tuple[Any, float]] = []  # (socket, idle since), most recent last
        self._state: dict[Any, ConnState] = {}  # every open socket of this pool
        self._slots = gevent.lock.BoundedSemaphore(max_size)
        self.active = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"<Pool {self.host}:{self.port} active={self.active} idle={len(self._idle)} max={self.max_size}>"

    @property
    def idle(self) -> int:
        return len(self._idle)

    def acquire(self, fresh: bool = False, verify: bool = False) -> tuple[Any, bool]:
        """A connected socket and whether it is a reused one (never when ``fresh``). ``verify``:
        poll an idle one for a FIN before reuse however short its idle time (a request that
        cannot be resent once written)."""
        if self.closed:
            raise PoolBusy("backend removed")
        if not self._slots.acquire(timeout=self.connect_timeout_s):
            raise PoolBusy(f"all {self.max_size} connections to the backend are busy")
        self.active += 1
        try:
            self._expire()
            while self._idle and not fresh:
                sock, since = self._idle.pop()
                state = self._state[sock]
                idle = self._clock() - since
                if state.idle_ok(idle) and ((idle < _TRUST_IDLE_S and not verify) or _alive(sock)):
                    state.uses += 1
                    return sock, True
                self._discard(sock)
            sock = self._connect()
            self._state[sock] = ConnState(uses=1)
            return sock, False
        except BaseException:
            self.active -= 1
            self._slots.release()
            raise

    def _connect(self) -> Any:
        try:
            sock = connect(self.host, self.port, self.connect_timeout_s)
        except TimeoutError as exc:
            raise SendFailed(f"connect timed out after {self.connect_timeout_s:g}s") from exc
        except OSError as exc:
            raise SendFailed(f"connect failed: {exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def expire_idle(self) -> None:
        """:meth:`_expire`, from the worker's main loop: a backend that gets no more requests
        does not keep up to ``max_size`` idle connections for good."""
        self._expire()

    def _expire(self) -> None:
        """Close idle connections beyond ``size`` that waited longer than the idle timeout."""
        if len(self._idle) <= self.size:
            return
        limit = self._clock() - self.idle_timeout_s
        while len(self._idle) > self.size and self._idle[0][1] < limit:
            self._discard(self._idle.pop(0)[0])

    def _discard(self, sock: Any) -> None:
        self._state.pop(sock, None)
        _close(sock)

    def answered(self, sock: Any, keep_alive: str) -> None:
        """The backend's ``Keep-Alive`` header on the answer to the request sent on ``sock``."""
        state = self._state.get(sock)
        if state is not None:
            state.answered(keep_alive)

    # The two methods geventhttpclient's pool response calls when the body is done.
    def return_socket(self, sock: Any) -> None:
        self.active -= 1
        self._slots.release()
        state = self._state.get(sock)
        if self.closed or len(self._idle) >= self.max_size or state is None or not state.reusable():
            self._discard(sock)
        else:
            sock.settimeout(None)
            self._idle.append((sock, self._clock()))

    def release_socket(self, sock: Any) -> None:
        self.active -= 1
        self._slots.release()
        self._discard(sock)

    def close(self) -> None:
        """No new requests; idle connections closed now, busy ones when they finish."""
        self.closed = True
        while self._idle:
            self._discard(self._idle.pop()[0])


RESOLVE_TTL_S = 5.0
_Address = tuple[int, int, int, Any]  # family, type, proto, sockaddr: as getaddrinfo gives them
_real_getaddrinfo = monkey.get_original("socket", "getaddrinfo")


@dataclass(slots=True)
class _Resolved:
    addresses: list[_Address]
    expires: float  # time.monotonic(); inf for a numeric address
    lock: gevent.lock.Semaphore


_resolved: dict[tuple[str, int], _Resolved] = {}


def addresses(host: str, port: int, clock: Callable[[], float] = time.monotonic) -> list[_Address]:
    """Where ``host:port`` connects, resolved at most once per ``RESOLVE_TTL_S`` (numeric: once)."""
    entry = _resolved.get((host, port))
    if entry is None:
        try:  # a numeric address: the C call answers at once, no DNS, no thread
            found = _real_getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
            entry = _Resolved([(*a[:3], a[4]) for a in found], float("inf"), gevent.lock.Semaphore())
        except socket.gaierror:
            entry = _Resolved([], 0.0, gevent.lock.Semaphore())
        _resolved[(host, port)] = entry
    if clock() < entry.expires:
        return entry.addresses
    with entry.lock:  # one lookup per name at a time; the others take its answer
        if clock() >= entry.expires:
            found = gevent.socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            entry.addresses = [(*a[:3], a[4]) for a in found]
            entry.expires = clock() + RESOLVE_TTL_S
        return entry.addresses


def connect(host: str, port: int, timeout_s: float) -> Any:
    """A gevent socket connected to ``host:port`` (each resolved address in turn, like
    ``socket.create_connection``), without a name lookup per connection."""
    error: OSError | None = None
    for family, type_, proto, sockaddr in addresses(host, port):
        sock = gevent.socket.socket(family, type_, proto)
        try:
            sock.settimeout(timeout_s)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            _close(sock)
            error = exc
    raise error if error is not None else OSError(f"no address for {host}")


def send_all(sock: Any, data: bytes) -> None:
    """``sendall`` without gevent's per-call getsockopt (SO_SNDBUF) for the one-shot case."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


_poll = monkey.get_original("select", "poll")
# A connection back in the pool for less than this is reused without the poll of _alive by an
# idempotent request: a backend closes idle keep-alive connections after seconds, not
# milliseconds, and a connection that died meanwhile anyway (a backend restart) is caught by
# send()'s one retry on a fresh one (it closes without answering). Under load most connections
# wait microseconds between requests.
_TRUST_IDLE_S = 0.25
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# A reused connection closed this soon after a request was written on it was closing already
# (the backend's close crossed the request): no backend answers, or gives up on, a request it
# read this fast. Loose enough for a busy worker's event loop to notice the close late.
QUICK_CLOSE_S = 0.05


def _alive(sock: Any) -> bool:
    """An idle keep-alive socket must have nothing to read: a byte or EOF means FIN or garbage,
    an error or hang-up a reset.

    One ``poll`` with a zero timeout on the underlying socket, instead of a gevent ``select``
    that sets up watchers: about 1 µs (``tools/bench/pool.py``), 0.4 µs less than a
    non-blocking ``recv(MSG_PEEK)`` and its BlockingIOError. The original ``poll``: in a worker
    gevent has patched ``select.poll`` into its own, which cost ~20 µs a request here (py-spy,
    ``scripts/bench --profile``).
    """
    try:
        poller = _poll()
        poller.register(sock._sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError, AttributeError):
        return False


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


def encode_request(method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


def send(pool: Pool, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes,
         read_timeout_s: float) -> HTTPSocketPoolResponse:
    """Send one request and return once the response headers are in.

    A reused keep-alive connection that fails before any response byte arrived (the backend
    closed it while idle or right after its last answer, docs/notes/stack.md §3) is retried
    once on a fresh connection (not another pooled one) if the request cannot run twice that
    way: writing it failed, its method is idempotent, or the close came within
    ``QUICK_CLOSE_S`` (it crossed the request). Otherwise (a POST the backend may have read)
    it is ``Unanswered``.
    """
    data = encode_request(method, target, headers, body)
    resendable = method in IDEMPOTENT
    for attempt in (0, 1):
        sock, reused = pool.acquire(fresh=attempt > 0, verify=not resendable)
        try:
            sock.settimeout(read_timeout_s)
            send_all(sock, data)
            sent_at = time.monotonic()
        except OSError as exc:
            pool.release_socket(sock)
            if reused and attempt == 0:
                continue
            raise SendFailed(f"sending the request failed: {exc.strerror or exc}") from exc
        try:
            return BoundedResponse(sock, pool, method=method, block_size=BLOCK,
                                   head_deadline=time.monotonic() + read_timeout_s)
        except HTTPConnectionClosed as exc:
            if reused and attempt == 0 and (resendable or time.monotonic() - sent_at < QUICK_CLOSE_S):
                continue
            raise Unanswered("backend closed the connection without answering") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"backend sent no response headers within {read_timeout_s:g}s") from exc
        except HTTPParseError as exc:
            raise UpstreamUnavailable(f"backend sent an invalid HTTP response: {exc}") from exc
        except OSError as exc:  # a reset after part of the head, or a failure that is no close
            raise UpstreamUnavailable(f"backend connection failed: {exc.strerror or exc}") from exc
    raise UpstreamUnavailable("backend closed the connection without answering")  # pragma: no cover


def refuses_connections(host: str, port: int, timeout_s: float, settle_s: float = 0.15) -> bool:
    """True when the backend refuses (or cannot take) a new connection: it is down.

    A server being killed may still complete a handshake from its dying listen queue and
    reset it a moment later, so a connection that succeeds is watched for ``settle_s``:
    a reset or EOF in that time counts as down too. (Only on the rare path after a backend
    hung up without answering.)
    """
    try:
        sock = connect(host, port, timeout_s)
    except OSError:
        return True
    try:
        sock.settimeout(settle_s)
        return bool(sock.recv(1) == b"")
    except TimeoutError:
        return False
    except OSError:
        return True
    finally:
        _close(sock)


def read_some(resp: HTTPSocketPoolResponse) -> bytes:
    """The body bytes that have arrived (waiting for at least one); b"" at the clean end."""
    buf = resp._body_buffer
    try:
        while not buf:
            if resp.message_complete:
                return b""
            sock = resp._sock
            if sock is None:
                raise UpstreamBroken("backend connection closed in the middle of the response")
            data = sock.recv(BLOCK)
            resp.feed(data)
            if not data and not resp.message_complete:
                raise UpstreamBroken("backend closed the connection in the middle of the response")
    except TimeoutError as exc:
        resp.release()
        raise UpstreamTimeout("backend went silent in the middle of the response") from exc
    except HTTPParseError as exc:
        resp.release()
        raise UpstreamBroken(f"backend sent an invalid response body: {exc}") from exc
    except OSError as exc:
        resp.release()
        raise UpstreamBroken(f"backend connection failed mid-response: {exc.strerror or exc}") from exc
    out = bytes(buf)
    del buf[:]
    return out


def body_ready(resp: HTTPSocketPoolResponse) -> bool:
    """Whether ``read_some`` would answer without waiting (body bytes buffered, or the end)."""
    return bool(resp._body_buffer) or bool(resp.message_complete)


def response_headers(resp: HTTPSocketPoolResponse) -> list[tuple[str, str]]:
    return [(str(name), str(value)) for name, value in resp.items()]


def probe(host: str, port: int, path: str, timeout_s: float) -> tuple[bool, str]:
    """One active health check on a fresh connection: (good, reason)."""
    try:
        with gevent.Timeout(timeout_s, TimeoutError):
            sock = connect(host, port, timeout_s)
            try:
                sock.sendall(encode_request("GET", path, [("Host", f"{host}:{port}"), ("Connection", "close"),
                                                          ("User-Agent", "ntonix-health")], b""))
                from geventhttpclient.response import HTTPSocketResponse

                resp = HTTPSocketResponse(sock, method="GET")
                code = resp.status_code
                resp.release()
            finally:
                _close(sock)
    except TimeoutError:
        return False, f"probe timed out after {timeout_s:g}s"
    except (OSError, HTTPParseError, HTTPConnectionClosed) as exc:
        return False, f"probe failed: {exc}"
    if code == 200:
        return True, "probe ok"
    return False, f"probe answered {code}"


MAX_MODELS_BYTES = 1 << 20  # a model list longer than this is not one we take


def fetch_models(host: str, port: int, timeout_s: float) -> tuple[int, bytes] | None:
    """``GET /v1/models`` on a fresh connection, without any client's credentials:
    (status, body), or None when the backend could not be reached or gave no answer."""
    try:
        with gevent.Timeout(timeout_s, TimeoutError):
            sock = connect(host, port, timeout_s)
            try:
                sock.sendall(encode_request("GET", "/v1/models", [
                    ("Host", f"{host}:{port}"), ("Connection", "close"), ("Accept", "application/json"),
                    ("User-Agent", "ntonix-models")], b""))
                from geventhttpclient.response import HTTPSocketResponse

                resp = HTTPSocketResponse(sock, method="GET")
                code = resp.status_code
                body = resp.read(MAX_MODELS_BYTES + 1) if code == 200 else b""
                resp.release()
            finally:
                _close(sock)
    except (TimeoutError, OSError, HTTPConnectionClosed):  # (HTTPConnectionClosed is an HTTPParseError)
        return None
    except HTTPParseError:
        return 0, b""  # it answered, with something that is not HTTP: garbage, serves any model
    if len(body) > MAX_MODELS_BYTES:
        return code, b""  # not a list we take: serves any model
    return code, bytes(body)


class GeventTransport:
    """The real ``ntonix.upstream.base.Transport``: this module's functions, bound once as
    instance attributes, so a call through the seam costs what a call of the module function
    did (one attribute lookup), and the module stays the one place that talks to backends."""

    def __init__(self) -> None:
        self.pool = Pool
        self.send = send
        self.read_some = read_some
        self.body_ready = body_ready
        self.response_headers = response_headers
        self.refuses_connections = refuses_connections

    def __repr__(self) -> str:
        return "<GeventTransport>"
