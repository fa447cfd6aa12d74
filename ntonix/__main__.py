"""``python -m ntonix [options]``: the same server as ``gunicorn -c gunicorn.conf.py ntonix.wsgi``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from ntonix.config import ConfigError, load_config, parse_backends, text_value
from ntonix.config.handover import CLI_ENV


class _Parser(argparse.ArgumentParser):
    """A bad option is an invalid configuration: one line on stderr, exit 2 (INTERFACE.md)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ntonix: invalid configuration: command line: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m ntonix",
        description="NTONIX: a gateway for local OpenAI-compatible LLM servers. Precedence: command line > "
                    "environment (NTONIX_*) > JSON file > built-in defaults.")
    p.add_argument("--config", metavar="FILE", help="JSON configuration file (default: conf/ntonix.json, "
                                                   "or NTONIX_CONFIG)")
    p.add_argument("--port", metavar="N", help="plain HTTP port (server.port)")
    p.add_argument("--ssl-port", metavar="N", help="HTTPS port, 0 = no HTTPS listener (server.ssl_port)")
    p.add_argument("--workers", metavar="N", help="worker processes (server.threads)")
    p.add_argument("--backends", metavar="LIST", help="host:port[:weight],... ([::1]:8001:2 for IPv6)")
    p.add_argument("--log-level", metavar="L", help="debug, info, warning or error (logging.level)")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit "
                                                               "(0 valid, 2 invalid)")
    return p


def cli_layer(args: argparse.Namespace) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for opt, (section, key) in {"port": ("server", "port"), "ssl_port": ("server", "ssl_port"),
                                "workers": ("server", "threads"), "log_level": ("logging", "level")}.items():
        value = getattr(args, opt)
        if value is not None:
            layer.setdefault(section, {})[key] = text_value(value)
    if args.backends is not None:
        layer["backends"] = parse_backends(args.backends, where="--backends")
    return layer


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        layer = cli_layer(args)
        cfg = load_config(layer, config_path=args.config)
        if args.check_config:
            from ntonix.server.hooks import check_for_start

            check_for_start(cfg)
    except ConfigError as exc:
        sys.stderr.write(f"ntonix: invalid configuration: {exc}\n")
        return 2
    if args.check_config:
        print(f"configuration ok: {len(cfg.backends)} backends, port {cfg.server.port}, "
              f"ssl_port {cfg.server.ssl_port}, {cfg.server.threads} workers"
              + (f", from {cfg.source}" if cfg.source else ""))
        return 0
    # The master (ntonix.server.hooks) reloads file + environment + these options on HUP.
    os.environ[CLI_ENV] = json.dumps(layer)
    if args.config:
        os.environ["NTONIX_CONFIG"] = os.path.abspath(args.config)
    from ntonix.server.hooks import run_gunicorn

    run_gunicorn()
    return 0


if __name__ == "__main__":
    sys.exit(main())
