"""Shared fixtures for live tests: mock backends, gateways and Redis as child processes.

    def test_round_robin(mock_backend, gateway):
        a, b = mock_backend("a"), mock_backend("b")
        gw = gateway([a, (b, 3)], config={"health": {"interval_s": 0.2}})
        status, headers, body = gw.request("POST", "/v1/chat/completions", {...})

Everything runs on free 127.0.0.1 ports and is stopped by PID at teardown. The classes live in
``tests/live/servers.py``; the process helpers in ``tests/live/procs.py``.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import settings

from tests.live.servers import Gateway, GatewayFactory, MockBackendFactory, RedisServer

# scripts/test --fast: few examples per property (HYPOTHESIS_PROFILE=fast); the full run keeps them all.
settings.register_profile("fast", max_examples=20)
if os.environ.get("HYPOTHESIS_PROFILE") == "fast":
    settings.load_profile("fast")

# A developer's NTONIX_* variables (or a multiprocess metrics dir) must not leak into the
# gateways the tests start: they would override the config files the tests write.
_LEAKY_ENV = ("NTONIX_", "PROMETHEUS_MULTIPROC_DIR")


@pytest.fixture(autouse=True, scope="session")
def _clean_environment() -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith(_LEAKY_ENV)}
    for key in saved:
        del os.environ[key]
    yield
    os.environ.update(saved)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Remember each phase's report so fixture teardown can tell whether the test failed.
    rep = yield
    setattr(item, f"_rep_{rep.when}", rep)
    return rep


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"_rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


def _print_gateway_logs(gateways: list[Gateway]) -> None:
    for gw in gateways:
        print(f"\n----- {gw!r} output (config {gw.config_path}) -----\n{gw.output()[-8000:]}")


# ----------------------------------------------------------------------------- mock backends


@pytest.fixture
def mock_backend() -> Iterator[MockBackendFactory]:
    """Factory: ``mock_backend(name=None, ttft=0.0, token_delay=0.0, extra_args=(), port=None)``
    starts ``python -m mock_llm`` and returns a ``MockBackend`` (``.port .url .address .name
    .stats() .control(**settings) .reset() .stop() .start() .pause() .resume() .proc``).
    Names default to b1, b2, ... All are stopped at teardown."""
    factory = MockBackendFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def mock_backend_module() -> Iterator[MockBackendFactory]:
    """``mock_backend`` for a whole module (call ``.reset()`` between tests as needed)."""
    factory = MockBackendFactory()
    yield factory
    factory.close()


# ----------------------------------------------------------------------------- gateways


@pytest.fixture
def gateway(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[GatewayFactory]:
    """Factory: ``gateway(backends=(), config=None, workers=1, ssl=False, env=None, extra_args=(),
    ca=None, wait=True)`` writes ``<tmp>/gateway-N/ntonix.json`` and starts
    ``python -m ntonix --config`` it; returns a ``Gateway`` once GET /health answers.

    ``backends``: ``MockBackend``s, ``"host:port[:weight]"`` strings, config dicts, or
    ``(backend, weight)`` tuples. ``config`` is deep-merged over the defaults (server.host
    127.0.0.1 on free ports, HTTPS off unless ``ssl=True``, a fresh ``cache.dir``,
    ``logging.level`` info). Stopped (TERM, then KILL) at teardown; logs printed if the test failed.
    """
    factory = GatewayFactory(tmp_path)
    yield factory
    stopped = factory.close()
    if _failed(request):
        _print_gateway_logs(stopped)


@pytest.fixture(scope="module")
def gateway_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    """``gateway`` for a whole module."""
    factory = GatewayFactory(tmp_path_factory.mktemp("gateways"))
    yield factory
    factory.close()


@pytest.fixture
def tls_ca() -> trustme.CA:
    """A fresh trustme CA, e.g. to issue SNI certificates (``tests.live.servers.write_cert``)
    before ``gateway(..., ssl=True, ca=tls_ca)``."""
    return trustme.CA()


# ----------------------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One ``redis-server`` for the session: ``.url .port .stop() .start() .flush() .ping()``.
    Fails (does not skip) when redis-server is not installed: scripts/test installs it."""
    try:
        server = RedisServer()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.close()


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> RedisServer:
    """``redis_server`` running (restarted if an outage test left it down) and emptied."""
    redis_server.start()
    redis_server.flush()
    return redis_server
