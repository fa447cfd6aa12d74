"""The native scale-out topology (tools/scaleout.py, scripts/scaleout, docs/scale-out.md): two
gateways behind HAProxy in TCP mode share one Redis. Needs haproxy and redis-server (scripts/test
installs both)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live.procs import ROOT, http
from tools.scaleout import Topology, haproxy_config

pytestmark = [pytest.mark.integration, pytest.mark.redis]


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with Topology(gateways=2, workers=1) as t:
        yield t


def chat(content: str) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": content}]}


def requests_total(url: str) -> int:
    status, _, body = http("GET", url + "/metrics")
    assert status == 200
    return int(json.loads(body)["requests_total"])


def test_an_answer_stored_by_one_gateway_is_a_hit_on_the_other(topo: Topology) -> None:
    a, b = topo.gateway_urls
    body = chat(f"shared {uuid.uuid4()}")
    status, headers, first = http("POST", a + "/v1/chat/completions", body=body)
    assert (status, headers["x-cache"]) == (200, "MISS")
    status, headers, second = http("POST", b + "/v1/chat/completions", body=body)
    assert (status, headers["x-cache"], second) == (200, "HIT", first)


def test_the_balancer_spreads_connections_over_both_gateways(topo: Topology) -> None:
    before = [requests_total(u) for u in topo.gateway_urls]
    body = chat(f"balanced {uuid.uuid4()}")
    caches = []
    for _ in range(6):  # one connection each: HAProxy's round robin alternates
        status, headers, _ = http("POST", topo.lb_url + "/v1/chat/completions", body=body)
        assert status == 200
        caches.append(headers["x-cache"])
    served = [requests_total(u) - b for u, b in zip(topo.gateway_urls, before, strict=True)]
    assert all(n >= 3 for n in served), served  # /metrics itself is not counted twice here
    assert caches.count("MISS") == 1, caches


def test_the_haproxy_config_grows_with_the_gateways() -> None:
    text = haproxy_config(3)
    assert [line.split()[1] for line in text.splitlines() if line.strip().startswith("server ")] == [
        "gateway-1", "gateway-2", "gateway-3"]
    assert '"${LB_GATEWAY_3}"' in text and "mode tcp" in text


def test_the_script_explains_itself() -> None:
    out = subprocess.run([sys.executable, "-m", "tools.scaleout", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert "--gateways" in out and "HAProxy" in out
