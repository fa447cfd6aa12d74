"""A scripted ``Transport`` for tests of the request flow: backends as lists of replies.

After httpcore's ``_backends/mock.py``, one level up: instead of scripting bytes, each backend
(``"host:port"``) gets the replies it will give, in order, each with its status, headers and
body pieces and, optionally, the way it fails::

    transport = ScriptedTransport()
    transport.script("127.0.0.1:9001", Reply(fail="refuse"))
    transport.script("127.0.0.1:9002", Reply(200, chunks=[b'{"ok":', b"true}"]))

Failures, at each step of an exchange (the outcomes the real transport translates to):

- ``refuse``: the connection is refused (``SendFailed``: the request never left);
- ``reset``: the backend took the request and hung up before any response byte (``Unanswered``);
  it stays up, so ``refuses_connections`` is False;
- ``die``: the same, and the backend is down from then on: it refuses connections (it died
  holding the request);
- ``timeout``: no response head within the read timeout (``UpstreamTimeout``);
- ``cut``: the body breaks off after ``after`` pieces (``UpstreamBroken``);
- ``stall``: the body goes silent after ``after`` pieces (``UpstreamTimeout``).

``trickle=True`` makes each piece arrive on its own (``body_ready`` is False before it), as a
stream's tokens do; otherwise the whole body is there with the head.

What the flow did is recorded: every ``send`` as an ``Exchange`` in ``transport.exchanges``,
and on each response whether and how it was released (``"pool"``: read to its end, the
connection goes back to the pool; ``"closed"``: discarded) and how often ``release`` was called.
No I/O, no clock, no greenlets: each test runs in microseconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from ntonix.errors import UpstreamTimeout
from ntonix.upstream.base import PoolBusy, SendFailed, Unanswered, UpstreamBroken

FAILURES = ("", "refuse", "busy", "reset", "die", "timeout", "cut", "stall")


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer. ``sized``: a ``Content-Length`` from the pieces (else an unsized,
    chunked or SSE, body). ``after``: pieces delivered before a ``cut`` or ``stall``."""

    status: int = 200
    chunks: Sequence[bytes] = (b'{"ok":true}',)
    headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json"),)
    sized: bool = True
    fail: str = ""
    after: int = 0
    trickle: bool = False

    def __post_init__(self) -> None:
        if self.fail not in FAILURES:
            raise ValueError(f"fail: one of {FAILURES}, got {self.fail!r}")


class FakePool:
    """The pool of one scripted backend: counts what is out and whether it was closed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.active = 0  # responses not yet released
        self.closed = False

    def __repr__(self) -> str:
        return f"<FakePool {self.address} active={self.active}{' closed' if self.closed else ''}>"

    def close(self) -> None:
        self.closed = True

    def expire_idle(self) -> None:
        """Nothing is kept idle here."""


class FakeResponse:
    """A scripted response whose head is in; its body is read through ``ScriptedTransport``."""

    def __init__(self, pool: FakePool, reply: Reply) -> None:
        self.pool, self.reply = pool, reply
        self.status_code = reply.status
        self.content_length: int | None = sum(map(len, reply.chunks)) if reply.sized else None
        self.headers = list(reply.headers)
        if self.content_length is not None:
            self.headers.append(("Content-Length", str(self.content_length)))
        else:
            self.headers.append(("Transfer-Encoding", "chunked"))
        self.pending = deque(reply.chunks)
        self.delivered = 0
        self.complete = not self.pending and not reply.fail  # the whole body was read
        self.released = ""  # "", "pool" or "closed"
        self.release_calls = 0

    def __repr__(self) -> str:
        return (f"<FakeResponse {self.pool.address} {self.status_code} delivered={self.delivered} "
                f"released={self.released or 'no'}>")

    def release(self) -> None:
        self.release_calls += 1
        if not self.released:
            self.released = "pool" if self.complete else "closed"
            self.pool.active -= 1


@dataclass(slots=True)
class Exchange:
    """One ``send``: where, what, the scripted reply and the response (None when none came)."""

    address: str
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    reply: Reply
    response: FakeResponse | None = None

    @property
    def reached(self) -> bool:
        """Whether the backend received the request (it was not refused)."""
        return self.reply.fail != "refuse"


@dataclass(slots=True)
class ScriptedTransport:
    """A ``ntonix.upstream.base.Transport`` that answers from scripts and records what it saw."""

    scripts: dict[str, deque[Reply]] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)  # backends that refuse connections
    pools: dict[str, FakePool] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)  # refuses_connections calls, by address

    def script(self, address: str, *replies: Reply) -> ScriptedTransport:
        self.scripts.setdefault(address, deque()).extend(replies)
        return self

    def to(self, address: str) -> list[Exchange]:
        """The requests that reached ``address``."""
        return [e for e in self.exchanges if e.address == address and e.reached]

    def responses(self) -> list[FakeResponse]:
        return [e.response for e in self.exchanges if e.response is not None]

    # ------------------------------------------------------------------ Transport
    def pool(self, host: str, port: int, *, size: int, max_size: int, idle_timeout_s: float,
             connect_timeout_s: float) -> FakePool:
        pool = FakePool(host, port)
        self.pools[pool.address] = pool
        return pool

    def send(self, pool: FakePool, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes,
             read_timeout_s: float) -> FakeResponse:
        address = pool.address
        if pool.closed:
            raise PoolBusy("backend removed")
        if address in self.down:
            self.exchanges.append(Exchange(address, method, target, list(headers), body, Reply(fail="refuse")))
            raise SendFailed("connect failed: Connection refused")
        queue = self.scripts.get(address)
        if not queue:
            raise AssertionError(f"no reply scripted for {method} {target} to {address}")
        reply = queue.popleft()
        exchange = Exchange(address, method, target, list(headers), body, reply)
        self.exchanges.append(exchange)
        if reply.fail == "refuse":
            raise SendFailed("connect failed: Connection refused")
        if reply.fail == "busy":
            raise PoolBusy("all 1 connections to the backend are busy")
        if reply.fail in ("reset", "die"):
            if reply.fail == "die":
                self.down.add(address)
            raise Unanswered("backend closed the connection without answering")
        if reply.fail == "timeout":
            raise UpstreamTimeout(f"backend sent no response headers within {read_timeout_s:g}s")
        pool.active += 1
        exchange.response = resp = FakeResponse(pool, reply)
        return resp

    def read_some(self, resp: FakeResponse) -> bytes:
        reply = resp.reply
        if reply.fail in ("cut", "stall") and resp.delivered >= reply.after:
            resp.release()
            if reply.fail == "cut":
                raise UpstreamBroken("backend closed the connection in the middle of the response")
            raise UpstreamTimeout("backend went silent in the middle of the response")
        if not resp.pending:
            return b""
        chunk = resp.pending.popleft()
        resp.delivered += 1
        if not resp.pending and not reply.fail:
            resp.complete = True
        return chunk

    def body_ready(self, resp: FakeResponse) -> bool:
        return not resp.reply.trickle or resp.complete

    def response_headers(self, resp: FakeResponse) -> list[tuple[str, str]]:
        return list(resp.headers)

    def refuses_connections(self, host: str, port: int, timeout_s: float) -> bool:
        address = f"{host}:{port}"
        self.probes.append(address)
        return address in self.down
