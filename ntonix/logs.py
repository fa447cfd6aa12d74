"""Logging: one JSON object per line (python-json-logger) or plain text, for us and gunicorn.

``setup_logging`` configures the ``ntonix`` loggers; ``GunicornLogger`` (gunicorn's
``logger_class``) sends gunicorn's own error log through the same formatter.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from typing import Any

from gunicorn.glogging import Logger as _GLogger
from pythonjsonlogger.json import JsonFormatter

from ntonix.config import LoggingConfig

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class _Json(JsonFormatter):
    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        log_record["timestamp"] = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
        log_record["level"] = record.levelname.lower()
        log_record["component"] = record.name
        log_record.move_to_end("message", last=False) if hasattr(log_record, "move_to_end") else None


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}
        return base + ("".join(f" {k}={v}" for k, v in extra.items()) if extra else "")


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        formatter: logging.Formatter = _Json(timestamp=False)
        formatter.converter = __import__("time").gmtime
        return formatter
    return _Text("%(asctime)s %(levelname)s %(name)s %(message)s")


def make_handler(cfg: LoggingConfig) -> logging.Handler:
    handler: logging.Handler
    if cfg.file:
        handler = logging.handlers.RotatingFileHandler(cfg.file, maxBytes=cfg.max_bytes, backupCount=cfg.backup_count)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(cfg.format))
    return handler


def setup_logging(cfg: LoggingConfig) -> None:
    """(Re)configure the ``ntonix`` and ``ntonix.access`` loggers."""
    level = getattr(logging, cfg.level.upper())
    for name in ("ntonix", "gunicorn.error"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        logger.addHandler(make_handler(cfg))
        logger.setLevel(level)
        logger.propagate = False
    access = logging.getLogger("ntonix.access")
    access.disabled = not cfg.access_log
    access.setLevel(logging.INFO)


class GunicornLogger(_GLogger):  # type: ignore[misc]
    """gunicorn's error log through our formatter; access lines are written by ntonix itself."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from ntonix.runstate import current  # the configuration the master validated

        try:
            lc = current().logging
        except Exception:  # noqa: BLE001 - fall back to gunicorn's own format, never stop start-up here
            return
        formatter = make_formatter(lc.format)
        for handler in self.error_log.handlers:
            handler.setFormatter(formatter)

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None
