"""Logging: one JSON object per line (python-json-logger + orjson) or plain text, for us and gunicorn.

Every line carries ``timestamp`` (UTC, ms), ``level``, ``component`` (the logger's name),
``pid``, ``message`` (a stable event name such as ``request.done``) and the call's
``extra={...}`` context. ``logging.format = "text"`` gives
``2026-01-02T03:04:05.678Z INFO ntonix.access request.done method=GET status=200 ...``.

``setup_logging`` configures the ``ntonix`` loggers (the access log ``ntonix.access``
included: it follows ``logging.level`` and is switched off by ``logging.access_log = false``),
gunicorn's error log and the root logger (third-party libraries) in a worker, again on
every reload. ``ntonix.server.glogger.GunicornLogger`` (gunicorn's ``logger_class``) does the same for the
master's own lines and keeps gunicorn's built-in statsd (``<prefix>.gunicorn.*``) when
``metrics.statsd_host`` is set.

Output goes to stderr, or with ``logging.file`` to that file, rotated at
``logging.max_bytes`` keeping ``logging.backup_count`` old files. The master and every
worker append to the same file, so rotation is coordinated (``SharedRotatingFileHandler``).

The access log (one ``request.done`` line per request) does not go through ``logging`` on the
request path: ``ACCESS`` builds the line itself (orjson, the same fields and order as the
formatter) and buffers it, as nginx's ``access_log ... buffer= flush=`` does. The worker
flushes it from its main loop every ``FLUSH_EVERY_S`` (``flush_if_due``), and at once when
``FLUSH_BYTES`` are waiting, on HUP (before the new destination is set up), when it stops
and at exit. A hard kill of a worker (SIGKILL, the kernel's OOM killer, a crash of the
interpreter itself) loses at most the lines of the last ``FLUSH_EVERY_S``: never more than
``FLUSH_BYTES``. See docs/configuration.md ("Logging").
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import logging.handlers
import os
import stat
import sys
import time
from itertools import islice
from typing import TYPE_CHECKING, Any

import orjson
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from ntonix.config import LoggingConfig

if TYPE_CHECKING:
    from ntonix.core.record import RequestRecord

# LogRecord attributes that are not context (extra=...) of a call.
_RESERVED = frozenset(RESERVED_ATTRS) | {"message", "asctime"}
_MARK = "_ntonix"  # set on handlers we installed, so a reconfiguration replaces only ours


def _timestamp(created: float) -> str:
    seconds, ms = divmod(round(created * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


class JsonFormatter(OrjsonFormatter):
    """``{"timestamp", "level", "component", "pid", "message", ...context}``, one line."""

    def __init__(self) -> None:
        super().__init__(reserved_attrs=sorted(_RESERVED))

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["timestamp"] = _timestamp(record.created)
        log_data["level"] = record.levelname.lower()
        log_data["component"] = record.name
        log_data["pid"] = record.process
        log_data["message"] = record.message
        log_data.update(message_dict)
        skip = self._skip_fields  # the context: whatever the call passed as extra={...}
        log_data.update((k, v) for k, v in record.__dict__.items() if k not in skip and k[:1] != "_")


class TextFormatter(logging.Formatter):
    """``<timestamp> LEVEL component message key=value ...`` for people reading a terminal."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - stdlib name
        return _timestamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = [(k, v) for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")]
        return base + "".join(f" {k}={v}" for k, v in extra if v is not None)


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")


class SharedRotatingFileHandler(logging.handlers.WatchedFileHandler):
    """Append to ``path``; rotate at ``max_bytes`` — safe with several processes writing.

    Each process appends (``O_APPEND``: whole lines, never interleaved). At most every
    ``check_every_s`` a process looks at the file: if another process rotated it, it reopens
    the new one (until then its lines still land in the rotated file, nothing is lost); if it
    reached ``max_bytes``, it rotates it under an ``flock`` on ``<path>.lock``, after checking
    that nobody else did already. So a file may grow past ``max_bytes`` by what is written in
    ``check_every_s``. ``max_bytes = 0`` never rotates; ``backup_count = 0`` rotates by
    emptying the file in place.
    """

    def __init__(self, path: str, max_bytes: int, backup_count: int, check_every_s: float = 0.25) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.check_every_s = check_every_s
        self._checked_at = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.check_every_s:
            logging.FileHandler.emit(self, record)  # the stat per line of WatchedFileHandler, skipped
            return
        self._checked_at = now
        super().emit(record)  # reopens first if the file was rotated by another process
        stream = self.stream
        if self.max_bytes > 0 and stream is not None:
            try:
                if os.fstat(stream.fileno()).st_size >= self.max_bytes:
                    self._rotate()
            except OSError:
                self.handleError(record)

    def _rotate(self) -> None:
        path = self.baseFilename
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    st: os.stat_result | None = os.stat(path)
                except FileNotFoundError:
                    st = None
                # Only the file this handler wrote to, and only if nobody rotated it meanwhile.
                if st is not None and (st.st_dev, st.st_ino) == (self.dev, self.ino) and st.st_size >= self.max_bytes:
                    if self.backup_count > 0:
                        for i in range(self.backup_count - 1, 0, -1):
                            if os.path.exists(f"{path}.{i}"):
                                os.replace(f"{path}.{i}", f"{path}.{i + 1}")
                        os.replace(path, f"{path}.1")
                    else:
                        os.truncate(path, 0)  # every writer appends (O_APPEND): they go on at 0
                self.reopenIfNeeded()  # under the lock: the new file exists before the next rotation
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def make_handler(cfg: LoggingConfig) -> logging.Handler:
    handler: logging.Handler
    if cfg.file:
        handler = SharedRotatingFileHandler(cfg.file, cfg.max_bytes, cfg.backup_count)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(cfg.format))
    setattr(handler, _MARK, True)
    return handler


def level_of(cfg: LoggingConfig) -> int:
    return int(getattr(logging, cfg.level.upper()))


def _replace_handlers(logger: logging.Logger, handler: logging.Handler, only_ours: bool) -> None:
    for old in list(logger.handlers):
        if only_ours and not getattr(old, _MARK, False):
            continue
        logger.removeHandler(old)
        if getattr(old, _MARK, False):
            old.close()
    logger.addHandler(handler)


FLUSH_EVERY_S = 0.2  # the worker's main loop ticks this often (ntonix/server/worker.py)
FLUSH_BYTES = 64 * 1024
PIPE_BUF = 4096  # a write to a pipe up to this size is never interleaved with another process's
# Strings of a request.done line that come from the client or a backend, cut to 512 characters
# when the line would reach PIPE_BUF, to 32 if it still would (escapes can make a character
# six bytes); the other fields are short and bounded.
# Not request_id (at most 128 characters, and cutting it would break the match with X-Request-ID).
_CUT_FIELDS = ("path", "client", "error", "model", "backend")
_CUT_TO = (512, 32)


class AccessLog:
    """The buffered access log of this process (module singleton ``ACCESS``)."""

    def __init__(self, clock: Any = time.time, monotonic: Any = time.monotonic) -> None:
        self.enabled = False
        self._json = True
        self._handler: logging.Handler | None = None
        self._lines: list[bytes] = []
        self._size = 0
        self._clock, self._monotonic = clock, monotonic
        self._flushed_at = monotonic()
        self._second = -1
        self._stamp = ""
        self._pid = os.getpid()

    def configure(self, cfg: LoggingConfig, handler: logging.Handler | None) -> None:
        """Flush to the old destination, then write to ``handler`` (None: access log off)."""
        self.flush()
        old, self._handler = self._handler, handler
        if old is not None and old is not handler:
            old.close()
        self.enabled = handler is not None and cfg.access_log and level_of(cfg) <= logging.INFO
        self._json = cfg.format == "json"
        self._pid = os.getpid()

    def after_fork(self) -> None:
        """In a new worker: lines buffered before the fork belong to the parent."""
        self._lines.clear()
        self._size = 0
        self._pid = os.getpid()

    def _timestamp(self, now: float) -> str:
        """As ``_timestamp``, with strftime once a second rather than once a line."""
        second, ms = divmod(round(now * 1000), 1000)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{ms:03d}Z"

    def request(self, rec: RequestRecord, ttft_ms: float | None) -> None:
        """Buffer the ``request.done`` line of a finished request."""
        ts = self._timestamp(self._clock())
        obj = {"timestamp": ts, "level": "info", "component": "ntonix.access", "pid": self._pid,
               "message": "request.done", "method": rec.method, "path": rec.path, "status": rec.status,
               "latency_ms": round(rec.latency_ms, 3), "ttft_ms": None if ttft_ms is None else round(ttft_ms, 3),
               "cache": rec.cache or None, "backend": rec.backend or None, "bytes_sent": rec.bytes_sent,
               "client": rec.client, "request_id": rec.request_id, "error": rec.error or None,
               "model": rec.model or None}
        usage = rec.usage
        obj["prompt_tokens"] = None if usage is None else usage.prompt
        obj["completion_tokens"] = None if usage is None else usage.completion
        obj["cached_tokens"] = None if usage is None else usage.cached_prompt
        line = self._render(ts, obj)
        for cut in _CUT_TO:
            if len(line) < PIPE_BUF:
                break
            # A line longer than a pipe write that cannot interleave (a 5,000-character path):
            # its long strings are cut, so every line stays whole beside other workers' lines.
            for name in _CUT_FIELDS:
                value = obj[name]
                if isinstance(value, str) and len(value) > cut:
                    obj[name] = value[:cut] + "..."
            line = self._render(ts, obj)
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= FLUSH_BYTES:
            self.flush()

    def _render(self, ts: str, obj: dict[str, Any]) -> bytes:
        if self._json:
            return orjson.dumps(obj)
        # The text formatter's shape: the five fixed fields, then key=value for the rest.
        return (f"{ts} INFO ntonix.access request.done"
                + "".join(f" {k}={v}" for k, v in islice(obj.items(), 5, None) if v is not None)).encode()

    def flush_if_due(self) -> None:
        """From the worker's main loop."""
        if self._lines and self._monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Write every buffered line: whole lines per write, at most PIPE_BUF bytes per write to a
        pipe or terminal (so workers sharing stderr never interleave), FLUSH_BYTES to a file."""
        self._flushed_at = self._monotonic()
        lines, handler = self._lines, self._handler
        if not lines or handler is None:
            return
        self._lines, self._size = [], 0
        limit = FLUSH_BYTES if _regular_file(handler) else PIPE_BUF
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) + 1 > limit:
                _write(handler, chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        _write(handler, chunk)


def _regular_file(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    try:
        return stream is not None and stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError):
        return False


def _write(handler: logging.Handler, chunk: list[bytes]) -> None:
    """One write of whole lines through ``handler`` (its own rotation and error handling)."""
    record = logging.LogRecord("ntonix.access", logging.INFO, "", 0, b"\n".join(chunk).decode(), None, None)
    handler.handle(record)


ACCESS = AccessLog()
os.register_at_fork(after_in_child=ACCESS.after_fork)
atexit.register(ACCESS.flush)


def make_access_handler(cfg: LoggingConfig) -> logging.Handler:
    """The access log's own handler: same destination as the others, lines written as built."""
    handler = make_handler(cfg)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def setup_logging(cfg: LoggingConfig, *, root: bool = True) -> None:
    """(Re)configure our loggers, gunicorn's error log and (``root``) third-party loggers."""
    # Neither format shows the caller's file/line or the thread: skip computing them for every
    # record (the logging HOWTO's "Optimization" section). Tracebacks are unaffected.
    logging._srcfile = None
    logging.logThreads = False
    level = level_of(cfg)
    handler = make_handler(cfg)
    for name in ("ntonix", "gunicorn.error"):
        logger = logging.getLogger(name)
        _replace_handlers(logger, handler, only_ours=False)
        logger.setLevel(level)
        logger.propagate = False
    if root:
        root_logger = logging.getLogger()
        _replace_handlers(root_logger, handler, only_ours=True)
        root_logger.setLevel(level)
    access = logging.getLogger("ntonix.access")
    access.disabled = not cfg.access_log
    access.setLevel(logging.NOTSET)  # follows "ntonix": at warning and above there are no access lines
    on = cfg.access_log and level <= logging.INFO
    ACCESS.configure(cfg, make_access_handler(cfg) if on else None)

