"""One write for a response's headers and its first body bytes (gunicorn patch, worker only).

gunicorn's ``Response`` sends the status line and headers in one ``sendall`` and each body
piece in another, so a small proxied answer costs two syscalls and two loopback wake-ups
where one does. Here the headers wait and leave with the first body bytes (or at
``close()`` when there are none). An empty write still flushes them at once, so a
streaming app can send headers early with ``yield b""`` (docs/notes/stack.md §2).

Small writes use ``send`` instead of ``sendall``: gevent's ``sendall`` asks the kernel for
SO_SNDBUF on every call; ``send`` of a few KiB on a writable socket completes in one call.

``wsgi.errors``: gunicorn builds a ``WSGIErrorsWrapper`` for every request (``getLogger``
under logging's module lock, a walk over the error log's handlers: ~3 % of a cache hit's
samples); NTONIX never writes to it. One per worker finds the streams when written to instead.

The parser's "may this peer set forwarding headers?" is answered once per client address
(``peer_is_trusted_proxy``). A request's ``Connection`` is read as a list of options
(``should_close``).
"""

from __future__ import annotations

import io
import time
from typing import Any

from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.http.message import HeaderPolicy, Message
from gunicorn.http.wsgi import Response

from ntonix.upstream.transport import send_all


def _send_headers(self: Any) -> None:
    if self.headers_sent:
        return
    tosend = self.default_headers()
    tosend.extend([f"{k}: {v}\r\n" for k, v in self.headers])
    self._ntonix_head = ("".join(tosend) + "\r\n").encode("latin-1")
    self.headers_sent = True


def _flush_head(self: Any, data: bytes = b"") -> None:
    head = getattr(self, "_ntonix_head", None)
    if head is not None:
        self._ntonix_head = None
        data = head + data
    if data:
        send_all(self.sock, data)


def _emit_body(self: Any, data: bytes) -> None:
    if self.chunked:
        data = b"%X\r\n%b\r\n" % (len(data), data)
    _flush_head(self, data)


_original_write = Response.write


def _write(self: Any, arg: bytes) -> None:
    if not arg:
        self.send_headers()
        _flush_head(self)  # ``yield b""``: headers now
        return
    _original_write(self, arg)


def _close(self: Any) -> None:
    if not self.headers_sent:
        self.send_headers()
    _flush_head(self, b"0\r\n\r\n" if self.chunked else b"")


_date_cache: tuple[int, str] = (0, "")


def http_date(timestamp: float | None = None) -> str:
    """gunicorn formats the Date header with email.utils on every response; once a second will do."""
    global _date_cache
    if timestamp is not None:
        return str(_original_http_date(timestamp))
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, str(_original_http_date(now)))
    return _date_cache[1]


_original_http_date = util.http_date
_original_errors = wsgi.WSGIErrorsWrapper


class SharedErrors(io.RawIOBase):
    """``wsgi.errors`` of every request of a worker: gunicorn's wrapper, made when written to."""

    def __init__(self, cfg: Any) -> None:
        self._cfg = cfg

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        _original_errors(self._cfg).write(data)
        return len(data)


_errors: tuple[Any, SharedErrors | None] = (None, None)


def errors_wrapper(cfg: Any) -> SharedErrors:
    """gunicorn's ``WSGIErrorsWrapper(cfg)``, one per configuration object (a worker has one)."""
    global _errors
    seen, shared = _errors
    if seen is not cfg or shared is None:
        shared = SharedErrors(cfg)
        _errors = (cfg, shared)
    return shared


_original_peer_trusted = HeaderPolicy._peer_is_trusted_proxy
_trusted_peers: dict[str, bool] = {}
_TRUSTED_PEERS_MAX = 4096  # distinct client addresses remembered; past this, all are forgotten


def peer_is_trusted_proxy(self: Any) -> bool:
    """gunicorn's ``HeaderPolicy._peer_is_trusted_proxy``, remembered per peer address.

    gunicorn asks it for every request (may this peer set forwarding headers?), parsing the
    address with ``ipaddress`` and testing it against ``forwarded_allow_ips`` each time: ~7 %
    of a cache hit's samples (py-spy). A worker's ``forwarded_allow_ips`` is fixed (a change
    starts new workers), so the answer for an address never changes in it."""
    peer = self.peer_addr
    if not isinstance(peer, tuple):
        return bool(_original_peer_trusted(self))
    known = _trusted_peers.get(peer[0])
    if known is None:
        if len(_trusted_peers) >= _TRUSTED_PEERS_MAX:
            _trusted_peers.clear()
        known = _trusted_peers[peer[0]] = bool(_original_peer_trusted(self))
    return known


def should_close(self: Any) -> bool:
    """gunicorn's ``Message.should_close`` with ``Connection`` read as the list of options it
    is (RFC 9110 §7.6.1): ``close, X-Foo`` closes too (gunicorn compared the whole value with
    ``close``, so the connection stayed open); ``close`` wins over ``keep-alive``."""
    if self.must_close or getattr(self, "method", None) == "CONNECT":
        return True
    tokens: set[str] = set()
    for name, value in self.headers:
        if name == "CONNECTION":
            tokens.update(t.strip(" \t").lower() for t in value.split(","))
    if "close" in tokens:
        return True
    if "keep-alive" in tokens:
        return False
    return bool(self.version <= (1, 0))


def install() -> None:
    """Patch gunicorn's Response in this (worker) process."""
    Message.should_close = should_close
    HeaderPolicy._peer_is_trusted_proxy = peer_is_trusted_proxy
    util.http_date = http_date
    wsgi.WSGIErrorsWrapper = errors_wrapper
    Response.send_headers = _send_headers
    Response._emit_body = _emit_body
    Response.write = _write
    Response.close = _close
