"""With ``routing.policy: prefix`` (``NTONIX_ROUTING_POLICY=prefix``), a conversation whose turns
reach two gateways alternately lands on one backend (INTERFACE.md "Several gateways", ADR 0009):
a new conversation's backend is the rendezvous hash of its first block, the same on every gateway
(ntonix/core/routing.py), and each gateway's index learns the others' assignments in the
background (ntonix/cluster/affinity.py, Runtime.share_routing).

The policy is wired into the request flow by the routing issue (#16, branch ``wire``); until that
is merged the gateways route round-robin, and this test is an expected failure that turns into an
error (strict) the day it passes: then drop the mark.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.integration.test_cache import post
from tests.live.servers import GatewayFactory, MockBackendFactory, RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.redis]

TURNS = 8


def test_a_conversations_turns_on_two_gateways_land_on_one_backend(
        mock_backend: MockBackendFactory, gateway: GatewayFactory, clean_redis: RedisServer) -> None:
    backends = [mock_backend(f"p{i}") for i in range(3)]
    env = {"NTONIX_ROUTING_POLICY": "prefix"}
    config = {"cache": {"redis_url": clean_redis.url}}
    a = gateway(backends, config=config, env=env)
    b = gateway(backends, config=config, env=env)
    landed = []
    for conversation in range(3):
        messages = [{"role": "system", "content": f"conversation {conversation} {uuid.uuid4()} " + "context " * 200}]
        served_by = []
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"turn {turn}"})
            status, _, body = post(a if turn % 2 == 0 else b, {"model": "mock-model", "messages": messages})
            assert status == 200
            answer = json.loads(body)
            served_by.append(answer["id"].split("-")[1])  # chatcmpl-<mock name>-<n>
            messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        assert len(set(served_by)) == 1, f"conversation {conversation}: turns went to {served_by}"
        landed.append(served_by[0])
    print(f"conversations landed on {landed}")
