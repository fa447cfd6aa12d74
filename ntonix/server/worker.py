"""Our gunicorn worker: gevent, HTTPS beside HTTP, JSON errors, in-place reload, quick drain.

Theory of operation (docs/adr/0002-tls-listener.md, 0004-reload-and-shutdown.md)
--------------------------------------------------------------------------------
* gunicorn applies its TLS settings to every bind (docs/notes/stack.md §1), so this worker builds
  the ``SSLContext`` itself (``ntonix.server.tls``) and gives it only to the listener on
  ``server.ssl_port``. The handshake happens in the connection's greenlet under
  ``ssl.handshake_timeout_s``; a failed one is logged in one line and touches nothing else.
* Requests that came over TLS get ``wsgi.url_scheme = https``.
* gunicorn answers malformed HTTP with an HTML page; we answer the same statuses as JSON in
  the OpenAI error shape.
* SIGHUP (sent by the master after it validated a new configuration) rebuilds the backend
  list, logging and certificates in place: no worker restarts, nothing in flight is touched.
* SIGTERM: stop accepting, close idle keep-alive connections at once (gunicorn's gevent
  worker would wait for them, #3227), let in-flight requests and streams finish, and exit as
  soon as the last one has, or at ``server.graceful_timeout_s``.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import signal
import socket as _stdsocket
import ssl
import time
from datetime import timedelta
from functools import partial
from typing import Any

import gevent
import gevent.lock
import gevent.select
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import SERVER, util
from gunicorn.config import PreRequest
from gunicorn.http.body import LengthReader
from gunicorn.workers.ggevent import GeventWorker

from ntonix.config import ConfigError, handover
from ntonix.core.cache_key import CACHEABLE_PATHS
from ntonix.core.headers import new_request_id
from ntonix.errors import error_body, status_line
from ntonix.server import response
from ntonix.server.settings import KILL_MARGIN_S
from ntonix.server.tls import build_server_context
from ntonix.telemetry.logs import ACCESS, setup_logging
from ntonix.upstream.prober import Prober
from ntonix.upstream.transport import send_all

log = logging.getLogger("ntonix.worker")


def _write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    line = status_line(status_int, reason)  # gunicorn passes "Bad Request" with its 501
    kind = "invalid_request_error" if status_int < 500 else "server_error"
    body = error_body(mesg or line.partition(" ")[2], kind, status_int)
    # Every response carries X-Request-ID (INTERFACE.md); the request was unreadable, so a new one.
    head = (f"HTTP/1.1 {line}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {new_request_id()}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


def _patch_gunicorn() -> None:
    """Our error bodies and response writing, in the worker process only (not at import)."""
    # gunicorn's handle_error calls util.write_error for malformed requests (400/413/431/...).
    util.write_error = _write_json_error
    response.install()


class FrozenConfig:
    """gunicorn's ``Config`` with every setting read once.

    gunicorn reads about 25 settings per request (``cfg.keepalive``, ``cfg.is_ssl``, the
    parser's limits, the hooks...) and each read goes through ``Config.__getattr__`` (a dict
    lookup and a method call: 1–2 % of a worker's samples). A worker's settings never change
    after the fork (a HUP to the master starts new workers for gunicorn's own settings; NTONIX's
    reload does not touch them), so the values can be plain attributes. Anything else (methods,
    other properties) is the real configuration's.
    """

    def __init__(self, cfg: Any) -> None:
        self.__dict__["_cfg"] = cfg
        for name in (*cfg.settings, "is_ssl", "sendfile"):
            self.__dict__[name] = getattr(cfg, name)  # properties such as worker_class included
        if self.__dict__.get("pre_request") is PreRequest.default:
            # gunicorn's default hook logs "METHOD /path" at debug level on every request, through
            # its statsd logger's log() and logging's Logger.log even when debug is off (~3 % of a
            # cache hit's samples, py-spy): ask the level first.
            self.__dict__["pre_request"] = _pre_request_at_debug

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_cfg"], name)


def _pre_request_at_debug(worker: Any, req: Any) -> None:
    if worker.log.error_log.isEnabledFor(logging.DEBUG):
        PreRequest.default(worker, req)


class NtonixWorker(GeventWorker):  # type: ignore[misc]
    cfg: Any  # gunicorn's Config, a FrozenConfig once run() starts
    alive: bool  # gunicorn's Worker attributes the hit fast path reads or sets
    nr: int
    max_requests: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: dict[Any, bool] = {}  # client socket -> a request is in progress
        self._tls_ports: set[int] = set()
        self._tls_servers: list[StreamServer] = []
        self._prober: Prober | None = None
        # gunicorn strips a SCRIPT_NAME from the path it gives the app: the fast path does not.
        self._script_name = os.environ.get("SCRIPT_NAME", "")
        self._fast_hits = False  # set by run()

    def init_process(self) -> None:
        _patch_gunicorn()
        super().init_process()  # monkey-patches, then runs until the worker exits

    # ------------------------------------------------------------------ signals
    def init_signals(self) -> None:
        super().init_signals()
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_hup(self, sig: int, frame: Any) -> None:
        gevent.spawn(self.reload)

    def reload(self) -> None:
        try:
            cfg = handover.current()
            setup_logging(cfg.logging)
            if self._tls_servers and cfg.server.ssl_port:
                try:  # the master checked them, but the files may have changed since
                    ctx = build_server_context(cfg.ssl)
                except ConfigError as exc:  # the old certificates keep serving; backends still reload
                    log.error("tls.reload_failed", extra={"error": str(exc)})
                else:
                    for server in self._tls_servers:
                        server.wrap_socket = ctx.wrap_socket
                        if self.alive and not server.started:  # tls.context_failed at boot
                            server.start()
            self.wsgi.rt.reload(cfg)
            if self._prober is not None:
                self._prober.discover_soon()  # new backends, or lists no longer configured
        except Exception:  # noqa: BLE001 - a bad reload must never take the worker down
            log.exception("config.reload_failed")

    # ------------------------------------------------------------------ serving
    def run(self) -> None:
        self.cfg = FrozenConfig(self.cfg)
        cfg = self.wsgi.rt.config
        # The cache-hit fast path answers from L1 only; the cache's settings need a restart.
        self._fast_hits = cfg.cache.enabled and cfg.cache.memory_max_mb > 0 and not self._script_name
        # Everything built so far lives as long as the worker: keep it out of the collector's
        # sight, and collect the young generation less often (each request allocates a few
        # hundred objects; default thresholds ran a collection every ~3 requests).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        if cfg.server.ssl_port:
            self._tls_ports = {cfg.server.ssl_port}
        servers: list[StreamServer] = []
        for s in self.sockets:
            s.setblocking(1)
            pool = Pool(self.worker_connections)
            handler = partial(self.handle, s)
            port = s.getsockname()[1]
            ready = True
            if port in self._tls_ports:
                try:  # the master checked the files, but they may have changed since (no HUP yet)
                    ctx = build_server_context(cfg.ssl)
                except ConfigError as exc:
                    # Accept no TLS connections in this worker (the others still do) until a HUP
                    # brings files that load; crashing would only make gunicorn respawn us in a loop.
                    log.error("tls.context_failed", extra={"error": str(exc)})
                    ctx, ready = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), False
                server = StreamServer(s, handle=handler, spawn=pool, ssl_context=ctx, server_side=True,
                                      do_handshake_on_connect=False)
                self._tls_servers.append(server)
            else:
                server = StreamServer(s, handle=handler, spawn=pool)
            if self.cfg.workers > 1:
                server.max_accept = 1
            if ready:
                server.start()
            servers.append(server)
        rt = self.wsgi.rt
        self._prober = Prober(rt.registry, lambda: rt.config.health, rt.probe_result, rt.models_result)
        self._prober.start()
        rt.start(gevent.spawn, defer=gevent.get_hub().loop.run_callback, lock=gevent.lock.RLock)

        while self.alive:
            self.notify()
            self.wsgi.rt.telemetry.tick()  # this worker's RSS for /metrics, every few seconds
            self.wsgi.rt.tick()  # free the routing slots of dead workers, every few seconds
            gevent.sleep(0.2)
        self._drain(servers)
        rt.close()
        ACCESS.flush()

    def _drain(self, servers: list[StreamServer]) -> None:
        for server in servers:
            server.close()
        if self._prober is not None:
            self._prober.stop()
        # server.graceful_timeout_s (rounded up): the master kills us KILL_MARGIN_S after that.
        deadline = time.monotonic() + max(0.0, self.cfg.graceful_timeout - KILL_MARGIN_S)
        while time.monotonic() < deadline:
            self._close_idle()
            # Connections, and answers a leader finishes for coalesced followers in the background.
            if all(server.pool.free_count() == server.pool.size for server in servers) and not self.wsgi.rt.background:
                return
            self.notify()
            ACCESS.flush_if_due()  # requests that finish during the drain are logged as they end
            gevent.sleep(0.05)
        log.warning("worker.graceful_timeout", extra={"pid": self.pid, "open_connections": len(self._conns)})
        for server in servers:
            server.stop(timeout=0.5)

    def _close_idle(self) -> None:
        """Shut down keep-alive connections that wait for a next request that is not coming."""
        for client, busy in list(self._conns.items()):
            if busy:
                continue
            try:
                fd = client.fileno()
                if fd < 0:
                    continue
                readable, _, _ = gevent.select.select([client], [], [], 0)
                if readable:
                    continue  # a request is arriving: let it be served
                # An OS-level shutdown; gevent's own would log an EBADF traceback (docs/notes/stack.md §1).
                dup = _stdsocket.socket(fileno=os.dup(fd))
                try:
                    dup.shutdown(_stdsocket.SHUT_RDWR)
                finally:
                    dup.close()
            except OSError:
                pass

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self._conns[client] = False
        telemetry = self.wsgi.rt.telemetry
        telemetry.connection_opened()
        try:
            if isinstance(client, ssl.SSLSocket) and not self._handshake(client, addr):
                return
            super().handle(listener, client, addr)
        finally:
            self._conns.pop(client, None)
            telemetry.connection_closed()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: Any) -> None:
        self.wsgi.rt.telemetry.protocol_error()  # answered by gunicorn, never reached the app's counters
        super().handle_error(req, client, addr, exc)

    def _handshake(self, client: Any, addr: Any) -> bool:
        timeout = self.wsgi.rt.config.ssl.handshake_timeout_s
        try:
            with gevent.Timeout(timeout):
                client.do_handshake()
            return True
        except gevent.Timeout:
            reason = f"no handshake within {timeout:g}s"
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
        except OSError as exc:
            reason = exc.strerror or str(exc)
        log.info("tls.handshake_failed", extra={"client": addr[0] if addr else "", "reason": reason})
        util.close(client)
        return False

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        tls = isinstance(listener_name, tuple) and listener_name[1] in self._tls_ports
        if tls:
            req.scheme = "https"
        self._conns[sock] = True
        try:
            if tls or not self._answer_hit(req, sock, addr):
                result: bool = super().handle_request(listener_name, req, sock, addr)
            else:
                result = True
        finally:
            self._conns[sock] = False
        if not self.alive:
            raise StopIteration  # shutting down: no more keep-alive on this connection
        # gunicorn's keep-alive loop parses a pipelined or already-arrived next request without
        # yielding, so under saturation a few busy connections are served back to back while
        # others wait seconds. One yield per request puts this connection at the back of the queue
        # (none when it is the worker's only connection: nobody to let ahead, and the yield's turn
        # of the event loop would only delay its next request).
        if len(self._conns) < 2:
            return result
        try:
            gevent.sleep(0)
        except gevent.GreenletExit:
            # The disconnect watcher's ClientGone (ntonix/server/disconnect.py), sent just as the
            # answer finished, lands here, past gunicorn's own catch: without this it logged
            # "Error handling request" and wrote a 500 to the gone client (27 times as wrk closed
            # its 500 connections at the end of a run).
            raise StopIteration from None
        return result

    # ------------------------------------------------------------------ cache-hit fast path
    def _answer_hit(self, req: Any, sock: Any, addr: Any) -> bool:
        """Answer a plain cache hit from the request gunicorn parsed, before any WSGI environ,
        ``Response`` or app call exists (issue #14: most of a hit's cost was that machinery);
        ``False`` when this is not one, and the request goes the usual way unchanged.

        Only a POST to a cacheable path whose whole body (by ``Content-Length``, within
        ``proxy.max_body_bytes``) has already arrived with its headers is looked at: reading
        it then never waits, so no body timeout, 413 or 408 arises here. Anything unusual
        (``Expect: 100-continue``, the PROXY protocol, a ``SCRIPT_NAME``, chunked bodies, a query
        string, which is part of the key) is left to gunicorn. The gateway decides with the same
        key, policy and accounting as its WSGI path (``Proxy.cached_hit``); the bytes written are
        those gunicorn's ``Response`` would write for ``Proxy._replay``'s answer
        (tests/integration/test_hit_fast_path.py).
        """
        if (not self._fast_hits or req.method != "POST" or req.path not in CACHEABLE_PATHS or req.query
                or req._expected_100_continue or req.proxy_protocol_info):
            return False
        incoming = req.body
        reader = incoming.reader
        if type(reader) is not LengthReader:
            return False
        length = reader.length
        if not 0 < length <= self.wsgi.rt.config.proxy.max_body_bytes or reader.unreader.buf.seek(0, 2) < length:
            return False
        headers: dict[str, str] = {}
        for name, value in req.headers:  # as gunicorn's wsgi.create maps them into the environ
            if name in _NOT_HTTP_ITEMS:
                if name == "SCRIPT_NAME":
                    return False
                continue
            key = "HTTP_" + name.replace("-", "_")
            seen = headers.get(key)
            headers[key] = value if seen is None else f"{seen},{value}"
        started = time.monotonic()
        body = incoming.read(length)
        client = addr if isinstance(addr, str) else addr.decode() if isinstance(addr, bytes) else addr[0]
        hit = self.wsgi.cached_hit("POST", req.path, headers, body, client)
        if hit is None:
            req.body = _ReadBody(body)  # the WSGI path reads it again (wsgi.input)
            return False
        try:
            self.cfg.pre_request(self, req)
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            close = not self.alive or not self.cfg.keepalive or req.should_close()
            version = req.version
            send_all(sock, b"".join((
                (f"HTTP/{version[0]}.{version[1]} {hit.status}\r\nServer: {SERVER}\r\n"
                 f"Date: {response.http_date()}\r\nConnection: {'close' if close else 'keep-alive'}\r\n"
                 ).encode("latin-1"),
                hit.head, b"X-Request-ID: ", hit.rec.request_id.encode("latin-1"), b"\r\nX-Cache: HIT\r\n\r\n",
                hit.body)))
        except (gevent.GreenletExit, SystemExit):
            return True  # as gunicorn's gevent worker: the connection's greenlet is being stopped
        finally:
            self.wsgi.finished(hit.rec)
            if getattr(self.log, "sock", None) is not None:  # gunicorn's own statsd figures
                self.log.access(_Sent(hit.status), req, None, timedelta(seconds=time.monotonic() - started))
            self.cfg.post_request(self, req, None, None)
        if close:
            raise StopIteration()  # as gunicorn's handle_request: the keep-alive loop ends
        return True


# gunicorn's wsgi.create puts these request headers somewhere other than an HTTP_* item.
_NOT_HTTP_ITEMS = frozenset({"CONTENT-TYPE", "CONTENT-LENGTH", "SCRIPT_NAME"})


class _Sent:
    """What the logger's ``access`` reads of a response: its status line."""

    __slots__ = ("status",)

    def __init__(self, status: str) -> None:
        self.status = status


class _ReadBody(io.BytesIO):
    """``wsgi.input`` of a request whose body the hit fast path read already: the same bytes,
    and reading all of them at once returns that very object (the gateway recognises the
    request it probed by it, ``Proxy.handle``)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._data = data

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() == 0 and (size is None or size < 0 or size >= len(self._data)):
            self.seek(0, io.SEEK_END)
            return self._data
        return super().read(size)
