"""The configuration model: typed, frozen, validated once.

Theory of operation
-------------------
Every key lives in a frozen dataclass below, with its default. Loading merges four layers,
lowest first: built-in defaults < JSON file < environment < command line
(``merge_layers``), then ``build_config`` checks and converts the merged raw values into the
dataclass tree. Any problem raises ``ConfigError`` whose message names the key
(``backends[1].weight: must be >= 1, got 0``); the entry points print that one line and exit 2.

This module does no I/O of its own except reading the JSON file in ``load_config`` and
checking that certificate files exist; it imports nothing from the network stack.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "conf/ntonix.json"


class ConfigError(Exception):
    """Invalid configuration; the message names the key and what is wrong."""


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"  # noqa: S104 - a gateway listens on all interfaces by default
    port: int = 8080
    ssl_port: int = 8443
    threads: int = 2  # worker processes (alias: server.workers)
    graceful_timeout_s: float = 30.0
    keepalive_s: float = 5.0
    body_timeout_s: float = 30.0
    worker_connections: int = 4096
    max_request_line: int = 8190
    max_header_bytes: int = 8190
    max_headers: int = 100


@functools.lru_cache(maxsize=1024)
def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        return _address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    retries: int = 2
    max_body_bytes: int = 10 * 1024 * 1024
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PoolConfig:
    size: int = 10
    max_size: int = 1024
    idle_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    enabled: bool = True
    path: str = "/health"
    interval_s: float = 5.0
    timeout_s: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = 5
    cooldown_s: float = 10.0


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = True
    max_size_mb: float = 512.0
    ttl_seconds: float = 3600.0
    memory_max_mb: float = 64.0
    dir: str = ""
    redis_url: str = ""
    purge_token: str = ""


@dataclass(frozen=True, slots=True)
class SniEntry:
    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class SSLConfig:
    cert_file: str = "server.crt"
    key_file: str = "server.key"
    sni: Mapping[str, SniEntry] = field(default_factory=dict)
    handshake_timeout_s: float = 5.0
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES"


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "json"
    file: str = ""
    max_bytes: int = 50 * 1024 * 1024
    backup_count: int = 5
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    statsd_host: str = ""
    statsd_port: int = 8125
    statsd_prefix: str = "ntonix"
    allow: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    backends: tuple[BackendConfig, ...] = ()
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = ""  # the file it was read from ("" = none); not a key


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "proxy": ProxyConfig,
    "pool": PoolConfig,
    "health": HealthConfig,
    "circuit_breaker": CircuitBreakerConfig,
    "cache": CacheConfig,
    "ssl": SSLConfig,
    "logging": LoggingConfig,
    "metrics": MetricsConfig,
}
ALIASES = {("server", "workers"): ("server", "threads")}
# Keys whose value is a file path, taken relative to the config file's folder.
PATH_KEYS = {("ssl", "cert_file"), ("ssl", "key_file"), ("cache", "dir"), ("logging", "file")}
# Short environment names of INTERFACE.md, beside the general NTONIX_<SECTION>_<KEY>.
ENV_SHORTCUTS = {
    "NTONIX_PORT": ("server", "port"),
    "NTONIX_SSL_PORT": ("server", "ssl_port"),
    "NTONIX_WORKERS": ("server", "threads"),
    "NTONIX_LOG_LEVEL": ("logging", "level"),
}
LOG_LEVELS = ("debug", "info", "warning", "error")


def leaf_keys() -> list[tuple[str, str, Any, Any]]:
    """Every (section, key, type, default) of the model, in declaration order."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            factory: Any = f.default_factory
            default = f.default if f.default is not dataclasses.MISSING else factory()
            out.append((section, f.name, hints[f.name], default))
    return out


def env_name(section: str, key: str) -> str:
    return f"NTONIX_{section.upper()}_{key.upper()}"


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
    for name, value in environ.items():
        if not name.startswith("NTONIX_") or name == "NTONIX_CONFIG":
            continue
        if name == "NTONIX_BACKENDS":
            layer["backends"] = parse_backends(value)
            continue
        if name not in known:
            raise ConfigError(f"{name}: unknown configuration variable")
        section, key = known[name]
        layer.setdefault(section, {})[key] = _EnvString(value)
    return layer


class _EnvString(str):
    """A value that came as text (environment or command line) and may be converted by type."""


def text_value(value: str) -> _EnvString:
    return _EnvString(value)


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


def build_config(raw: Mapping[str, Any], base_dir: Path | None = None, source: str = "",
                 check_files: bool = True) -> Config:
    """Validate merged raw values and build the frozen ``Config``."""
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
    _validate(cfg, check_files)
    return cfg


def _build_sni(value: Any, base_dir: Path | None) -> dict[str, SniEntry]:
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
            if key not in ("host", "port", "weight"):
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
        backend = BackendConfig(host, port, weight)
        if backend.address in seen:
            raise ConfigError(f"{where}: duplicate backend {backend.address}")
        seen.add(backend.address)
        out.append(backend)
    return tuple(out)


def _validate(cfg: Config, check_files: bool) -> None:
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
    if c.redis_url and not re.match(r"^(redis|rediss|unix)://", c.redis_url):
        raise ConfigError(f"cache.redis_url: must start with redis://, rediss:// or unix://, got {c.redis_url!r}")
    lg = cfg.logging
    if lg.level.lower() not in LOG_LEVELS:
        raise ConfigError(f"logging.level: must be one of {', '.join(LOG_LEVELS)}, got {lg.level!r}")
    if lg.format not in ("json", "text"):
        raise ConfigError(f"logging.format: must be json or text, got {lg.format!r}")
    _check_port("metrics.statsd_port", cfg.metrics.statsd_port)
    _at_least("ssl.handshake_timeout_s", cfg.ssl.handshake_timeout_s, 0.1)
    if lg.file and check_files:
        _check_writable("logging.file", lg.file)
    if s.ssl_port and check_files:
        _check_file("ssl.cert_file", cfg.ssl.cert_file)
        _check_file("ssl.key_file", cfg.ssl.key_file)
        for name, entry in cfg.ssl.sni.items():
            _check_file(f"ssl.sni[{name!r}].cert_file", entry.cert_file)
            _check_file(f"ssl.sni[{name!r}].key_file", entry.key_file)


def _check_network(where: str, value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{where}: not an IP address or network, got {value!r}") from None


def _check_writable(where: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{where}: folder does not exist: {folder}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{where}: file not writable: {path}")
    if not os.path.exists(path) and not os.access(folder, os.W_OK):
        raise ConfigError(f"{where}: folder not writable: {folder}")


def _check_file(where: str, path: str) -> None:
    if not path:
        raise ConfigError(f"{where}: required while server.ssl_port is not 0")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: file not found: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where}: file not readable: {path}")


# ----------------------------------------------------------------------------- loading


def read_file_layer(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file: not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file: cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file: invalid JSON in {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file: {path} must hold a JSON object")
    return data


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
        file_layer = read_file_layer(path)
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
