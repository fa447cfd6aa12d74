"""What the request flow needs of the server hosting it, and nothing about which server that is.

The flow sets a read timeout on the client connection while a request body arrives (nginx's
``client_body_timeout``), and asks the host to close the connection after an answer that left
the body unread (``NtonixError.closes_connection``). Both depend on the server: gunicorn's
worker provides ``ntonix.server.host.GunicornHost``, given to the ``Gateway`` by the
composition root; a plain WSGI server has neither, which ``PlainHost`` says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


class Host(Protocol):
    def read_timeout(self, environ: WSGIEnvironment, seconds: float | None) -> None:
        """Bound each read of the request's client connection (``None``: no bound)."""

    def close_after(self, start_response: StartResponse) -> None:
        """Close the client connection after the answer started with ``start_response``."""


class PlainHost:
    """A WSGI server without either: nothing to do."""

    def read_timeout(self, environ: WSGIEnvironment, seconds: float | None) -> None:
        pass

    def close_after(self, start_response: StartResponse) -> None:
        pass
