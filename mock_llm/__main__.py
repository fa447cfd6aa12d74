"""``python -m mock_llm``: serve one mock instance under gunicorn with gevent workers.

Every option can also come from the environment (``MOCK_LLM_<OPTION>``); the command line wins.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

from gunicorn.app.base import BaseApplication


class _Server(BaseApplication):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn, configured from a dict instead of its own command line."""

    def __init__(self, load: Callable[[], Any], options: dict[str, Any]) -> None:
        self._load = load
        self._options = options
        super().__init__()  # reads the config, so the fields above must exist already

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._load()


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"MOCK_LLM_{name}", default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mock_llm", description=__doc__)
    # argparse applies ``type`` to string defaults too, so a bad environment value gets the
    # same one-line error as a bad option.
    p.add_argument("--port", type=int, default=_env("PORT", "8001"))
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--name", default=_env("NAME"), help="instance name (default mock-<port>)")
    p.add_argument("--ttft", type=float, default=_env("TTFT", "0"), help="seconds before the first token")
    p.add_argument("--token-delay", type=float, default=_env("TOKEN_DELAY", "0"),
                   help="seconds between two tokens")
    p.add_argument("--tokens", type=int, default=_env("TOKENS", "8"),
                   help="tokens per answer when the request has no max_tokens")
    p.add_argument("--models", default=_env("MODELS"),
                   help="comma-separated model ids it serves and lists on GET /v1/models "
                        "(default: no list, any model)")
    p.add_argument("--workers", type=int, default=_env("WORKERS", "1"))
    p.add_argument("--graceful-timeout", type=int, default=_env("GRACEFUL_TIMEOUT", "5"),
                   help="seconds in-flight requests may finish on SIGTERM")
    p.add_argument("--access-log", action="store_true", default=_env("ACCESS_LOG", "") == "1",
                   help="log every request to stderr")
    args = p.parse_args(argv)
    args.name = args.name or f"mock-{args.port}"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    host = f"[{args.host}]" if ":" in args.host else args.host

    def load() -> Any:
        # Imported in the worker, after gevent has monkey-patched the standard library.
        from mock_llm.app import create_app

        models = tuple(m for m in args.models.split(",") if m) if args.models else None
        return create_app(args.name, ttft=args.ttft, token_delay=args.token_delay, tokens=args.tokens,
                          models=models)

    options: dict[str, Any] = {
        "bind": [f"{host}:{args.port}"],
        "workers": args.workers,
        "worker_class": "gevent",
        "worker_connections": 2000,
        # Longer than any proxy's idle reuse window, so the proxy, not the mock, closes first.
        "keepalive": 75,
        "graceful_timeout": args.graceful_timeout,
        "control_socket_disable": True,
        "errorlog": "-",
        "accesslog": "-" if args.access_log else None,
        "loglevel": "info",
        "proc_name": f"mock_llm:{args.name}",
    }
    _Server(load, options).run()


if __name__ == "__main__":
    main()
