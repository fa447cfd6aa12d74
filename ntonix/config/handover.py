"""State a gateway's master hands to its workers: the run directory and the resolved config.

The master validates the configuration, writes it as JSON into a private run directory
(``_NTONIX_RUN_DIR``) and every worker builds itself from that file, at boot and again on
HUP. So all workers run exactly what the master validated, CLI options included.
"""

from __future__ import annotations

import json
import os
import tempfile

from ntonix.config import Config, from_jsonable, load_config, text_value, to_jsonable

RUN_DIR_ENV = "_NTONIX_RUN_DIR"
CLI_ENV = "_NTONIX_CLI"


def cli_layer() -> dict[str, object]:
    """The command-line layer ``python -m ntonix`` handed over (values stay text, typed later)."""
    raw = os.environ.get(CLI_ENV)
    layer: dict[str, object] = json.loads(raw) if raw else {}
    for section, values in layer.items():
        if section != "backends" and isinstance(values, dict):
            layer[section] = {k: text_value(v) if isinstance(v, str) else v for k, v in values.items()}
    return layer


def run_dir() -> str:
    path = os.environ.get(RUN_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="ntonix-run-")
        os.environ[RUN_DIR_ENV] = path
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def config_path() -> str:
    return os.path.join(run_dir(), "config.json")


def publish(cfg: Config) -> None:
    """Write the resolved configuration atomically for the workers."""
    path = config_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(to_jsonable(cfg), fh)
    os.replace(tmp, path)


def current() -> Config:
    """The configuration the master published, or (outside gunicorn) one loaded afresh."""
    path = os.path.join(os.environ[RUN_DIR_ENV], "config.json") if os.environ.get(RUN_DIR_ENV) else ""
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return from_jsonable(json.load(fh))
    return load_config(cli_layer())
