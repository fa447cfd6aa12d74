"""The request flow's ``Host`` (``ntonix/gateway/host.py``) as gunicorn's worker provides it.

gunicorn puts the client socket in the environ (``gunicorn.socket``) and binds the
``start_response`` it passes to its ``Response``, which can force the connection to close
after the answer (``force_close``). Knowing that is this module's job, not the flow's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gunicorn.http.errors import ChunkMissingTerminator, NoMoreData, ParseException

from ntonix.errors import IncompleteBody

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment


class GunicornHost:
    def read_body(self, environ: WSGIEnvironment, timeout_s: float, read: Callable[[WSGIEnvironment, int], bytes],
                  limit: int) -> bytes:
        """The socket's own timeout bounds each read; it costs nothing unless a read has to
        wait (a ``gevent.Timeout`` per request showed in the profile)."""
        sock = environ.get("gunicorn.socket")
        try:
            if sock is None:
                return read(environ, limit)
            sock.settimeout(timeout_s)
            try:
                return read(environ, limit)
            finally:
                sock.settimeout(None)
        except NoMoreData:
            # The client closed (or half-closed) inside a chunked body: gunicorn's error is an
            # OSError, which ended the connection without a word; a short Content-Length body
            # gets this 400 too.
            raise IncompleteBody("request body ended before its last chunk (Transfer-Encoding: chunked)") from None
        except ChunkMissingTerminator as exc:
            if not exc.term:  # the last chunk's line, then the end: no empty line came
                raise IncompleteBody("request body ended before its last chunk (Transfer-Encoding: chunked)") from None
            raise IncompleteBody(f"malformed chunked request body: {exc}") from None
        except ParseException as exc:  # a chunk size or extension, a trailer line, too many trailers
            raise IncompleteBody(f"malformed chunked request body: {exc}") from None

    def close_after(self, start_response: StartResponse) -> None:
        force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
        if force_close is not None:
            force_close()

    def __repr__(self) -> str:
        return "<GunicornHost>"
