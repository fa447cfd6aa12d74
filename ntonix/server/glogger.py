"""gunicorn's ``logger_class``: its error log through our formatter (ntonix.telemetry.logs), its
access log off, and its built-in statsd in one datagram per request."""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger as _GLogger
from gunicorn.instrument.statsd import Statsd as _GStatsd

from ntonix.telemetry.logs import _MARK, level_of, make_handler


class GunicornLogger(_GStatsd):  # type: ignore[misc]  # gunicorn ships no types
    """gunicorn's logger: its error log through our formatter and destination, its access log
    off (ntonix writes its own), its built-in statsd on when ``metrics.statsd_host`` is set."""

    def __init__(self, cfg: Any) -> None:
        if cfg.statsd_host:
            super().__init__(cfg)
        else:  # gunicorn's Statsd would open (and leak) a socket it cannot connect
            _GLogger.__init__(self, cfg)
            self.prefix = ""
            self.sock: Any = None
            self.dogstatsd_tags = cfg.dogstatsd_tags

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from ntonix.config.handover import current  # the configuration the master validated

        try:
            lc = current().logging
        except Exception:  # noqa: BLE001 - keep gunicorn's own format rather than stop start-up here
            return
        try:
            handler = make_handler(lc)
        except OSError as exc:  # an unwritable logging.file: gunicorn's stderr handler stays
            self.error_log.error("logging.file_unusable: %s", exc)
            return
        handler._gunicorn = True  # type: ignore[attr-defined]  # gunicorn's next setup() replaces it
        for old in list(self.error_log.handlers):
            if getattr(old, "_gunicorn", False):
                self.error_log.removeHandler(old)
                if getattr(old, _MARK, False):
                    old.close()
        self.error_log.addHandler(handler)
        self.error_log.setLevel(level_of(lc))

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """gunicorn's statsd request figures (its access log stays off: ntonix writes its own),
        the same three as gunicorn's ``Statsd.access`` but in one datagram instead of three."""
        if self.sock is None:
            return
        status = resp.status
        if isinstance(status, bytes):
            status = status.decode("latin-1")
        code = int(str(status).split(None, 1)[0])
        p = self.prefix
        self._sock_send(f"{p}gunicorn.request.duration:{request_time.total_seconds() * 1000.0}|ms",
                        f"{p}gunicorn.requests:1|c|@1.0", f"{p}gunicorn.request.status.{code}:1|c|@1.0")

    def _sock_send(self, *lines: Any) -> None:
        """As gunicorn's, for one or more metrics in one datagram, and without its warning and
        traceback per failed send: on the connected UDP socket a statsd daemon that is down
        makes every other send fail (ECONNREFUSED). statsd is best effort."""
        if self.sock is None:
            return
        tags = f"|#{self.dogstatsd_tags}" if self.dogstatsd_tags else ""
        try:
            data = "\n".join((ln.decode("ascii") if isinstance(ln, bytes) else ln) + tags for ln in lines)
            self.sock.send(data.encode("ascii"))
        except (OSError, UnicodeError):
            pass
