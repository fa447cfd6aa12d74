"""Prefix routing against two real llama.cpp servers (issue 16).

The servers are the session's ``llamacpp`` fixture (tests/live/llamacpp.py: SmolLM2-135M, four
slots of 512 tokens, one thread each). Each keeps its slots' KV cache and reports what it reused
in ``usage.prompt_tokens_details.cached_tokens``; nothing is shared between the two, so a later
turn of a conversation is cheap only where the earlier turns were served. The gateway's own
cache is off: routing alone decides what the servers reuse.

A conversation is a system prompt plus a growing history (about 150 tokens, then about 60 more
per turn), answered at temperature 0 with at most 8 tokens; each run starts with its own system
prompt so no earlier KV helps it. Which server answered a turn is read from the servers' own
``llamacpp:tokens_predicted_total`` (turns are sent one at a time).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import pytest

from tests.live.llamacpp import LlamaServer, served_model
from tests.live.procs import client_exchange, wait_until
from tests.live.servers import Gateway, GatewayFactory

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}
QUESTIONS = (
    "Describe in one sentence how a lighthouse keeper spends a long winter night on a small rocky "
    "island far from the coast, with only a radio, a stove and a logbook for company.",
    "Now tell me what the keeper writes in the logbook when a fishing boat passes close to the rocks "
    "just before dawn, its engine coughing and its crew waving at the lamp.",
    "What does the keeper cook for breakfast after that long night, and which of the supplies brought "
    "by the last boat of the autumn are already running low?",
    "Finally, what message does the keeper send over the radio to the mainland harbour master when "
    "the storm that was forecast for the evening finally arrives?",
)


@dataclass
class Turn:
    server: int  # index into the fixture's servers
    prompt_tokens: int
    cached_tokens: int


def _system_prompt(tag: str) -> str:
    return (f"You are assistant {tag}, a patient storyteller for a children's radio programme. Answer "
            "briefly and kindly, use plain words, avoid anything frightening, keep every answer to "
            "a single short sentence, never use lists or headings, and when you are unsure about a "
            "detail of the story, invent one that fits the calm mood of the programme rather than "
            "asking the listener a question. The programme is broadcast every evening at seven.")


def _gateway(factory: GatewayFactory, servers: list[LlamaServer], policy: str) -> Gateway:
    return factory([s.address for s in servers], config={
        "routing": {"policy": policy},
        "cache": {"enabled": False},
        "health": {"interval_s": 0.3, "timeout_s": 1.0, "unhealthy_threshold": 1, "healthy_threshold": 1},
        "proxy": {"read_timeout_s": 30.0}})


def _predicted(servers: list[LlamaServer]) -> list[float]:
    return [s.metrics()["llamacpp:tokens_predicted_total"] for s in servers]


def _conversation(gw: Gateway, servers: list[LlamaServer], tag: str) -> list[Turn]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": _system_prompt(tag)}]
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        body = {"model": served_model(), "messages": messages, "max_tokens": 8, "temperature": 0}
        before = _predicted(servers)
        status, _, data = client_exchange(gw.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                                          JSON, timeout=60)
        assert status == 200, data[:300]
        answer = json.loads(data)
        grew = [i for i, (a, b) in enumerate(zip(before, _predicted(servers), strict=True)) if b > a]
        assert len(grew) == 1, grew
        usage = answer["usage"]
        turns.append(Turn(grew[0], usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    return turns


def _cached_share(turns: list[Turn]) -> float:
    later = turns[1:]
    return sum(t.cached_tokens for t in later) / sum(t.prompt_tokens for t in later)


def test_prefix_routing_keeps_a_conversation_where_its_kv_is_and_round_robin_does_not(
        llamacpp: list[LlamaServer], gateway_module: GatewayFactory) -> None:
    servers = llamacpp
    wait_until(lambda: all(s.busy_slots() == 0 for s in servers), timeout=10, what="idle llama.cpp slots")
    run = uuid.uuid4().hex[:8]

    prefix = _conversation(_gateway(gateway_module, servers, "prefix"), servers, f"P-{run}")
    assert prefix[-1].prompt_tokens >= 250, prefix  # several prefix blocks (256 characters, ~64 tokens)
    assert len({t.server for t in prefix}) == 1, prefix  # every turn on the server holding the history
    for earlier, later in pairwise(prefix):
        # The whole previous prompt is reused (and the answer, whose tokens the slot holds too).
        assert later.cached_tokens >= earlier.prompt_tokens - 4, prefix

    rr = _conversation(_gateway(gateway_module, servers, "round_robin"), servers, f"R-{run}")
    assert all(a.server != b.server for a, b in pairwise(rr)), rr  # turns alternate servers
    # The second turn lands on the server that never saw this conversation: only the chat
    # template's first tokens are shared with other prompts.
    assert rr[1].cached_tokens < rr[0].prompt_tokens // 4, rr
    assert _cached_share(rr) < _cached_share(prefix) - 0.2, (rr, prefix)
