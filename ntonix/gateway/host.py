"""What the request flow needs of the server hosting it, and nothing about which server that is.

The flow has the host bound each read of the client connection while a request body arrives
(nginx's ``client_body_timeout``), and asks the host to close the connection after an answer that left
the body unread (``NtonixError.closes_connection``). Both depend on the server: gunicorn's
worker provides ``ntonix.server.host.GunicornHost``, given to the ``Gateway`` by the
composition root; a plain WSGI server has neither, which ``PlainHost`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


class Host(Protocol):
    def read_body(self, environ: WSGIEnvironment, timeout_s: float, read: Callable[[WSGIEnvironment, int], bytes],
                  limit: int) -> bytes:
        """``read(environ, limit)`` with each read of the client connection bounded by
        ``timeout_s`` (``TimeoutError`` past it). One call per request: the hot path."""

    def close_after(self, start_response: StartResponse) -> None:
        """Close the client connection after the answer started with ``start_response``."""


class PlainHost:
    """A WSGI server without either: nothing to do."""

    def read_body(self, environ: WSGIEnvironment, timeout_s: float, read: Callable[[WSGIEnvironment, int], bytes],
                  limit: int) -> bytes:
        return read(environ, limit)

    def close_after(self, start_response: StartResponse) -> None:
        pass
