"""The configuration model: every key in a frozen dataclass, with its default (pure).

``ntonix.config`` loads and merges the layers, ``ntonix.config.validate`` checks and converts
them into these classes; code receives a ``Config``, never dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    # Model ids this backend serves; None = learn them from its GET /v1/models.
    models: tuple[str, ...] | None = None
    # Most requests in flight to it from this host, all workers together; 0 = no limit.
    max_in_flight: int = 0

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
    partition_headers: tuple[str, ...] = ()
    max_entry_bytes: int = 4 * 1024 * 1024


ROUTING_POLICIES = ("round_robin", "least_requests", "prefix")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: str = "round_robin"
    # Longer than any sane burst of queued LLM requests takes to drain a slot, shorter than the
    # common 60 s client timeouts (and proxy.read_timeout_s), so the client gets our 503 first.
    queue_timeout_s: float = 30.0
    prefix_block_chars: int = 256
    prefix_balance_factor: float = 1.5
    prefix_load_blocks: int = 2
    prefix_index_entries: int = 262144


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
    routing: RoutingConfig = field(default_factory=RoutingConfig)
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
    "routing": RoutingConfig,
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


class _EnvString(str):
    """A value that came as text (environment or command line) and may be converted by type."""


def text_value(value: str) -> _EnvString:
    return _EnvString(value)
