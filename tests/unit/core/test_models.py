"""ntonix.core.models: model lists, who serves what, the /v1/models union, model_not_found."""

from __future__ import annotations

import orjson
import pytest

from ntonix.core.models import (
    configured,
    model_not_found,
    models_answer,
    next_models,
    parse_models,
    request_model,
    serves,
    union_models,
)
from ntonix.errors import render_error

VLLM = orjson.dumps({"object": "list", "data": [
    {"id": "qwen", "object": "model", "created": 1, "owned_by": "vllm", "max_model_len": 8192},
    {"id": "qwen-lora", "object": "model", "created": 1, "owned_by": "vllm", "parent": "qwen"}]})


def test_openai_list_is_parsed_in_order_with_entries() -> None:
    models = parse_models(200, VLLM)
    assert models is not None
    assert list(models) == ["qwen", "qwen-lora"]
    assert models["qwen"]["max_model_len"] == 8192


@pytest.mark.parametrize(("status", "body"), [
    (404, VLLM), (401, b'{"error": "no"}'), (500, b""), (200, b"<html>"), (200, b"[]"),
    (200, b'{"data": "x"}'), (200, b'{"models": []}'), (200, b'{"data": [{"name": "x"}]}'),
    (200, b'{"data": [{"id": ""}]}'), (200, b'{"data": ["qwen"]}'), (200, b"\xff\xfe"),
])
def test_anything_else_serves_any_model(status: int, body: bytes) -> None:
    assert parse_models(status, body) is None


def test_an_empty_list_serves_nothing() -> None:
    models = parse_models(200, b'{"object": "list", "data": []}')
    assert models == {}
    assert not serves(models, "qwen")


def test_unreachable_keeps_the_last_list() -> None:
    known = parse_models(200, VLLM)
    assert next_models(known, None) is known
    assert next_models(known, (200, b'{"object":"list","data":[{"id":"x"}]}')) == {"x": {"id": "x"}}
    assert next_models(known, (404, b"")) is None


def test_serves() -> None:
    models = configured(["a", "b"])
    assert serves(models, "a")
    assert not serves(models, "c")
    assert serves(None, "c")  # unknown list: any model
    assert serves(models, None)  # the request names no model


def test_request_model() -> None:
    assert request_model({"model": "m", "messages": []}) == "m"
    assert request_model({"model": 3}) is None
    assert request_model({}) is None
    assert request_model([1]) is None


def test_union_each_id_once_first_entry_wins() -> None:
    first = parse_models(200, VLLM)
    second = configured(["qwen", "llama"])
    union = union_models([None, first, second])
    assert union is not None
    assert list(union) == ["qwen", "qwen-lora", "llama"]
    assert union["qwen"]["owned_by"] == "vllm"
    doc = orjson.loads(models_answer(union))
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["qwen", "qwen-lora", "llama"]
    assert doc["data"][2] == {"id": "llama", "object": "model", "created": 0, "owned_by": "ntonix"}


def test_union_unknown_while_no_list_is_known() -> None:
    assert union_models([None, None]) is None
    assert union_models([]) is None
    assert union_models([{}]) == {}


def test_model_not_found_is_an_openai_404() -> None:
    status, headers, body = render_error(model_not_found("gpt-9"))
    assert status == "404 Not Found"
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "model_not_found"
    assert "gpt-9" in error["message"]
