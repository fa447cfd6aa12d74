"""Configuration: defaults < file < environment < command line, and every validation error.

Plain values only: temp JSON files, explicit ``environ`` dicts and argv lists through the
real argparse parser; no process, no socket.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ntonix.__main__ import cli_layer, parser
from ntonix.config import (
    SECTIONS,
    BackendConfig,
    Config,
    ConfigError,
    env_name,
    from_jsonable,
    leaf_keys,
    load_config,
    parse_backends,
    to_jsonable,
)

ROOT = Path(__file__).resolve().parents[3]
SEED = {
    "server": {"port": 8080, "ssl_port": 8443, "threads": 4},
    "backends": [{"host": "localhost", "port": 8001, "weight": 1},
                 {"host": "localhost", "port": 8002, "weight": 1}],
    "cache": {"enabled": True, "max_size_mb": 512, "ttl_seconds": 3600},
    "ssl": {"cert_file": "server.crt", "key_file": "server.key"},
}
# A valid base for tests that do not care about HTTPS: no certificate files needed.
PLAIN = {"server": {"ssl_port": 0}, "backends": [{"host": "127.0.0.1", "port": 8001}]}


def write(folder: Path, data: Any, name: str = "ntonix.json") -> str:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def load(tmp_path: Path, data: Any = None, env: dict[str, str] | None = None, argv: list[str] | None = None,
         check_files: bool = True) -> Config:
    path = write(tmp_path, PLAIN if data is None else data)
    return load_config(cli(argv or []), config_path=path, environ=env or {}, check_files=check_files)


def cli(argv: list[str]) -> dict[str, Any]:
    return cli_layer(parser().parse_args(argv))


def error_of(tmp_path: Path, data: Any = None, env: dict[str, str] | None = None,
             argv: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data, env, argv)
    message = str(info.value)
    assert "\n" not in message, "a config error is one line"
    return message


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(PLAIN))
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


# ----------------------------------------------------------------------------- seed schema and defaults


def test_seed_schema_loads_unchanged(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("cert")
    (tmp_path / "server.key").write_text("key")
    cfg = load(tmp_path, SEED)
    assert (cfg.server.port, cfg.server.ssl_port, cfg.server.threads) == (8080, 8443, 4)
    assert cfg.backends == (BackendConfig("localhost", 8001, 1), BackendConfig("localhost", 8002, 1))
    assert (cfg.cache.enabled, cfg.cache.max_size_mb, cfg.cache.ttl_seconds) == (True, 512, 3600)
    # Relative certificate paths are taken from the config file's folder.
    assert cfg.ssl.cert_file == str(tmp_path / "server.crt")
    assert cfg.ssl.key_file == str(tmp_path / "server.key")
    assert cfg.source == str(tmp_path / "ntonix.json")


def test_shipped_conf_is_the_seed_schema() -> None:
    shipped = json.loads((ROOT / "conf" / "ntonix.json").read_text())
    assert shipped == SEED
    cfg = load_config({}, config_path=str(ROOT / "conf" / "ntonix.json"), environ={}, check_files=False)
    assert cfg.server.threads == 4
    assert cfg.ssl.cert_file == str(ROOT / "conf" / "server.crt")


def test_every_key_has_a_default(tmp_path: Path) -> None:
    cfg = load(tmp_path, {"backends": [{"host": "h", "port": 1}], "server": {"ssl_port": 0}})
    defaults = Config()
    for section in SECTIONS:
        if section in ("server", "ssl"):
            continue
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert cfg.ssl.cert_file == str(tmp_path / "server.crt")  # the default, next to the config file
    assert cfg.ssl.sni == {}
    assert cfg.server.port == 8080
    assert cfg.backends[0].weight == 1
    assert cfg.proxy.max_body_bytes == 10 * 1024 * 1024
    assert cfg.pool.size == 10
    assert cfg.server.graceful_timeout_s == 30


def test_interface_keys_exist() -> None:
    keys = {f"{s}.{k}" for s, k, _, _ in leaf_keys()}
    for key in (
        "server.host", "server.port", "server.ssl_port", "server.threads", "server.graceful_timeout_s",
        "proxy.connect_timeout_s", "proxy.read_timeout_s", "proxy.retries", "proxy.max_body_bytes",
        "pool.size", "pool.max_size", "pool.idle_timeout_s",
        "health.path", "health.interval_s", "health.timeout_s", "health.unhealthy_threshold",
        "health.healthy_threshold", "circuit_breaker.failure_threshold", "circuit_breaker.cooldown_s",
        "cache.enabled", "cache.max_size_mb", "cache.ttl_seconds", "cache.redis_url",
        "ssl.cert_file", "ssl.key_file", "ssl.sni", "logging.level", "logging.format",
        "metrics.statsd_host", "metrics.statsd_port", "metrics.statsd_prefix",
    ):
        assert key in keys, key


def test_workers_alias(tmp_path: Path) -> None:
    cfg = load(tmp_path, merged({"server": {"workers": 3}}))
    assert cfg.server.threads == 3


def test_jsonable_round_trip(tmp_path: Path) -> None:
    (tmp_path / "a.crt").write_text("c")
    (tmp_path / "a.key").write_text("k")
    cfg = load(tmp_path, merged({"server": {"ssl_port": 8443},
                                 "ssl": {"cert_file": "a.crt", "key_file": "a.key",
                                         "sni": {"*.example.com": {"cert_file": "a.crt", "key_file": "a.key"}}},
                                 "proxy": {"trusted_proxies": ["10.0.0.0/8"]}}))
    assert from_jsonable(json.loads(json.dumps(to_jsonable(cfg)))) == cfg


# ----------------------------------------------------------------------------- precedence


def test_file_overrides_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, merged({"server": {"port": 9001}, "proxy": {"read_timeout_s": 7}}))
    assert cfg.server.port == 9001
    assert cfg.proxy.read_timeout_s == 7.0
    assert cfg.proxy.connect_timeout_s == 5.0  # untouched keys keep their default


def test_env_overrides_file(tmp_path: Path) -> None:
    env = {"NTONIX_PORT": "9002", "NTONIX_PROXY_READ_TIMEOUT_S": "3.5", "NTONIX_CACHE_ENABLED": "false",
           "NTONIX_LOG_LEVEL": "debug", "NTONIX_WORKERS": "5", "NTONIX_SSL_PORT": "0"}
    cfg = load(tmp_path, merged({"server": {"port": 9001, "threads": 2, "ssl_port": 8443}}), env)
    assert cfg.server.port == 9002
    assert cfg.server.ssl_port == 0
    assert cfg.server.threads == 5
    assert cfg.proxy.read_timeout_s == 3.5
    assert cfg.cache.enabled is False
    assert cfg.logging.level == "debug"


def test_cli_overrides_env(tmp_path: Path) -> None:
    env = {"NTONIX_PORT": "9002", "NTONIX_WORKERS": "5", "NTONIX_LOG_LEVEL": "debug",
           "NTONIX_BACKENDS": "10.0.0.1:1000"}
    argv = ["--port", "9003", "--workers", "6", "--log-level", "error", "--backends", "10.0.0.2:2000:4",
            "--ssl-port", "0"]
    cfg = load(tmp_path, merged({"server": {"port": 9001}}), env, argv)
    assert cfg.server.port == 9003
    assert cfg.server.threads == 6
    assert cfg.logging.level == "error"
    assert cfg.backends == (BackendConfig("10.0.0.2", 2000, 4),)


def test_cli_workers_beats_env_alias(tmp_path: Path) -> None:
    # The file names server.threads, the environment the alias; the command line still wins.
    cfg = load(tmp_path, merged({"server": {"threads": 2}}), {"NTONIX_SERVER_WORKERS": "5"}, ["--workers", "7"])
    assert cfg.server.threads == 7
    cfg = load(tmp_path, merged({"server": {"threads": 2}}), {"NTONIX_SERVER_WORKERS": "5"})
    assert cfg.server.threads == 5


def test_each_layer_only_overrides_what_it_names(tmp_path: Path) -> None:
    env = {"NTONIX_HEALTH_INTERVAL_S": "0.5"}
    cfg = load(tmp_path, merged({"health": {"path": "/ready", "interval_s": 2}}), env, ["--port", "9100"])
    assert cfg.health.path == "/ready"
    assert cfg.health.interval_s == 0.5
    assert cfg.server.port == 9100


def test_env_backends_replace_file_backends(tmp_path: Path) -> None:
    env = {"NTONIX_BACKENDS": "a:1, b:2:3"}
    cfg = load(tmp_path, merged({"backends": [{"host": "x", "port": 9}, {"host": "y", "port": 10}]}), env)
    assert cfg.backends == (BackendConfig("a", 1, 1), BackendConfig("b", 2, 3))


def test_every_leaf_key_has_an_environment_variable(tmp_path: Path) -> None:
    # NTONIX_<SECTION>_<KEY> is accepted for every leaf key (the value may still be invalid).
    for section, key, _, _ in leaf_keys():
        if (section, key) == ("ssl", "sni"):
            continue
        name = env_name(section, key)
        try:
            load(tmp_path, env={name: "1"}, check_files=False)
        except ConfigError as exc:
            assert "unknown configuration variable" not in str(exc), name


def test_ntonix_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, merged({"server": {"port": 9111}}), "other.json")
    cfg = load_config({}, config_path=None, environ={"NTONIX_CONFIG": path})
    assert cfg.server.port == 9111
    assert cfg.source == path


def test_config_option_beats_ntonix_config(tmp_path: Path) -> None:
    a = write(tmp_path, merged({"server": {"port": 9111}}), "a.json")
    b = write(tmp_path, merged({"server": {"port": 9222}}), "b.json")
    args = parser().parse_args(["--config", b])
    cfg = load_config(cli_layer(args), config_path=args.config, environ={"NTONIX_CONFIG": a})
    assert cfg.server.port == 9222


# ----------------------------------------------------------------------------- NTONIX_BACKENDS


def test_parse_backends_forms() -> None:
    assert parse_backends("localhost:8001,localhost:8002:3") == [
        {"host": "localhost", "port": 8001}, {"host": "localhost", "port": 8002, "weight": 3}]
    assert parse_backends(" 10.0.0.1:80 , [::1]:8001:2 ,[fe80::1]:9000") == [
        {"host": "10.0.0.1", "port": 80}, {"host": "::1", "port": 8001, "weight": 2},
        {"host": "fe80::1", "port": 9000}]


def test_ipv6_backend_from_env(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={"NTONIX_BACKENDS": "[::1]:8001:2,127.0.0.1:8002"})
    assert cfg.backends == (BackendConfig("::1", 8001, 2), BackendConfig("127.0.0.1", 8002, 1))
    assert cfg.backends[0].address == "[::1]:8001"


@pytest.mark.parametrize("text", ["localhost", "localhost:", "::1:8001", "[::1]", "host:port", "a:1:2:3", ",", ""])
def test_bad_backends_list_names_the_variable(tmp_path: Path, text: str) -> None:
    message = error_of(tmp_path, env={"NTONIX_BACKENDS": text})
    assert message.startswith("NTONIX_BACKENDS"), message


def test_bad_backends_option_names_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--backends"):
        cli(["--backends", "nope"])


def test_backends_weight_zero_from_env(tmp_path: Path) -> None:
    message = error_of(tmp_path, env={"NTONIX_BACKENDS": "a:1,b:2:0"})
    assert message.startswith("backends[1].weight"), message


# ----------------------------------------------------------------------------- relative paths


def test_relative_paths_are_taken_from_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "certs").mkdir(parents=True)
    for name in ("a.crt", "a.key", "b.crt", "b.key"):
        (conf / "certs" / name).write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "logs").mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    cfg = load(conf, merged({
        "server": {"ssl_port": 8443},
        "ssl": {"cert_file": "certs/a.crt", "key_file": "certs/a.key",
                "sni": {"b.test": {"cert_file": "certs/b.crt", "key_file": "certs/b.key"}}},
        "cache": {"dir": "cache"}, "logging": {"file": "../logs/ntonix.log"},
    }))
    assert cfg.ssl.cert_file == str(conf / "certs" / "a.crt")
    assert cfg.ssl.key_file == str(conf / "certs" / "a.key")
    assert cfg.ssl.sni["b.test"].cert_file == str(conf / "certs" / "b.crt")
    assert cfg.cache.dir == str(conf / "cache")
    assert cfg.logging.file == str(tmp_path / "logs" / "ntonix.log")


def test_default_certificate_files_are_next_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    monkeypatch.chdir(tmp_path)  # the working directory holds no certificate
    message = error_of(conf, merged({"server": {"ssl_port": 8443}}))
    assert message.startswith(f"ssl.cert_file: file not found: {conf / 'server.crt'} (")
    assert "scripts/gen_dev_cert.py" in message and "NTONIX_SSL_PORT=0" in message  # what to do about it
    (conf / "server.crt").write_text("x")
    (conf / "server.key").write_text("x")
    cfg = load(conf, merged({"server": {"ssl_port": 8443}}))
    assert (cfg.ssl.cert_file, cfg.ssl.key_file) == (str(conf / "server.crt"), str(conf / "server.key"))


def test_paths_from_the_environment_are_not_moved(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={"NTONIX_SSL_CERT_FILE": "rel/a.crt"}, check_files=False)
    assert cfg.ssl.cert_file == "rel/a.crt"


def test_absolute_paths_stay(tmp_path: Path) -> None:
    crt, key = tmp_path / "abs.crt", tmp_path / "abs.key"
    crt.write_text("x")
    key.write_text("x")
    sub = tmp_path / "sub"
    sub.mkdir()
    cfg = load(sub, merged({"server": {"ssl_port": 8443}, "ssl": {"cert_file": str(crt), "key_file": str(key)}}))
    assert cfg.ssl.cert_file == str(crt)


# ----------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(("change", "key", "what"), [
    ({"bogus": {}}, "bogus", "unknown section"),
    ({"server": {"bogus": 1}}, "server.bogus", "unknown key"),
    ({"proxy": {"read_timeout": 1}}, "proxy.read_timeout", "unknown key"),
    ({"server": {"port": "8080"}}, "server.port", "must be an integer"),
    ({"server": {"port": 8080.5}}, "server.port", "must be an integer"),
    ({"server": {"port": True}}, "server.port", "must be an integer"),
    ({"server": {"port": 0}}, "server.port", "1-65535"),
    ({"server": {"port": 70000}}, "server.port", "1-65535"),
    ({"server": {"ssl_port": -1}}, "server.ssl_port", "0-65535"),
    ({"server": {"ssl_port": 65536}}, "server.ssl_port", "0-65535"),
    ({"server": {"port": 9000, "ssl_port": 9000}}, "server.ssl_port", "must differ"),
    ({"server": {"threads": 0}}, "server.threads", ">= 1"),
    ({"server": {"workers": 0}}, "server.threads", ">= 1"),
    ({"server": []}, "server", "must be an object"),
    ({"cache": {"enabled": "yes"}}, "cache.enabled", "must be a boolean"),
    ({"cache": {"max_size_mb": "big"}}, "cache.max_size_mb", "must be a number"),
    ({"cache": {"redis_url": "http://x"}}, "cache.redis_url", "redis://"),
    ({"cache": {"redis_url": "redis://127.0.0.1:6379/abc"}}, "cache.redis_url", "database"),
    ({"cache": {"redis_url": "redis://127.0.0.1:99999/0"}}, "cache.redis_url", "port"),
    ({"cache": {"redis_url": "redis://:secret@127.0.0.1:x/0"}}, "cache.redis_url", "***@"),  # never the password
    ({"cache": {"redis_url": "redis://"}}, "cache.redis_url", "host"),
    ({"cache": {"redis_url": "unix://"}}, "cache.redis_url", "path"),
    ({"cache": {"max_entry_bytes": 0}}, "cache.max_entry_bytes", ">= 1"),
    ({"cache": {"partition_headers": ["X Tenant"]}}, "cache.partition_headers[0]", "header name"),
    ({"cache": {"partition_headers": "X-Tenant"}}, "cache.partition_headers", "list of strings"),
    ({"proxy": {"read_timeout_s": 0}}, "proxy.read_timeout_s", ">="),
    ({"proxy": {"retries": -1}}, "proxy.retries", ">= 0"),
    ({"proxy": {"max_body_bytes": -5}}, "proxy.max_body_bytes", ">= 0"),
    ({"proxy": {"trusted_proxies": ["not-an-ip"]}}, "proxy.trusted_proxies[0]", "not an IP"),
    ({"proxy": {"trusted_proxies": "10.0.0.1"}}, "proxy.trusted_proxies", "list of strings"),
    ({"pool": {"size": 0}}, "pool.size", ">= 1"),
    ({"pool": {"size": 10, "max_size": 5}}, "pool.max_size", ">= pool.size"),
    ({"health": {"path": "health"}}, "health.path", "start with '/'"),
    ({"health": {"interval_s": 0}}, "health.interval_s", ">="),
    ({"health": {"unhealthy_threshold": 0}}, "health.unhealthy_threshold", ">= 1"),
    ({"circuit_breaker": {"failure_threshold": 0}}, "circuit_breaker.failure_threshold", ">= 1"),
    ({"logging": {"level": "verbose"}}, "logging.level", "debug, info, warning, error"),
    ({"logging": {"format": "xml"}}, "logging.format", "json or text"),
    ({"metrics": {"statsd_port": 0}}, "metrics.statsd_port", "1-65535"),
    ({"backends": []}, "backends", "no backends"),
    ({"backends": {"host": "a", "port": 1}}, "backends", "must be a list"),
    ({"backends": ["a:1"]}, "backends[0]", "must be an object"),
    ({"backends": [{"host": "a", "port": 1, "weight": 0}]}, "backends[0].weight", "must be >= 1, got 0"),
    ({"backends": [{"host": "a", "port": 1}, {"host": "b", "port": 2, "weight": 0}]}, "backends[1].weight",
     "must be >= 1, got 0"),
    ({"backends": [{"host": "a", "port": 1, "weight": "2"}]}, "backends[0].weight", "must be an integer"),
    ({"backends": [{"host": "a", "port": 0}]}, "backends[0].port", "1-65535"),
    ({"backends": [{"host": "a", "port": 65536}]}, "backends[0].port", "1-65535"),
    ({"backends": [{"host": "a"}]}, "backends[0].port", "missing"),
    ({"backends": [{"port": 1}]}, "backends[0].host", "missing"),
    ({"backends": [{"host": "", "port": 1}]}, "backends[0].host", "empty"),
    ({"backends": [{"host": "a", "port": 1, "wieght": 2}]}, "backends[0].wieght", "unknown key"),
    ({"backends": [{"host": "a", "port": 1}, {"host": "a", "port": 1}]}, "backends[1]", "duplicate"),
    ({"ssl": {"sni": {"bad name!": {"cert_file": "a", "key_file": "b"}}}}, "ssl.sni", "host name"),
    ({"ssl": {"sni": {"a.test": {"cert_file": "a"}}}}, "ssl.sni", "cert_file"),
])
def test_file_errors_name_the_key(tmp_path: Path, change: dict[str, Any], key: str, what: str) -> None:
    message = error_of(tmp_path, merged(change))
    assert message.startswith(f"{key}:") or message.startswith(f"{key}["), message
    assert what in message, message


def test_no_backends_at_all(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"server": {"ssl_port": 0}})
    assert message.startswith("backends:"), message


def test_missing_certificate_when_https_is_on(tmp_path: Path) -> None:
    message = error_of(tmp_path, merged({"server": {"ssl_port": 8443}, "ssl": {"cert_file": "nope.crt"}}))
    assert message.startswith("ssl.cert_file:"), message
    assert "nope.crt" in message
    (tmp_path / "server.crt").write_text("x")
    message = error_of(tmp_path, merged({"server": {"ssl_port": 8443}, "ssl": {"cert_file": "server.crt"}}))
    assert message.startswith("ssl.key_file:"), message


def test_missing_sni_certificate(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("x")
    (tmp_path / "server.key").write_text("x")
    message = error_of(tmp_path, merged({"server": {"ssl_port": 8443},
                                         "ssl": {"cert_file": "server.crt", "key_file": "server.key",
                                                 "sni": {"a.test": {"cert_file": "a.crt", "key_file": "a.key"}}}}))
    assert message.startswith("ssl.sni['a.test'].cert_file:"), message


def test_certificates_not_needed_without_https(tmp_path: Path) -> None:
    cfg = load(tmp_path, merged({"ssl": {"cert_file": "nope.crt", "key_file": "nope.key"}}))
    assert cfg.server.ssl_port == 0


@pytest.mark.parametrize(("env", "key"), [
    ({"NTONIX_BOGUS": "1"}, "NTONIX_BOGUS"),
    ({"NTONIX_SERVER_BOGUS": "1"}, "NTONIX_SERVER_BOGUS"),
    ({"NTONIX_PORT": "http"}, "server.port"),
    ({"NTONIX_PORT": "70000"}, "server.port"),
    ({"NTONIX_SSL_PORT": "-1"}, "server.ssl_port"),
    ({"NTONIX_WORKERS": "many"}, "server.threads"),
    ({"NTONIX_LOG_LEVEL": "loud"}, "logging.level"),
    ({"NTONIX_CACHE_ENABLED": "maybe"}, "cache.enabled"),
    ({"NTONIX_CACHE_TTL_SECONDS": "soon"}, "cache.ttl_seconds"),
    ({"NTONIX_PROXY_MAX_BODY_BYTES": "1.5"}, "proxy.max_body_bytes"),
])
def test_env_errors_name_the_key(tmp_path: Path, env: dict[str, str], key: str) -> None:
    message = error_of(tmp_path, env=env)
    assert message.startswith(f"{key}:"), message


def test_unknown_variable_message(tmp_path: Path) -> None:
    assert error_of(tmp_path, env={"NTONIX_PROT": "80"}) == "NTONIX_PROT: unknown configuration variable"


def test_other_variables_are_ignored(tmp_path: Path) -> None:
    cfg = load(tmp_path, env={"PATH": "/bin", "NTONIXFOO": "1", "_NTONIX_RUN_DIR": "/tmp/x", "NTONIX_CONFIG": "x"})
    assert cfg.server.port == 8080


@pytest.mark.parametrize(("argv", "key"), [
    (["--port", "0"], "server.port"),
    (["--port", "eighty"], "server.port"),
    (["--ssl-port", "99999"], "server.ssl_port"),
    (["--workers", "0"], "server.threads"),
    (["--log-level", "trace"], "logging.level"),
])
def test_cli_errors_name_the_key(tmp_path: Path, argv: list[str], key: str) -> None:
    message = error_of(tmp_path, argv=argv)
    assert message.startswith(f"{key}:"), message


@pytest.mark.parametrize(("content", "what"), [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ("\xff\xfe", "invalid JSON"),
    ('{"a":' * 100_000, "nested too deeply"),  # RecursionError: no traceback, exit 2 (HUP: kept)
    ('{"server": {"port": ' + "1" * 5000 + "}}", "invalid JSON"),  # int() digit limit
    ('{"server": {"port": 8080}, "server": {"port": 9090}}', "'server' given twice"),  # json kept the last
    ('{"server": {"port": 8080, "port": 9090}}', "'port' given twice"),
])
def test_bad_file(tmp_path: Path, content: str, what: str) -> None:
    path = tmp_path / "ntonix.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config({}, config_path=str(path), environ={})
    message = str(info.value)
    assert message.startswith("config file:") and what in message and "\n" not in message, message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file: not found: "):
        load_config({}, config_path=str(tmp_path / "absent.json"), environ={})


def test_logging_file_in_a_missing_or_unwritable_folder_is_a_config_error(tmp_path: Path) -> None:
    from ntonix.config import ConfigError, build_config

    base = {"server": {"ssl_port": 0}, "backends": [{"host": "127.0.0.1", "port": 8001}]}
    with pytest.raises(ConfigError, match=r"^logging\.file: folder does not exist"):
        build_config({**base, "logging": {"file": str(tmp_path / "nope" / "gw.log")}})
    assert build_config({**base, "logging": {"file": str(tmp_path / "gw.log")}}).logging.file
    assert (tmp_path / "gw.log").read_bytes() == b""  # tried: created empty, as nginx -t does


@pytest.mark.parametrize("where", ["folder", "proc"])
def test_a_logging_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path, where: str) -> None:
    # The audit: a folder (or, as root, a path under /proc) passed, then every worker died at
    # boot with a traceback (and on HUP, the next worker restart stopped the whole gateway).
    from ntonix.config import ConfigError, build_config

    base = {"server": {"ssl_port": 0}, "backends": [{"host": "127.0.0.1", "port": 8001}]}
    path = str(tmp_path) if where == "folder" else "/proc/ntonix-audit.log"
    with pytest.raises(ConfigError, match=r"^logging\.file: (is a folder|cannot write|folder not writable)"):
        build_config({**base, "logging": {"file": path}})


@pytest.mark.parametrize("key", ["max_bytes", "backup_count"])
def test_negative_log_rotation_figures_are_config_errors(key: str) -> None:
    from ntonix.config import ConfigError, build_config

    base = {"server": {"ssl_port": 0}, "backends": [{"host": "127.0.0.1", "port": 8001}]}
    with pytest.raises(ConfigError, match=rf"^logging\.{key}: "):
        build_config({**base, "logging": {key: -1}})


def test_cache_partition_headers_and_entry_bound_from_file_and_environment(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert (cfg.cache.partition_headers, cfg.cache.max_entry_bytes) == ((), 4 * 1024 * 1024)
    cfg = load(tmp_path, {**PLAIN, "cache": {"partition_headers": ["X-Tenant"], "max_entry_bytes": 1000}})
    assert (cfg.cache.partition_headers, cfg.cache.max_entry_bytes) == (("X-Tenant",), 1000)
    cfg = load(tmp_path, env={"NTONIX_CACHE_PARTITION_HEADERS": "X-Tenant, X-User",
                              "NTONIX_CACHE_MAX_ENTRY_BYTES": "2048"})
    assert (cfg.cache.partition_headers, cfg.cache.max_entry_bytes) == (("X-Tenant", "X-User"), 2048)


@pytest.mark.parametrize("argv", [["--bogus"], ["--port"], ["--config"], ["extra"]])
def test_a_bad_command_line_is_one_line_on_stderr_and_exit_2(argv: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from ntonix.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("ntonix: invalid configuration: command line: ") and err.count("\n") == 1, err


def test_a_listen_address_that_is_no_address_is_a_config_error() -> None:
    from ntonix.config import build_config
    from ntonix.server.hooks import check_for_start

    base = {"server": {"ssl_port": 0}, "backends": [{"host": "127.0.0.1", "port": 8001}]}
    for good in ("127.0.0.1", "::1", "0.0.0.0", "localhost"):
        check_for_start(build_config({**base, "server": {"ssl_port": 0, "host": good}}))
    with pytest.raises(ConfigError, match=r"^server\.host: not an address this host can listen on: 'not an address'"):
        check_for_start(build_config({**base, "server": {"ssl_port": 0, "host": "not an address"}}))
    with pytest.raises(ConfigError, match=r"^server\.host: must not be empty"):
        check_for_start(build_config({**base, "server": {"ssl_port": 0, "host": ""}}))
    # An address, but another host's (TEST-NET-1): gunicorn retried the bind for 5 s, then exit 1.
    with pytest.raises(ConfigError, match=r"^server\.host: .* '192\.0\.2\.1' \(Cannot assign requested address\)"):
        check_for_start(build_config({**base, "server": {"ssl_port": 0, "host": "192.0.2.1"}}))


def test_a_cache_dir_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    from ntonix.config import build_config

    base = {"server": {"ssl_port": 0}, "backends": [{"host": "127.0.0.1", "port": 8001}]}
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"^cache\.dir: cannot create .*Not a directory"):
        build_config({**base, "cache": {"dir": str(blocker / "cache")}})
    with pytest.raises(ConfigError, match=r"^cache\.dir: cannot create"):
        build_config({**base, "cache": {"dir": "/proc/ntonix-nonexistent/cache"}})
    # A folder still to be made is checked by making it, then left as it was.
    assert build_config({**base, "cache": {"dir": str(tmp_path / "a" / "b")}}).cache.dir
    assert not (tmp_path / "a").exists()
    # With the cache off, the folder is never used.
    assert not build_config({**base, "cache": {"enabled": False, "dir": str(blocker / "c")}}).cache.enabled


def test_one_key_by_two_names_must_agree(tmp_path: Path) -> None:
    env = {"NTONIX_BACKENDS": "127.0.0.1:8001", "NTONIX_SSL_PORT": "0"}
    with pytest.raises(ConfigError, match=r"^server\.port: set twice with different values, by NTONIX_PORT and "
                                          r"NTONIX_SERVER_PORT$"):
        load_config({}, config_path=None, environ={**env, "NTONIX_SERVER_PORT": "9001", "NTONIX_PORT": "9000"})
    same = load_config({}, environ={**env, "NTONIX_SERVER_PORT": "9000", "NTONIX_PORT": "9000"})
    assert same.server.port == 9000
    path = tmp_path / "ntonix.json"
    path.write_text('{"server": {"threads": 2, "workers": 3, "ssl_port": 0}, '
                    '"backends": [{"host": "127.0.0.1", "port": 8001}]}')
    with pytest.raises(ConfigError, match=r"^server\.threads: set twice with different values"):
        load_config({}, config_path=str(path), environ={})
    path.write_text('{"server": {"workers": 3, "ssl_port": 0}, "backends": [{"host": "127.0.0.1", "port": 8001}]}')
    assert load_config({}, config_path=str(path), environ={}).server.threads == 3
    assert load_config({}, config_path=str(path), environ={"NTONIX_SERVER_THREADS": "5"}).server.threads == 5
    assert load_config({}, config_path=str(path), environ={"NTONIX_WORKERS": "6"}).server.threads == 6


def test_sni_from_the_environment_as_json(tmp_path: Path) -> None:
    env = {"NTONIX_BACKENDS": "127.0.0.1:8001", "NTONIX_SSL_PORT": "0",
           "NTONIX_SSL_SNI": '{"api.example.com": {"cert_file": "a.crt", "key_file": "a.key"}}'}
    cfg = load_config({}, environ=env, check_files=False)
    assert cfg.ssl.sni["api.example.com"].cert_file == "a.crt"  # from the working folder
    with pytest.raises(ConfigError, match=r"^ssl\.sni: NTONIX_SSL_SNI must hold a JSON object"):
        load_config({}, environ={**env, "NTONIX_SSL_SNI": "api.example.com=a.crt"}, check_files=False)


def test_sni_names_that_differ_only_in_case_are_one_name() -> None:
    env = {"NTONIX_BACKENDS": "127.0.0.1:8001", "NTONIX_SSL_PORT": "0",
           "NTONIX_SSL_SNI": '{"A.test": {"cert_file": "a.crt", "key_file": "a.key"}, '
                             '"a.test": {"cert_file": "b.crt", "key_file": "b.key"}}'}
    with pytest.raises(ConfigError, match=r"^ssl\.sni\['a\.test'\]: the same host name as another entry"):
        load_config({}, environ=env, check_files=False)
