"""Which backends serve which model, and the gateway's own ``GET /v1/models`` (pure).

A backend's model list is either configured (``backends[].models``) or learnt from its
``GET /v1/models``. Only an answer of status 200 in the OpenAI list shape
(``{"object": "list", "data": [{"id": ...}, ...]}``) counts as a list; anything else (refused,
401, 404, garbage) means the backend serves any model, so a server without that endpoint keeps
getting every request, as before routing knew about models. A backend that cannot be reached at
all keeps its last known list: ``next_models`` takes ``None`` for "no answer".

A list is kept as ``{id: entry}`` in the backend's order; the entry is the backend's own object
(``owned_by``, ``created``, ...), so the gateway's union repeats what the first backend said.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from ntonix.errors import ModelNotFound

__all__ = ["ANY", "ModelList", "configured", "model_not_found", "models_answer", "next_models", "parse_models",
           "request_model", "serves", "union_models"]

ModelList = Mapping[str, Mapping[str, Any]]
ANY: ModelList | None = None  # serves any model


def parse_models(status: int, body: bytes) -> ModelList | None:
    """The models a ``GET /v1/models`` answer lists, or ``None`` (= serves any model)."""
    if status != 200:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    out: dict[str, Mapping[str, Any]] = {}
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            return None  # not the shape we know: do not guess which models it serves
        out.setdefault(entry["id"], entry)
    return out


def next_models(previous: ModelList | None, answer: tuple[int, bytes] | None) -> ModelList | None:
    """The list after one discovery attempt: ``answer`` is (status, body), ``None`` when unreachable."""
    if answer is None:
        return previous
    return parse_models(*answer)


def configured(models: Sequence[str]) -> ModelList:
    """A configured ``backends[].models`` as a list (entries in the OpenAI shape)."""
    return {m: {"id": m, "object": "model", "created": 0, "owned_by": "ntonix"} for m in models}


def serves(models: ModelList | None, model: str | None) -> bool:
    """Whether a backend with this list takes a request for ``model`` (None: the request names none)."""
    return models is None or model is None or model in models


def request_model(body: object) -> str | None:
    """The ``model`` a parsed JSON request body asks for, if it names one."""
    if isinstance(body, Mapping):
        model = body.get("model")
        if isinstance(model, str):
            return model
    return None


def union_models(lists: Iterable[ModelList | None]) -> ModelList | None:
    """Each id once, first backend's entry first; ``None`` while no list is known at all."""
    out: dict[str, Mapping[str, Any]] = {}
    known = False
    for models in lists:
        if models is None:
            continue
        known = True
        for model_id, entry in models.items():
            out.setdefault(model_id, entry)
    return out if known else None


def models_answer(models: ModelList) -> bytes:
    """The body of the gateway's ``GET /v1/models``: the OpenAI list shape."""
    return orjson.dumps({"object": "list", "data": list(models.values())})


def model_not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model `{model}` does not exist: no backend of this gateway serves it.")
