"""The official ``openai`` package against a live gateway: plain answers, streams, errors.

The mock's text depends only on the prompt and the instance, so a streamed answer must put
together exactly the text of the plain one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from tests.live.procs import free_port
from tests.live.servers import Gateway, GatewayFactory, MockBackend, MockBackendFactory

pytestmark = pytest.mark.integration

LIMIT = 200_000


@pytest.fixture(scope="module")
def mock(mock_backend_module: MockBackendFactory) -> MockBackend:
    return mock_backend_module("o", extra_args=("--models", "mock-model"))


@pytest.fixture(scope="module")
def gw(mock: MockBackend, gateway_module: GatewayFactory) -> Gateway:
    return gateway_module([mock], config={"proxy": {"max_body_bytes": LIMIT}})


@pytest.fixture(scope="module")
def client(gw: Gateway) -> Iterator[OpenAI]:
    with OpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, timeout=20) as c:
        yield c


def prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"hello {uuid.uuid4()}"}]


def test_chat_completion(client: OpenAI) -> None:
    resp = client.chat.completions.create(model="mock-model", messages=prompt(), max_tokens=5)
    assert resp.object == "chat.completion"
    assert resp.model == "mock-model"
    text = resp.choices[0].message.content
    assert text is not None and text.startswith("[o #") and text.endswith(" tok4")
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 5


def test_chat_stream_yields_chunks_and_ends(client: OpenAI) -> None:
    messages = prompt()
    stream = client.chat.completions.create(model="mock-model", messages=messages, max_tokens=6,
                                            stream=True)
    chunks = list(stream)  # ends by itself at data: [DONE]
    assert len(chunks) == 6
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    plain = client.chat.completions.create(model="mock-model", messages=messages, max_tokens=6)
    assert streamed == plain.choices[0].message.content


def test_chat_stream_with_crlf_framing(client: OpenAI) -> None:
    stream = client.chat.completions.create(model="mock-model", messages=prompt(), max_tokens=4,
                                            stream=True, extra_headers={"X-Mock-Crlf": "1"})
    chunks = list(stream)
    assert len(chunks) == 4
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_slow_stream_arrives_piece_by_piece(client: OpenAI) -> None:
    started = time.monotonic()
    arrivals = []
    stream = client.chat.completions.create(model="mock-model", messages=prompt(), max_tokens=6,
                                            stream=True, extra_headers={"X-Mock-Token-Delay": "0.2"})
    for _ in stream:
        arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] >= 0.8, arrivals


def test_completion_plain_and_streamed(client: OpenAI) -> None:
    text_prompt = f"once upon {uuid.uuid4()}"
    plain = client.completions.create(model="mock-model", prompt=text_prompt, max_tokens=4)
    assert plain.object == "text_completion"
    assert plain.choices[0].text.startswith("[o #")
    chunks = list(client.completions.create(model="mock-model", prompt=text_prompt, max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text


def test_embeddings(client: OpenAI) -> None:
    resp = client.embeddings.create(model="mock-model", input=["first text", "second text"])
    assert len(resp.data) == 2
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in resp.data)
    assert resp.data[0].embedding != resp.data[1].embedding
    again = client.embeddings.create(model="mock-model", input="first text")
    assert again.data[0].embedding == resp.data[0].embedding  # deterministic


def test_models(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["mock-model"]


def test_raw_response_headers(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="mock-model", messages=prompt(), extra_headers={"X-Request-ID": "openai-client-1"})
    assert raw.headers["x-request-id"] == "openai-client-1"
    assert raw.headers["x-mock-instance"] == "o"
    assert raw.parse().choices[0].message.content


def test_authorization_reaches_the_backend(client: OpenAI, mock: MockBackend) -> None:
    client.chat.completions.create(model="mock-model", messages=prompt())
    last = mock.stats()["last_request"]
    assert {k.lower(): v for k, v in last["headers"].items()}["authorization"] == "Bearer sk-test"


def test_body_over_the_limit_is_an_api_error(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="mock-model",
                                       messages=[{"role": "user", "content": "x" * (LIMIT + 1)}])
    assert info.value.status_code == 413
    assert isinstance(info.value.body, dict)
    assert "limit" in info.value.body["message"]
    assert info.value.body["type"] == "invalid_request_error"


def test_dead_backend_is_an_api_error(gateway: GatewayFactory) -> None:
    gw = gateway([f"127.0.0.1:{free_port()}"], config={"health": {"enabled": False}})
    with OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=10) as c:
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model="mock-model", messages=prompt())
        assert info.value.status_code == 502
        assert isinstance(info.value.body, dict) and info.value.body["message"]
        with pytest.raises(openai.InternalServerError):
            list(c.chat.completions.create(model="mock-model", messages=prompt(), stream=True))
