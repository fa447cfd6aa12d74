"""The prompt of an LLM request as a chain of block hashes, for prefix-aware routing (pure).

Theory of operation
-------------------
An inference server skips the prefill of a prompt prefix it still holds in its KV cache. The
gateway cannot see tokens, but chat templates render messages in order, so the *text* of the
messages in order is a good stand-in for the token prefix (SGLang, AIBrix and the GIE prefix
scorer match characters too; ../shared/ROUTING-NOTES.md §1 is the survey behind this).

1. ``prompt_text`` renders what the engine will prefill, prefix-stably: the tool definitions
   first (chat templates put them before the messages), then each message as
   ``\\x1e role \\x1f content [name] [tool_call_id] [tool_calls]``. Appending messages only
   appends text, so turn N+1 of a conversation starts with all of turn N's text (the test
   checks it). A completion ``prompt`` (string, list of strings, token ids) is rendered as is.
2. ``block_hashes`` cuts the UTF-8 bytes into fixed-size blocks and chains their hashes:
   ``h[i] = xxh64(block[i], seed=h[i-1])``, so ``h[i]`` stands for the whole prefix up to block
   ``i`` and two prompts share ``h[i]`` only when they share all of it. A shorter tail is not
   hashed: it could not be matched as a whole block anyway.
3. The chain starts from a seed made of the model, the caller's partition (the credential hash)
   and the request's ``cache_salt``: the engine's cache is not shared across models or salts
   (smg#2420 pinned requests to reuse that could never happen because its key lacked them), and
   the partition keeps one tenant's prompts from steering another's requests.

Hash value 0 is reserved (the shared index uses it for "empty"); a hash of 0 becomes 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
import xxhash

__all__ = ["block_hashes", "prompt_blocks", "prompt_text"]

_MSG = "\x1e"  # record separator before each message
_FIELD = "\x1f"  # unit separator between a message's fields


def prompt_text(body: object) -> str | None:
    """The text the backend will prefill for a parsed JSON request body; None when it has none.

    Chat (``messages``) is rendered with tools first, then messages in order; a completion
    (``prompt``) as its text. Other bodies (embeddings, anything unknown) have no prompt.
    """
    if not isinstance(body, Mapping):
        return None
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        tools = body.get("tools")
        if tools is not None:
            parts.append(_MSG + "tools" + _FIELD + _json(tools))
        for message in messages:
            parts.append(_render_message(message))
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return _MSG.join(prompt)  # a batch: one backend prefills them all
        return _json(prompt)  # token ids (or a batch of them): their JSON text is prefix-stable enough
    return None


def _render_message(message: object) -> str:
    if not isinstance(message, Mapping):
        return _MSG + _json(message)
    out = [_MSG, str(message.get("role", "")), _FIELD, _content(message.get("content"))]
    for key in ("name", "tool_call_id"):
        value = message.get(key)
        if value is not None:
            out += [_FIELD, key, "=", str(value)]
    for key in ("tool_calls", "function_call"):
        value = message.get(key)
        if value is not None:
            out += [_FIELD, key, "=", _json(value)]
    return "".join(out)


def _content(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Content parts: text as text (what the template renders), other parts (images,
        # audio) as their JSON, which changes exactly when the part does.
        return "".join(part["text"] if isinstance(part, Mapping) and part.get("type") == "text"
                       and isinstance(part.get("text"), str) else _json(part) for part in content)
    return _json(content)


def _json(value: object) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # integers beyond 64 bits: the repr is stable too
        return repr(value)


def _seed(model: str, partition: bytes | str, salt: str) -> int:
    part = partition.encode("utf-8", "surrogatepass") if isinstance(partition, str) else partition
    key = b"\0".join((model.encode("utf-8", "surrogatepass"), part, salt.encode("utf-8", "surrogatepass")))
    return xxhash.xxh64_intdigest(key)


def block_hashes(text: str, *, model: str, partition: bytes | str = b"", salt: str = "",
                 block_chars: int = 256) -> list[int]:
    """Chained 64-bit hashes of the whole ``block_chars``-byte blocks of ``text`` (UTF-8)."""
    data = text.encode("utf-8", "surrogatepass")
    h = _seed(model, partition, salt)
    out: list[int] = []
    view = memoryview(data)
    digest = xxhash.xxh64_intdigest
    for start in range(0, len(data) - block_chars + 1, block_chars):
        h = digest(view[start:start + block_chars], h) or 1
        out.append(h)
    return out


def prompt_blocks(body: object, *, partition: bytes | str = b"", block_chars: int = 256) -> list[int]:
    """``block_hashes`` of a request body's prompt, seeded by its model and ``cache_salt``; [] without one."""
    text = prompt_text(body)
    if not text or not isinstance(body, Mapping):
        return []
    model = body.get("model")
    salt = body.get("cache_salt")
    return block_hashes(text, model=model if isinstance(model, str) else "", partition=partition,
                        salt=salt if isinstance(salt, str) else "", block_chars=block_chars)
