"""The configuration: typed, frozen, validated once. The public face of the three modules.

Theory of operation
-------------------
Every key lives in a frozen dataclass (``ntonix.config.model``), with its default. Loading
(here) merges four layers, lowest first: built-in defaults < JSON file < environment <
command line (``merge_layers``); then ``build_config`` (``ntonix.config.validate``) checks and
converts the merged raw values into the dataclass tree. Any problem raises ``ConfigError``
whose message names the key (``backends[1].weight: must be >= 1, got 0``); the entry points
print that one line and exit 2.

No I/O besides reading the JSON file and checking that named files exist; nothing from the
network stack.
"""


from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ntonix.config.model import (
    ALIASES,
    DEFAULT_CONFIG_PATH,
    ENV_SHORTCUTS,
    LOG_LEVELS,
    PATH_KEYS,
    ROUTING_POLICIES,
    SECTIONS,
    BackendConfig,
    CacheConfig,
    CircuitBreakerConfig,
    Config,
    ConfigError,
    HealthConfig,
    LoggingConfig,
    MetricsConfig,
    PoolConfig,
    ProxyConfig,
    RoutingConfig,
    ServerConfig,
    SniEntry,
    SSLConfig,
    _EnvString,
    env_name,
    leaf_keys,
    text_value,
)
from ntonix.config.validate import build_config as build_values

__all__ = [
    "ALIASES", "DEFAULT_CONFIG_PATH", "ENV_SHORTCUTS", "LOG_LEVELS", "PATH_KEYS", "ROUTING_POLICIES", "SECTIONS",
    "BackendConfig", "CacheConfig", "CircuitBreakerConfig", "Config", "ConfigError", "HealthConfig",
    "LoggingConfig", "MetricsConfig", "PoolConfig", "ProxyConfig", "RoutingConfig", "SSLConfig", "ServerConfig",
    "SniEntry",
    "build_config", "env_layer", "env_name", "from_jsonable", "leaf_keys", "load_config", "merge_layers",
    "parse_backends", "read_file_layer", "text_value", "to_jsonable",
]

# ----------------------------------------------------------------------------- layers


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge raw layers; later layers win. ``backends`` is replaced, never merged."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "backends":
                out[key] = merge_layers(out[key], value)
            else:
                out[key] = value
    return out


def parse_backends(text: str, where: str = "NTONIX_BACKENDS") -> list[dict[str, Any]]:
    """``host:port[:weight]`` comma-separated; IPv6 as ``[::1]:8001:2``."""
    items = []
    for i, raw in enumerate(part.strip() for part in text.split(",")):
        if not raw:
            continue
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)(?::(-?\d+))?|([^:\[\]]+):(\d+)(?::(-?\d+))?", raw)
        if not m:
            raise ConfigError(f"{where}[{i}]: expected host:port or host:port:weight, got {raw!r}")
        host = m.group(1) or m.group(4)
        port = m.group(2) or m.group(5)
        weight = m.group(3) or m.group(6)
        entry: dict[str, Any] = {"host": host, "port": int(port)}
        if weight is not None:
            entry["weight"] = int(weight)
        items.append(entry)
    if not items:
        raise ConfigError(f"{where}: no backends given")
    return items


def env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """The NTONIX_* variables as a raw layer (strings, converted later by type)."""
    known = {env_name(s, k): (s, k) for s, k, _, _ in leaf_keys()}
    # An alias variable sets the canonical key, so that a higher layer naming the canonical key
    # (--workers) still wins over it in merge_layers.
    known.update({env_name(s, a): canonical for (s, a), canonical in ALIASES.items()})
    known.update(ENV_SHORTCUTS)
    layer: dict[str, Any] = {}
    named_by: dict[tuple[str, str], str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith("NTONIX_") or name == "NTONIX_CONFIG":
            continue
        if name == "NTONIX_BACKENDS":
            layer["backends"] = parse_backends(value)
            continue
        if name not in known:
            raise ConfigError(f"{name}: unknown configuration variable")
        section, key = known[name]
        other = named_by.setdefault((section, key), name)
        if other != name and layer[section][key] != value:
            # Two names for one key (NTONIX_PORT and NTONIX_SERVER_PORT, NTONIX_WORKERS and
            # NTONIX_SERVER_THREADS): which one won would depend on the environment's order.
            raise ConfigError(f"{section}.{key}: set twice with different values, by {other} and {name}")
        layer.setdefault(section, {})[key] = _EnvString(value)
    return layer


# ----------------------------------------------------------------------------- loading


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last one silently; nginx
    refuses a duplicate directive)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_file_layer(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise ConfigError(f"config file: {exc.args[0]!r} given twice in one object of {path}: which one "
                          "is meant?") from None
    except FileNotFoundError:
        raise ConfigError(f"config file: not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file: cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file: invalid JSON in {path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file: invalid JSON in {path}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise ConfigError(f"config file: invalid JSON in {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file: {path} must hold a JSON object")
    return data


def build_config(raw: Mapping[str, Any], base_dir: Path | None = None, source: str = "",
                 check_files: bool = True) -> Config:
    """Validate merged raw values and build the frozen ``Config``; with ``check_files``, also
    check that the files it names can be used (after every other check, as before)."""
    cfg = build_values(raw, base_dir=base_dir, source=source)
    if check_files:
        _check_files(cfg)
    return cfg


def _check_files(cfg: Config) -> None:
    if cfg.logging.file:
        _check_writable("logging.file", cfg.logging.file)
    if cfg.cache.enabled and cfg.cache.dir:
        _check_folder("cache.dir", cfg.cache.dir)
    if cfg.server.ssl_port:
        _check_file("ssl.cert_file", cfg.ssl.cert_file)
        _check_file("ssl.key_file", cfg.ssl.key_file)
        for name, entry in cfg.ssl.sni.items():
            _check_file(f"ssl.sni[{name!r}].cert_file", entry.cert_file)
            _check_file(f"ssl.sni[{name!r}].key_file", entry.key_file)


def _check_writable(where: str, path: str) -> None:
    """A file the gateway appends to: tried for real (permission bits alone would not tell for
    root, under /proc or /sys, or on a read-only mount). A file the try creates stays, empty (as
    ``nginx -t`` leaves its logs): removing it could race a worker's rotation on HUP."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{where}: folder does not exist: {folder}")
    if os.path.isdir(path):
        raise ConfigError(f"{where}: is a folder, not a file: {path}")
    existed = os.path.exists(path)
    if existed and not os.access(path, os.W_OK):
        raise ConfigError(f"{where}: file not writable: {path}")
    if not existed and not os.access(folder, os.W_OK):
        raise ConfigError(f"{where}: folder not writable: {folder}")
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write {path}: {exc.strerror or exc}") from None


def _check_folder(where: str, path: str) -> None:
    """A folder the gateway creates if missing and writes into."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{where}: not a folder: {path}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: folder not writable: {path}")
        return
    # Try it: create the missing folders, then take them away again (the cache creates its own,
    # mode 0700; permission bits alone would not tell, e.g. under /proc or on a read-only mount).
    missing = []
    parent = path
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    made: list[str] = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                continue  # made meanwhile by someone else (a worker): theirs, not ours to remove
            made.append(folder)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot create {path}: {exc.strerror or exc}") from None
    finally:
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:
                pass


def _check_file(where: str, path: str) -> None:
    if not path:
        raise ConfigError(f"{where}: required while server.ssl_port is not 0")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: file not found: {path} (a development pair: python scripts/gen_dev_cert.py "
                          "--out-dir <its folder>; plain HTTP only: server.ssl_port 0, NTONIX_SSL_PORT=0)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where}: file not readable: {path}")


def _canonical_names(layer: dict[str, Any]) -> dict[str, Any]:
    """A file naming one key twice, by its name and its alias (``server.threads`` and
    ``server.workers``), must give one value: which one won would depend on their order. (A
    higher layer always sets the canonical name, after the file's keys in ``merge_layers``, so
    it wins over either.)"""
    for (section, alias), (_, canonical) in ALIASES.items():
        given = layer.get(section)
        if isinstance(given, dict) and alias in given and canonical in given and given[alias] != given[canonical]:
            raise ConfigError(f"{section}.{canonical}: set twice with different values, "
                              f"as {section}.{canonical} and {section}.{alias}")
    return layer


def load_config(
    cli_layer: Mapping[str, Any] | None = None,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    check_files: bool = True,
) -> Config:
    """Defaults < file < environment < command line, validated."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get("NTONIX_CONFIG") or ""
    explicit = bool(path)
    if not path and os.path.isfile(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    file_layer: dict[str, Any] = {}
    base_dir: Path | None = None
    if path:
        file_layer = _canonical_names(read_file_layer(path))
        base_dir = Path(path).resolve().parent
    elif explicit:  # pragma: no cover - explicit empty string
        raise ConfigError("config file: empty path")
    raw = merge_layers(file_layer, env_layer(environ), cli_layer or {})
    return build_config(raw, base_dir=base_dir, source=os.path.abspath(path) if path else "",
                        check_files=check_files)


def to_jsonable(cfg: Config) -> dict[str, Any]:
    """The resolved configuration as plain JSON values (to hand to workers or print)."""
    return dataclasses.asdict(cfg)


def from_jsonable(data: Mapping[str, Any]) -> Config:
    """Rebuild a ``Config`` from ``to_jsonable`` output (already validated; no file checks)."""
    raw = {k: v for k, v in data.items() if k != "source"}
    raw["ssl"] = dict(raw["ssl"])
    raw["ssl"]["sni"] = {n: dict(e) for n, e in raw["ssl"]["sni"].items()}
    for section in SECTIONS:
        for key, value in list(raw[section].items()):
            if isinstance(value, tuple):
                raw[section][key] = list(value)
    return build_config(raw, base_dir=None, source=str(data.get("source", "")), check_files=False)
