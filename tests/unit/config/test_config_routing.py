"""The routing keys: ``routing.*``, ``backends[].models`` and ``backends[].max_in_flight``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ntonix.config import BackendConfig, ConfigError, RoutingConfig, build_config, from_jsonable, to_jsonable

BASE: dict[str, Any] = {"server": {"ssl_port": 0}, "backends": [{"host": "127.0.0.1", "port": 8001}]}


def build(**parts: Any) -> Any:
    return build_config({**BASE, **parts}, check_files=False)


def error(**parts: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build(**parts)
    return str(info.value)


def test_defaults() -> None:
    cfg = build()
    assert cfg.routing == RoutingConfig()
    assert cfg.routing.policy == "round_robin"
    assert cfg.routing.queue_timeout_s == 30.0
    assert cfg.backends == (BackendConfig("127.0.0.1", 8001, 1, None, 0),)


def test_backend_models_and_limit() -> None:
    cfg = build(backends=[{"host": "a", "port": 1, "models": ["m1", "m2"], "max_in_flight": 4},
                          {"host": "b", "port": 2, "models": []}])
    assert cfg.backends[0].models == ("m1", "m2")
    assert cfg.backends[0].max_in_flight == 4
    assert cfg.backends[1].models == ()  # an explicit empty list: serves nothing (drained of models)
    assert cfg.backends[1].max_in_flight == 0


def test_round_trip_through_jsonable_keeps_absent_models_absent() -> None:
    cfg = build(backends=[{"host": "a", "port": 1, "models": ["m"], "max_in_flight": 2}, {"host": "b", "port": 2}],
                routing={"policy": "prefix", "prefix_block_chars": 128})
    again = from_jsonable(json.loads(json.dumps(to_jsonable(cfg))))  # as ntonix/config/handover.py hands it over
    assert again.backends == cfg.backends
    assert again.backends[1].models is None
    assert again.routing == cfg.routing


@pytest.mark.parametrize(("parts", "key", "what"), [
    ({"routing": {"policy": "random"}}, "routing.policy", "round_robin, least_requests, prefix"),
    ({"routing": {"queue_timeout_s": -1}}, "routing.queue_timeout_s", ">= 0"),
    ({"routing": {"prefix_block_chars": 8}}, "routing.prefix_block_chars", ">= 16"),
    ({"routing": {"prefix_balance_factor": 0.5}}, "routing.prefix_balance_factor", ">= 1"),
    ({"routing": {"prefix_load_blocks": -1}}, "routing.prefix_load_blocks", ">= 0"),
    ({"routing": {"prefix_index_entries": 10}}, "routing.prefix_index_entries", ">= 1024"),
    ({"routing": {"sticky": True}}, "routing.sticky", "unknown key"),
    ({"backends": [{"host": "a", "port": 1, "models": "m1"}]}, "backends[0].models", "list of strings"),
    ({"backends": [{"host": "a", "port": 1, "models": ["m", ""]}]}, "backends[0].models", "must not be empty"),
    ({"backends": [{"host": "a", "port": 1, "max_in_flight": -1}]}, "backends[0].max_in_flight", ">= 0"),
    ({"backends": [{"host": "a", "port": 1, "max_in_flight": "3"}]}, "backends[0].max_in_flight", "integer"),
])
def test_errors_name_the_key(parts: dict[str, Any], key: str, what: str) -> None:
    message = error(**parts)
    assert message.startswith(f"{key}:"), message
    assert what in message, message


def test_environment_variables() -> None:
    from ntonix.config import load_config

    env = {"NTONIX_BACKENDS": "127.0.0.1:8001,127.0.0.1:8002:3", "NTONIX_SSL_PORT": "0",
           "NTONIX_ROUTING_POLICY": "least_requests", "NTONIX_ROUTING_QUEUE_TIMEOUT_S": "2.5",
           "NTONIX_ROUTING_PREFIX_LOAD_BLOCKS": "4"}
    cfg = load_config({}, config_path="", environ=env, check_files=False)
    assert cfg.routing.policy == "least_requests"
    assert cfg.routing.queue_timeout_s == 2.5
    assert cfg.routing.prefix_load_blocks == 4
    # NTONIX_BACKENDS keeps its format: no models (learned) and no limit.
    assert [(b.address, b.weight, b.models, b.max_in_flight) for b in cfg.backends] == [
        ("127.0.0.1:8001", 1, None, 0), ("127.0.0.1:8002", 3, None, 0)]


def test_bad_policy_from_environment_names_the_key() -> None:
    from ntonix.config import load_config

    with pytest.raises(ConfigError, match=r"^routing\.policy: must be one of"):
        load_config({}, config_path="", environ={"NTONIX_BACKENDS": "a:1", "NTONIX_SSL_PORT": "0",
                                                 "NTONIX_ROUTING_POLICY": "fastest"}, check_files=False)
