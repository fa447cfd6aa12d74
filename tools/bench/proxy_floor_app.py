#!/usr/bin/env python3
"""The proxy floor for scripts/bench: the least a gunicorn/gevent/geventhttpclient proxy can do.

    python -m tools.bench.proxy_floor_app --port 9101 --backend 127.0.0.1:9001 [--workers 1]

The same gunicorn settings as the floor (``tools.bench.floor_app``), and an app that forwards
each request to one backend over a keep-alive connection pool (geventhttpclient, the
gateway's own client library) and returns the backend's status, Content-Type and body: no
routing, health, retries, cache, coalescing, logs or metrics. What the gateway costs above
the floor splits into this (the stack's cost of one proxied round trip: a second socket, its
send, its receive and its HTTP parsing, and the greenlet switches while waiting) and what
NTONIX's own code costs above it.
"""

from __future__ import annotations

import sys
from typing import Any

_STATUS = {200: "200 OK", 404: "404 Not Found", 500: "500 Internal Server Error", 502: "502 Bad Gateway"}


def make_app(host: str, port: int) -> Any:
    from geventhttpclient import HTTPClient

    client = HTTPClient(host, port, concurrency=1024, connection_timeout=5, network_timeout=30)

    def application(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read()
        headers = {"Content-Type": environ.get("CONTENT_TYPE") or "application/json"}
        with client.request(environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/", body=body,
                            headers=headers) as resp:
            data = resp.read()
            code = resp.status_code
            kind = resp.get("content-type") or "application/octet-stream"
        start_response(_STATUS.get(code, f"{code} Other"), [("Content-Type", kind), ("Content-Length", str(len(data)))])
        return [data]

    return application


def main(argv: list[str] | None = None) -> int:
    from tools.bench.floor_app import parser, serve

    p = parser(__doc__, backend=True)
    args = p.parse_args(argv)
    host, _, port = args.backend.rpartition(":")

    serve(args.port, args.workers, args.worker_connections, "bench-proxy-floor", lambda: make_app(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
