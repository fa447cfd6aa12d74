"""Checking merged raw configuration values and building the frozen ``Config`` (pure).

Every problem raises ``ConfigError`` whose message names the key and what is wrong
(``backends[1].weight: must be >= 1, got 0``). Text values (environment, command line) are
converted by the field's type; JSON values must already have it. No file is opened or checked
here (``ntonix.config.load`` checks the files the configuration names); relative paths are
resolved against the configuration file's folder.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ntonix.config.model import (
    ALIASES,
    LOG_LEVELS,
    PATH_KEYS,
    ROUTING_POLICIES,
    SECTIONS,
    BackendConfig,
    Config,
    ConfigError,
    SniEntry,
    _EnvString,
)
from ntonix.core.redis_url import parse_redis_url, redacted

# ----------------------------------------------------------------------------- validation


def _convert(where: str, typ: Any, value: Any) -> Any:
    text = isinstance(value, _EnvString)
    origin = typing.get_origin(typ)
    if typ is bool:
        if text:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: must be a boolean, got {_show(value)}")
    if typ is int:
        if text:
            try:
                return int(value.strip())
            except ValueError:
                raise ConfigError(f"{where}: must be an integer, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: must be an integer, got {_show(value)}")
    if typ is float:
        number: float | None = None
        try:
            if text:
                number = float(value.strip())
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
        except ValueError:
            pass
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if number is None:
            raise ConfigError(f"{where}: must be a number, got {_show(value)}")
        # nan or inf would pass every ">= minimum" check and break timers and sizes at run time.
        if not math.isfinite(number):
            raise ConfigError(f"{where}: must be a finite number, got {_show(value)}")
        return number
    if typ is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{where}: must be a string, got {_show(value)}")
    if origin is tuple:
        if text:
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}: must be a list of strings, got {_show(value)}")
    raise ConfigError(f"{where}: unsupported type")  # pragma: no cover - model bug


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, _EnvString) else repr(str(value))


def _check_port(where: str, value: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"{where}: must be a port number {low}-65535, got {value}")


def _at_least(where: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum:g}, got {value:g}")


def _resolve(base: Path | None, path: str) -> str:
    if not path or os.path.isabs(path) or base is None:
        return path
    return str((base / path).resolve())


def build_config(raw: Mapping[str, Any], base_dir: Path | None = None, source: str = "") -> Config:
    """Validate merged raw values and build the frozen ``Config`` (the files it names unchecked)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("configuration: must be a JSON object")
    for key in raw:
        if key not in SECTIONS and key != "backends":
            raise ConfigError(f"{key}: unknown section")
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        given = raw.get(section, {})
        if not isinstance(given, Mapping):
            raise ConfigError(f"{section}: must be an object, got {_show(given)}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, value in given.items():
            canonical = ALIASES.get((section, key), (section, key))[1]
            where = f"{section}.{key}"
            if canonical not in hints:
                raise ConfigError(f"{where}: unknown key")
            if section == "ssl" and canonical == "sni":
                values["sni"] = _build_sni(value, base_dir)
                continue
            converted = _convert(where, hints[canonical], value)
            if (section, canonical) in PATH_KEYS and not isinstance(value, _EnvString):
                converted = _resolve(base_dir, converted)
            values[canonical] = converted
        for path_section, key in PATH_KEYS:
            # A default file name (ssl.cert_file "server.crt") lives next to the config file too,
            # as docs/configuration.md says, not in whatever folder the gateway was started from.
            if path_section == section and key not in values:
                default = getattr(cls(), key)
                if default:
                    values[key] = _resolve(base_dir, default)
        sections[section] = cls(**values)
    backends = _build_backends(raw.get("backends"))
    cfg = Config(backends=backends, source=source, **sections)
    _validate(cfg)
    return cfg


def _build_sni(value: Any, base_dir: Path | None) -> dict[str, SniEntry]:
    if isinstance(value, _EnvString):  # NTONIX_SSL_SNI: the same object, as JSON text
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ConfigError("ssl.sni: NTONIX_SSL_SNI must hold a JSON object of host name -> "
                              "{cert_file, key_file}") from None
        base_dir = None  # paths in the environment are taken from the working folder
    if not isinstance(value, Mapping):
        raise ConfigError(f"ssl.sni: must be an object of host name -> {{cert_file, key_file}}, got {_show(value)}")
    out = {}
    for name, entry in value.items():
        where = f"ssl.sni[{name!r}]"
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*",
                            name):
            raise ConfigError(f"{where}: not a host name or *.wildcard")
        if not isinstance(entry, Mapping) or set(entry) != {"cert_file", "key_file"}:
            raise ConfigError(f"{where}: must be {{\"cert_file\": ..., \"key_file\": ...}}")
        for k in ("cert_file", "key_file"):
            if not isinstance(entry[k], str) or not entry[k]:
                raise ConfigError(f"{where}.{k}: must be a file path")
        if name.lower() in out:
            raise ConfigError(f"{where}: the same host name as another entry (names are case-insensitive)")
        out[name.lower()] = SniEntry(_resolve(base_dir, entry["cert_file"]), _resolve(base_dir, entry["key_file"]))
    return out


def _build_backends(value: Any) -> tuple[BackendConfig, ...]:
    if value is None:
        raise ConfigError("backends: no backends configured")
    if not isinstance(value, list):
        raise ConfigError(f"backends: must be a list, got {_show(value)}")
    if not value:
        raise ConfigError("backends: no backends configured")
    out = []
    seen = set()
    for i, item in enumerate(value):
        where = f"backends[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: must be an object with host and port, got {_show(item)}")
        for key in item:
            if key not in ("host", "port", "weight", "models", "max_in_flight"):
                raise ConfigError(f"{where}.{key}: unknown key")
        if "host" not in item:
            raise ConfigError(f"{where}.host: missing")
        if "port" not in item:
            raise ConfigError(f"{where}.port: missing")
        host = _convert(f"{where}.host", str, item["host"]).strip("[]")
        if not host:
            raise ConfigError(f"{where}.host: must not be empty")
        port = _convert(f"{where}.port", int, item["port"])
        _check_port(f"{where}.port", port)
        weight = _convert(f"{where}.weight", int, item.get("weight", 1))
        _at_least(f"{where}.weight", weight, 1)
        models = None
        given_models = item.get("models")
        if given_models is not None:  # null (as to_jsonable writes "absent") = learn them
            models = _convert(f"{where}.models", tuple[str, ...], given_models)
            if any(not m for m in models):
                raise ConfigError(f"{where}.models: model ids must not be empty")
        max_in_flight = _convert(f"{where}.max_in_flight", int, item.get("max_in_flight", 0))
        _at_least(f"{where}.max_in_flight", max_in_flight, 0)
        backend = BackendConfig(host, port, weight, models, max_in_flight)
        if backend.address in seen:
            raise ConfigError(f"{where}: duplicate backend {backend.address}")
        seen.add(backend.address)
        out.append(backend)
    return tuple(out)


def _validate(cfg: Config) -> None:
    s = cfg.server
    _check_port("server.port", s.port)
    _check_port("server.ssl_port", s.ssl_port, allow_zero=True)
    if s.ssl_port == s.port:
        raise ConfigError(f"server.ssl_port: must differ from server.port ({s.port})")
    _at_least("server.threads", s.threads, 1)
    _at_least("server.graceful_timeout_s", s.graceful_timeout_s, 0)
    _at_least("server.keepalive_s", s.keepalive_s, 0.1)
    _at_least("server.body_timeout_s", s.body_timeout_s, 0.1)
    _at_least("server.worker_connections", s.worker_connections, 1)
    _at_least("server.max_request_line", s.max_request_line, 256)
    _at_least("server.max_header_bytes", s.max_header_bytes, 256)
    _at_least("server.max_headers", s.max_headers, 8)
    p = cfg.proxy
    _at_least("proxy.connect_timeout_s", p.connect_timeout_s, 0.001)
    _at_least("proxy.read_timeout_s", p.read_timeout_s, 0.001)
    _at_least("proxy.retries", p.retries, 0)
    _at_least("proxy.max_body_bytes", p.max_body_bytes, 0)
    for i, net in enumerate(p.trusted_proxies):
        _check_network(f"proxy.trusted_proxies[{i}]", net)
    for i, net in enumerate(cfg.metrics.allow):
        _check_network(f"metrics.allow[{i}]", net)
    _at_least("pool.size", cfg.pool.size, 1)
    if cfg.pool.max_size < cfg.pool.size:
        raise ConfigError(f"pool.max_size: must be >= pool.size ({cfg.pool.size}), got {cfg.pool.max_size}")
    _at_least("pool.idle_timeout_s", cfg.pool.idle_timeout_s, 0.1)
    h = cfg.health
    if not h.path.startswith("/"):
        raise ConfigError(f"health.path: must start with '/', got {h.path!r}")
    _at_least("health.interval_s", h.interval_s, 0.05)
    _at_least("health.timeout_s", h.timeout_s, 0.01)
    _at_least("health.unhealthy_threshold", h.unhealthy_threshold, 1)
    _at_least("health.healthy_threshold", h.healthy_threshold, 1)
    _at_least("circuit_breaker.failure_threshold", cfg.circuit_breaker.failure_threshold, 1)
    _at_least("circuit_breaker.cooldown_s", cfg.circuit_breaker.cooldown_s, 0)
    c = cfg.cache
    _at_least("cache.max_size_mb", c.max_size_mb, 0)
    _at_least("cache.ttl_seconds", c.ttl_seconds, 0)
    _at_least("cache.memory_max_mb", c.memory_max_mb, 0)
    _at_least("cache.max_entry_bytes", c.max_entry_bytes, 1)
    for i, name in enumerate(c.partition_headers):
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^`|~-]+", name):
            raise ConfigError(f"cache.partition_headers[{i}]: must be a header name, got {name!r}")
    if c.redis_url:
        try:
            parse_redis_url(c.redis_url)
        except ValueError as exc:
            raise ConfigError(f"cache.redis_url: {exc} (in {redacted(c.redis_url)!r})") from None
    lg = cfg.logging
    if lg.level.lower() not in LOG_LEVELS:
        raise ConfigError(f"logging.level: must be one of {', '.join(LOG_LEVELS)}, got {lg.level!r}")
    if lg.format not in ("json", "text"):
        raise ConfigError(f"logging.format: must be json or text, got {lg.format!r}")
    _at_least("logging.max_bytes", lg.max_bytes, 0)
    _at_least("logging.backup_count", lg.backup_count, 0)
    _check_port("metrics.statsd_port", cfg.metrics.statsd_port)
    _at_least("ssl.handshake_timeout_s", cfg.ssl.handshake_timeout_s, 0.1)
    r = cfg.routing
    if r.policy not in ROUTING_POLICIES:
        raise ConfigError(f"routing.policy: must be one of {', '.join(ROUTING_POLICIES)}, got {r.policy!r}")
    _at_least("routing.queue_timeout_s", r.queue_timeout_s, 0)
    _at_least("routing.prefix_block_chars", r.prefix_block_chars, 16)
    _at_least("routing.prefix_balance_factor", r.prefix_balance_factor, 1)
    _at_least("routing.prefix_load_blocks", r.prefix_load_blocks, 0)
    _at_least("routing.prefix_index_entries", r.prefix_index_entries, 1024)


def _check_network(where: str, value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{where}: not an IP address or network, got {value!r}") from None
