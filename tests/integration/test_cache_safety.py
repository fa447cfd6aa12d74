"""Cache safety through a live gateway (issue #12, INTERFACE.md "Cache"): credential
partitions, exact LRU order, answers larger than ``cache.max_entry_bytes`` (never held whole
in memory, coalesced or not), endless streams, and a full cache disk.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.fixtures import Gateway, GatewayFactory, MockBackend, MockBackendFactory
from tests.integration.test_cache import backend_calls, chat_body, post

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("s")


@pytest.fixture(scope="module")
def gw(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], workers=2, config={"cache": {"partition_headers": ["X-Tenant"]}})


# ----------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("header", ["X-Api-Key", "Api-Key", "Cookie", "X-Tenant"])
def test_each_credential_is_a_partition_and_none_is_another(gw: Gateway, mock: MockBackend, header: str) -> None:
    body = chat_body(f"cred {uuid.uuid4()}")
    before = backend_calls(mock)
    answers = []
    for headers in ({header: "secret-a"}, {header: "secret-b"}, {}):
        s, h, answer = post(gw, body, headers)
        assert (s, h["x-cache"]) == (200, "MISS"), (header, headers, h)
        answers.append(answer)
    assert backend_calls(mock) == before + 3
    assert len(set(answers)) == 3  # the mock numbers its answers: three backend calls, three answers
    for headers, answer in zip(({header: "secret-a"}, {header: "secret-b"}, {}), answers, strict=True):
        s, h, again = post(gw, body, headers)
        assert (s, h["x-cache"], again) == (200, "HIT", answer), (header, headers)
    assert backend_calls(mock) == before + 3
    assert "secret-a" not in gw.output()  # never logged, never kept


# ----------------------------------------------------------------------------- exact LRU


def test_lru_is_exact_even_within_milliseconds(mock: MockBackend, gateway: GatewayFactory) -> None:
    """Store A, B, C; read A; store D: B (the least recently used) goes, however close together
    it all happens. ~124 KB answers, 0.4 MiB: three fit, four do not, and each worker's L1
    (a quarter of the bound) holds none, so every lookup is L2's verdict."""
    gw1 = gateway([mock], workers=2, config={"cache": {"max_size_mb": 0.4}})
    headers = {"X-Mock-Tokens": "15000"}
    a, b, c, d = (chat_body() for _ in range(4))
    started = time.perf_counter()
    answers = {}
    for name, body in (("A", a), ("B", b), ("C", c)):
        s, h, answers[name] = post(gw1, body, headers)
        assert (s, h["x-cache"]) == (200, "MISS")
    s, h, again = post(gw1, a, headers)
    assert (h["x-cache"], again) == ("HIT", answers["A"]), (len(again), gw1.cache_stats())
    assert post(gw1, d, headers)[1]["x-cache"] == "MISS"
    elapsed = time.perf_counter() - started
    stats = gw1.cache_stats()
    assert (stats["entries"], stats["evictions"]) == (3, 1), stats
    assert stats["size_bytes"] <= stats["max_size_bytes"] < 4 * stats["size_bytes"] / 3, stats  # 3 fit, not 4
    before = backend_calls(mock)
    for name, body in (("A", a), ("C", c), ("D", d)):
        assert post(gw1, body, headers)[1]["x-cache"] == "HIT", f"{name} was evicted"
    assert backend_calls(mock) == before
    assert post(gw1, b, headers)[1]["x-cache"] == "MISS", "B, the least recently used, was kept"
    assert elapsed < 2.0, elapsed  # no waiting for a recency interval
