"""gunicorn's settings, derived from our configuration in one place (pure).

Both entry points (``gunicorn -c gunicorn.conf.py ntonix.wsgi`` and ``python -m ntonix``) load
``ntonix.server.hooks``, which takes its settings from here, so they run the same server.
"""

from __future__ import annotations

import math
from typing import Any

from ntonix.config import Config

# Seconds between the end of a worker's own drain (server.graceful_timeout_s after TERM) and the
# master's SIGKILL: enough for the worker to cut what is left, flush its logs and exit.
KILL_MARGIN_S = 3


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gunicorn_settings(cfg: Config) -> dict[str, Any]:
    s = cfg.server
    binds = [bind_address(s.host, s.port)]
    if s.ssl_port:
        binds.append(bind_address(s.host, s.ssl_port))
    return {
        "bind": binds,
        "workers": s.threads,
        "worker_class": "ntonix.server.worker.NtonixWorker",
        "worker_connections": s.worker_connections,
        # Our worker waits for in-flight work itself, up to graceful_timeout_s, then cuts what is
        # left, logs it and exits; gunicorn's master SIGKILLs a worker still there KILL_MARGIN_S
        # later (it used to be at the same moment: the worker lost that race, and with it the
        # access lines of everything that finished during the drain).
        "graceful_timeout": math.ceil(s.graceful_timeout_s) + KILL_MARGIN_S,
        "keepalive": max(1, math.ceil(s.keepalive_s)),  # also the limit for reading a request's headers
        "timeout": 30,  # only catches a blocked event loop (heartbeat), not slow requests
        "limit_request_line": s.max_request_line,
        "limit_request_fields": s.max_headers,
        "limit_request_field_size": s.max_header_bytes,
        "backlog": 2048,
        "preload_app": False,
        "control_socket_disable": True,
        "proc_name": "ntonix",
        "loglevel": cfg.logging.level.lower(),
        "logger_class": "ntonix.server.glogger.GunicornLogger",
        "errorlog": "-",
        "accesslog": None,
        "do_handshake_on_connect": True,  # our worker does the TLS handshake itself, with a timeout
        # We set X-Forwarded-* ourselves; gunicorn must not trust a client's copy for the scheme.
        "secure_scheme_headers": {},
        "forwarded_allow_ips": "127.0.0.1,::1",
        "max_requests": 0,
        # gunicorn's built-in statsd (<prefix>.gunicorn.requests, .request.duration, ...) beside ours.
        "statsd_host": (bind_address(cfg.metrics.statsd_host, cfg.metrics.statsd_port)
                        if cfg.metrics.statsd_host else None),
        "statsd_prefix": cfg.metrics.statsd_prefix,
    }
