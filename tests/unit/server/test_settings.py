"""gunicorn's settings derived from our configuration, in one place."""

from __future__ import annotations

import pytest

from ntonix.config import BackendConfig, Config, LoggingConfig, ServerConfig
from ntonix.server.settings import KILL_MARGIN_S, bind_address, gunicorn_settings


def config(**server: object) -> Config:
    return Config(server=ServerConfig(**server), backends=(BackendConfig("127.0.0.1", 8001),))  # type: ignore[arg-type]


def test_binds_http_and_https() -> None:
    s = gunicorn_settings(config(host="0.0.0.0", port=8080, ssl_port=8443))  # noqa: S104
    assert s["bind"] == ["0.0.0.0:8080", "0.0.0.0:8443"]


def test_no_https_bind_when_ssl_port_is_zero() -> None:
    assert gunicorn_settings(config(host="127.0.0.1", port=9000, ssl_port=0))["bind"] == ["127.0.0.1:9000"]


def test_ipv6_bind() -> None:
    assert bind_address("::1", 8080) == "[::1]:8080"
    assert gunicorn_settings(config(host="::", port=8080, ssl_port=0))["bind"] == ["[::]:8080"]


def test_workers_and_worker_class() -> None:
    s = gunicorn_settings(config(threads=4, worker_connections=500))
    assert s["workers"] == 4
    assert s["worker_class"] == "ntonix.server.worker.NtonixWorker"
    assert s["worker_connections"] == 500


def test_timeouts_are_whole_seconds_rounded_up() -> None:
    # The master's SIGKILL comes KILL_MARGIN_S after the worker's own drain ends (rounded up).
    s = gunicorn_settings(config(graceful_timeout_s=2.5, keepalive_s=0.2))
    assert s["graceful_timeout"] == 3 + KILL_MARGIN_S
    assert s["keepalive"] == 1  # never 0: it is also the header-read timeout
    s = gunicorn_settings(config())
    assert s["graceful_timeout"] == 30 + KILL_MARGIN_S


def test_request_limits() -> None:
    s = gunicorn_settings(config(max_request_line=4096, max_headers=50, max_header_bytes=2048))
    assert (s["limit_request_line"], s["limit_request_fields"], s["limit_request_field_size"]) == (4096, 50, 2048)


def test_log_level_and_safe_defaults() -> None:
    cfg = Config(backends=(BackendConfig("h", 1),), logging=LoggingConfig(level="WARNING"))
    s = gunicorn_settings(cfg)
    assert s["loglevel"] == "warning"
    assert s["preload_app"] is False  # clients are created after fork
    assert s["control_socket_disable"] is True
    assert s["max_requests"] == 0
    assert s["secure_scheme_headers"] == {}  # a client cannot claim https
    assert "certfile" not in s and "keyfile" not in s  # TLS only on ssl_port, by our worker


def test_pure_function_of_the_config() -> None:
    assert gunicorn_settings(config(port=1234)) == gunicorn_settings(config(port=1234))


def test_frozen_gunicorn_config_reads_what_the_config_reads() -> None:
    from gunicorn.config import Config as GConfig

    from ntonix.server.worker import FrozenConfig

    cfg = GConfig()
    cfg.set("keepalive", 7)
    cfg.set("certfile", "x.crt")
    frozen = FrozenConfig(cfg)
    for name in cfg.settings:
        if name != "pre_request":  # below
            assert getattr(frozen, name) == getattr(cfg, name), name
    assert frozen.keepalive == 7 and frozen.is_ssl == cfg.is_ssl == "x.crt" and frozen.sendfile == cfg.sendfile
    assert "keepalive" in vars(frozen)  # a plain attribute: no __getattr__ per request
    assert frozen.worker_class_str == cfg.worker_class_str  # everything else is the real config's


@pytest.mark.parametrize("level", ["debug", "info"])
def test_the_default_pre_request_hook_logs_its_line_only_at_debug(level: str) -> None:
    import logging
    from types import SimpleNamespace

    from gunicorn.config import Config as GConfig
    from gunicorn.glogging import Logger

    from ntonix.server.worker import FrozenConfig

    cfg = GConfig()
    cfg.set("loglevel", level)
    frozen = FrozenConfig(cfg)
    assert frozen.pre_request is not cfg.pre_request
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = Logger(cfg)
    log.error_log.addHandler(handler)
    try:
        frozen.pre_request(SimpleNamespace(log=log), SimpleNamespace(method="POST", path="/v1/x"))
    finally:
        log.error_log.removeHandler(handler)
    assert seen == (["POST /v1/x"] if level == "debug" else [])
    custom = GConfig()
    custom.set("pre_request", lambda worker, req: None)
    assert FrozenConfig(custom).pre_request is custom.pre_request
