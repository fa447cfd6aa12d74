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
    p.add_argument("--workers", type=int, default=_env("WORKERS", "1"))
    p.add_argument("--graceful-timeout", type=int, default=_env("GRACEFUL_TIMEOUT", "5"),
                   help="seconds in-flight requests may finish on SIGTERM")
    p.add_argument("--access-log", action="store_true", default=_env("ACCESS_LOG", "") == "1",
                   help="log every request to stderr")
    p.add_argument("--models", default=_env("MODELS", ""),
                   help="comma-separated model ids served (listed by /v1/models; others get 404 "
                        "model_not_found); default: any model, and GET /v1/models answers 404 (no list)")
    inf = p.add_argument_group(
        "inference-server mode", "--inference: a KV prefix cache, prefill time per uncached token, a limited number "
        "of running requests with a FIFO queue, decode time per output token (--token-delay), cached_tokens in "
        "usage, vLLM-style /metrics (mock_llm/inference.py)")
    inf.add_argument("--inference", action="store_true", default=_env("INFERENCE", "") == "1",
                     help="act like an inference server (default: the plain mock)")
    inf.add_argument("--kv-cache-tokens", type=int, default=_env("KV_CACHE_TOKENS", "65536"),
                     help="prefix cache capacity in tokens (rounded down to whole blocks)")
    inf.add_argument("--block-tokens", type=int, default=_env("BLOCK_TOKENS", "16"), help="tokens per KV block")
    inf.add_argument("--prefill-time-per-token", type=float, default=_env("PREFILL_TIME_PER_TOKEN", "0.0001"),
                     help="seconds per uncached prompt token (prefills run one at a time)")
    inf.add_argument("--max-num-seqs", type=int, default=_env("MAX_NUM_SEQS", "8"),
                     help="requests running at once; the others wait first come, first served")
    inf.add_argument("--max-waiting", type=int, default=_env("MAX_WAITING", "0"),
                     help="requests allowed to wait (more: 503 at once); 0 = no limit")
    inf.add_argument("--stream-interval", type=int, default=_env("STREAM_INTERVAL", "1"),
                     help="output tokens per stream event after the first")
    args = p.parse_args(argv)
    args.name = args.name or f"mock-{args.port}"
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    for option, least in (("block_tokens", 1), ("max_num_seqs", 1), ("stream_interval", 1), ("kv_cache_tokens", 0),
                          ("max_waiting", 0), ("prefill_time_per_token", 0)):
        if getattr(args, option) < least:
            p.error(f"--{option.replace('_', '-')}: must be >= {least}, got {getattr(args, option)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    host = f"[{args.host}]" if ":" in args.host else args.host

    def load() -> Any:
        # Imported in the worker, after gevent has monkey-patched the standard library.
        from mock_llm.app import create_app
        from mock_llm.inference import InferenceConfig

        inference = InferenceConfig(
            kv_cache_tokens=args.kv_cache_tokens, block_tokens=args.block_tokens,
            prefill_time_per_token=args.prefill_time_per_token, max_num_seqs=args.max_num_seqs,
            max_waiting=args.max_waiting, stream_interval=args.stream_interval,
        ) if args.inference else None
        return create_app(args.name, ttft=args.ttft, token_delay=args.token_delay, tokens=args.tokens,
                          models=args.models, inference=inference)

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
