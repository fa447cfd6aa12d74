#!/usr/bin/env python3
"""The floor for scripts/bench: a minimal WSGI app on the gateway's own gunicorn settings.

    python -m tools.bench.floor_app --port 9100 [--workers 1] [--worker-connections 4096]

The gunicorn settings come from ``ntonix.server.settings`` for a configuration with the same
``server`` section as the gateway under test (bind, workers, worker_connections, keepalive,
backlog, request limits, timeouts), so the only differences are the worker class (gunicorn's
stock ``gevent`` worker instead of ``NtonixWorker``, which needs the gateway behind it) and the
app: read the request body, answer the same ~350 B JSON the bench backend sends. What the
gateway costs above this app is what NTONIX's own code costs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tools.bench.backend import JSON_BODY

_HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(JSON_BODY)))]


def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    environ["wsgi.input"].read()
    start_response("200 OK", list(_HEADERS))
    return [JSON_BODY]


def settings(port: int, workers: int, worker_connections: int) -> dict[str, Any]:
    from ntonix.config import build_config
    from ntonix.server.settings import gunicorn_settings

    cfg = build_config({"server": {"host": "127.0.0.1", "port": port, "ssl_port": 0, "threads": workers,
                                   "worker_connections": worker_connections},
                        "backends": [{"host": "127.0.0.1", "port": 9}]})
    s = gunicorn_settings(cfg)
    s["worker_class"] = "gevent"
    s.pop("logger_class", None)
    s["proc_name"] = "bench-floor"
    s["loglevel"] = "warning"
    return s


def serve(port: int, workers: int, worker_connections: int, proc_name: str, load: Callable[[], Any]) -> None:
    """Run ``load()``'s WSGI app on gunicorn with the floor's settings (this app and the other floors)."""
    from gunicorn.app.base import BaseApplication

    class FloorApp(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in settings(port, workers, worker_connections).items():
                if key in self.cfg.settings and value is not None:
                    self.cfg.set(key, value)
            self.cfg.set("proc_name", proc_name)

        def load(self) -> Any:
            return load()

    FloorApp().run()


def parser(doc: str | None, backend: bool = False) -> argparse.ArgumentParser:
    """The floors' common arguments (``backend``: also ``--backend host:port``)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    if backend:
        p.add_argument("--backend", required=True, help="host:port")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--worker-connections", type=int, default=1000)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    serve(args.port, args.workers, args.worker_connections, "bench-floor", lambda: application)
    return 0


if __name__ == "__main__":
    sys.exit(main())
