"""Live tests of the mock's inference-server mode: `python -m mock_llm --inference ...`.

A conversation's later turns come back with `cached_tokens` covering the earlier turns; running
requests are capped with a first-come-first-served queue and a waiting limit; /v1/models serves
the configured list; /metrics has vLLM-style gauges and the prefill counters a benchmark reads.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any

import pytest

from tests.live.procs import get_json, http, wait_until
from tests.live.servers import MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

SYSTEM = "You are a careful assistant. " * 40  # 1,160 characters: 290 tokens
BLOCK = 16


@pytest.fixture(scope="module")
def engine(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("inf", extra_args=[
        "--inference", "--models", "model-a,model-b", "--kv-cache-tokens", "8192", "--tokens", "6",
        "--max-num-seqs", "2", "--max-waiting", "2", "--prefill-time-per-token", "0.00001", "--stream-interval", "2",
    ])


@pytest.fixture
def mock(engine: MockBackend) -> Iterator[MockBackend]:
    engine.reset()  # also empties the prefix cache and zeroes the engine counters
    yield engine


def metrics(backend: MockBackend) -> dict[str, float]:
    status, _, body = http("GET", backend.url + "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def chat(backend: MockBackend, messages: list[dict[str, str]], stream: bool = False,
         headers: dict[str, str] | None = None, model: str = "model-a") -> tuple[int, dict[str, Any], str]:
    """One chat completion; (status, usage or error body, answer text)."""
    body: dict[str, Any] = {"model": model, "messages": messages}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    status, _, raw = http("POST", backend.url + "/v1/chat/completions", body, headers=headers, timeout=30)
    if status != 200:
        return status, json.loads(raw), ""
    if not stream:
        answer = json.loads(raw)
        return status, answer["usage"], answer["choices"][0]["message"]["content"]
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    assert raw.decode().rstrip().endswith("data: [DONE]")
    *chunks, last = events
    assert last["choices"] == [] and all(c["usage"] is None for c in chunks)
    return status, last["usage"], "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_cached_tokens_grow_with_the_conversation(mock: MockBackend, stream: bool) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a KV cache?"}]
    status, usage, answer = chat(mock, messages, stream)
    assert status == 200, usage
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    first_prompt = usage["prompt_tokens"]
    assert usage["completion_tokens"] == 6 and len(answer) == 24  # 4 characters per token
    assert usage["total_tokens"] == first_prompt + 6

    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And a block?"}]
    status, usage, _ = chat(mock, messages, stream)
    assert status == 200
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    # The first turn's full blocks are reused, but for its last one when its last token was a
    # partial one (4 characters per token), which the longer prompt extends.
    assert cached % BLOCK == 0 and first_prompt - 2 * BLOCK < cached <= first_prompt
    assert usage["prompt_tokens"] > first_prompt

    m = metrics(mock)
    assert m["mock:prompt_tokens_cached_total"] == cached
    assert m["mock:prompt_tokens_computed_total"] == first_prompt + usage["prompt_tokens"] - cached
    assert m["vllm:prompt_tokens_total"] == first_prompt + usage["prompt_tokens"]
    assert m["vllm:prefix_cache_hits_total"] == cached
    assert m["vllm:generation_tokens_total"] == 12
    assert m["vllm:request_success_total"] == 2

    mock.reset()  # an empty cache again
    assert chat(mock, messages, stream)[1]["prompt_tokens_details"]["cached_tokens"] == 0


def test_answers_are_the_same_on_every_instance(mock: MockBackend, mock_backend: MockBackendFactory) -> None:
    other = mock_backend("other", extra_args=["--inference", "--tokens", "6"])
    messages = [{"role": "user", "content": "same question"}]
    assert chat(mock, messages)[2] == chat(other, messages, model="anything")[2]


def test_models_list_and_unknown_model(mock: MockBackend) -> None:
    listed = get_json(mock.url + "/v1/models")
    assert listed["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listed["data"]] == [
        ("model-a", "model", "ntonix-mock"), ("model-b", "model", "ntonix-mock")]
    status, error, _ = chat(mock, [{"role": "user", "content": "hi"}], model="model-z")
    assert status == 404
    assert error["error"]["code"] == "model_not_found" and "model-z" in error["error"]["message"]
    assert chat(mock, [{"role": "user", "content": "hi"}], model="model-b")[0] == 200
    assert metrics(mock)["mock:requests_wrong_model_total"] == 1


def test_running_requests_are_capped_and_the_queue_is_limited(mock: MockBackend) -> None:
    # --max-num-seqs 2 --max-waiting 2: two long requests run, two wait, the fifth is refused.
    results: dict[int, int] = {}
    order: list[int] = []
    conns = [HTTPConnection("127.0.0.1", mock.port, timeout=30) for _ in range(4)]

    def send(i: int) -> None:
        body = json.dumps({"model": "model-a", "messages": [{"role": "user", "content": f"q{i} " + "x" * 200}]})
        conns[i].request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json",
                                                                  "X-Mock-Token-Delay": "0.3"})
        response = conns[i].getresponse()
        response.read()
        results[i] = response.status
        order.append(i)

    threads = []
    for i in range(4):
        threads.append(threading.Thread(target=send, args=(i,), daemon=True))
        threads[-1].start()
        # One at a time, so the queue order is known.
        wait_until(lambda n=i + 1: metrics(mock)["mock:requests_total"] == n, timeout=10, what=f"request {i} in")
    m = metrics(mock)
    assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]) == (2, 2)
    assert m["mock:requests_in_system_peak"] == 4
    assert 0 < m["vllm:kv_cache_usage_perc"] <= 1

    status, error, _ = chat(mock, [{"role": "user", "content": "one too many"}])
    assert status == 503 and "waiting" in error["error"]["message"]
    assert metrics(mock)["mock:requests_rejected_total"] == 1

    for t in threads:
        t.join(timeout=30)
    for c in conns:
        c.close()
    assert results == {0: 200, 1: 200, 2: 200, 3: 200}
    assert set(order[:2]) == {0, 1} and set(order[2:]) == {2, 3}  # first come, first served
    m = metrics(mock)
    assert (m["vllm:num_requests_running"], m["vllm:num_requests_waiting"], m["vllm:kv_cache_usage_perc"]) == (0, 0, 0)
    assert m["vllm:request_success_total"] == 4
    assert m["mock:requests_in_system_peak"] == 4  # the refused one never counted
    mock.reset()
    assert metrics(mock)["mock:requests_in_system_peak"] == 0


def test_default_mode_is_unchanged(mock_backend: MockBackendFactory) -> None:
    plain = mock_backend("plain")
    status, _, raw = http("POST", plain.url + "/v1/chat/completions",
                          {"model": "whatever", "messages": [{"role": "user", "content": "hi"}]})
    answer = json.loads(raw)
    assert status == 200 and answer["choices"][0]["message"]["content"].startswith("[plain #")
    assert "prompt_tokens_details" not in answer["usage"]
    assert http("GET", plain.url + "/metrics")[0] == 404
    assert http("GET", plain.url + "/v1/models")[0] == 404  # no list: serves any model
