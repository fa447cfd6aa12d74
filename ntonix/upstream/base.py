"""The seam between the request flow and the backends: what the flow may ask of a transport.

After httpcore's ``_backends/base.py``: the flow (``ntonix.gateway``) is handed a ``Transport``
by the composition root and never imports an implementation, so the same flow runs over the
real geventhttpclient transport (``ntonix.upstream.transport.GeventTransport``) in a worker and
over a scripted one (``ntonix.upstream.fake.ScriptedTransport``) in unit tests.

The protocol is exactly what the flow uses, no more. The outcomes of an exchange are the
exceptions below (and ``ntonix.errors.UpstreamTimeout``/``UpstreamUnavailable``): an
implementation translates its own failures into them, in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ntonix.errors import UpstreamUnavailable


class SendFailed(Exception):
    """The request did not reach the backend (refused, reset, pool full): try another one."""


class PoolBusy(SendFailed):
    """Every connection this worker may open to the backend (``pool.max_size``) stayed busy for
    ``proxy.connect_timeout_s``, or its pool was closed (removed on HUP): the gateway's own
    limit, no failure of the backend (its breaker is not told)."""


class Unanswered(UpstreamUnavailable):
    """The connection closed or reset after the request was sent, before any response byte."""


class UpstreamBroken(UpstreamUnavailable):
    """The backend closed or broke the connection in the middle of a response body."""


class UpstreamResponse(Protocol):
    """A backend's response whose head is in; the body is read through the transport."""

    @property
    def status_code(self) -> int: ...

    @property
    def content_length(self) -> int | None: ...

    def release(self) -> None:
        """Give the connection back: to the pool when the body was read to its end, else closed.
        May be called more than once."""


class Transport(Protocol):
    """HTTP/1.1 exchanges with backends, through one pool per backend."""

    def pool(self, host: str, port: int, *, size: int, max_size: int, idle_timeout_s: float,
             connect_timeout_s: float) -> Any:
        """A backend's pool (``Backend.pool``); it has ``close()``: no new requests, idle
        connections closed now, busy ones when they finish; and ``expire_idle()``: close the
        idle connections beyond ``size`` that waited longer than ``idle_timeout_s``."""

    def send(self, pool: Any, method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes,
             read_timeout_s: float) -> UpstreamResponse:
        """Send one request; return once the response head is in. Raises ``SendFailed`` (not
        sent: another backend may take it), ``Unanswered``, ``UpstreamTimeout`` or
        ``UpstreamUnavailable``."""

    def read_some(self, resp: Any) -> bytes:
        """The body bytes that have arrived (waiting for at least one); b"" at the clean end.
        Raises ``UpstreamBroken`` or ``UpstreamTimeout`` (the response is then released)."""

    def body_ready(self, resp: Any) -> bool:
        """Whether ``read_some`` would answer without waiting."""

    def response_headers(self, resp: Any) -> list[tuple[str, str]]:
        """The response's header fields, in order."""

    def refuses_connections(self, host: str, port: int, timeout_s: float) -> bool:
        """True when the backend refuses (or cannot take) a new connection: it is down."""
