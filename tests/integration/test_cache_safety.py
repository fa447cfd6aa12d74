"""Cache safety through a live gateway (issue #12, INTERFACE.md "Cache"): credential
partitions, exact LRU order, answers larger than ``cache.max_entry_bytes`` (never held whole
in memory, coalesced or not), endless streams, and a full cache disk.
"""

from __future__ import annotations

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
