"""ntonix.core.prompt: the text matched for prefix routing and its chained block hashes."""

from __future__ import annotations

from typing import Any

from ntonix.core.prompt import block_hashes, prompt_blocks, prompt_text

SYSTEM = "You are a helpful assistant. " * 40


def chat(*turns: str, model: str = "m", **extra: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": model, "messages": messages, **extra}


def test_turn_n_plus_1_shares_all_blocks_of_turn_n() -> None:
    turns = [f"question {i}: " + "why? " * (30 + 7 * i) if i % 2 == 0 else f"answer {i} " * (50 + i)
             for i in range(9)]
    previous: list[int] = []
    for n in range(1, len(turns) + 1, 2):
        blocks = prompt_blocks(chat(*turns[:n]), block_chars=64)
        assert blocks[:len(previous)] == previous
        assert len(blocks) > len(previous)
        previous = blocks


def test_a_changed_early_message_changes_every_later_block() -> None:
    a = prompt_blocks(chat("hello " * 100), block_chars=64)
    b = prompt_blocks({"model": "m", "messages": [{"role": "system", "content": "X" + SYSTEM[1:]},
                                                  {"role": "user", "content": "hello " * 100}]}, block_chars=64)
    assert len(a) == len(b)
    assert not set(a) & set(b)


def test_model_partition_and_salt_separate_the_chains() -> None:
    base = prompt_blocks(chat("hi"), block_chars=64)
    assert prompt_blocks(chat("hi"), block_chars=64) == base
    assert not set(prompt_blocks(chat("hi", model="other"), block_chars=64)) & set(base)
    assert not set(prompt_blocks(chat("hi"), partition=b"tenant-b", block_chars=64)) & set(base)
    assert not set(prompt_blocks(chat("hi", cache_salt="s"), block_chars=64)) & set(base)


def test_roles_matter() -> None:
    a = prompt_text({"messages": [{"role": "user", "content": "x"}]})
    b = prompt_text({"messages": [{"role": "assistant", "content": "x"}]})
    assert a != b


def test_content_parts_tools_and_tool_calls_are_rendered() -> None:
    body = {
        "model": "m",
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look: "},
                                         {"type": "image_url", "image_url": {"url": "http://x/1.png"}}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
    }
    text = prompt_text(body)
    assert text is not None
    assert text.index("get_weather") < text.index("look: ")  # tools come first
    for piece in ("look: ", "1.png", "tool_calls", "tool_call_id=c1", "sunny"):
        assert piece in text
    other = {**body, "tools": [{"type": "function", "function": {"name": "get_time"}}]}
    assert prompt_text(other) != text


def test_completion_prompts() -> None:
    assert prompt_text({"prompt": "Once upon a time"}) == "Once upon a time"
    assert prompt_text({"prompt": ["a", "b"]}) == "a\x1eb"
    assert prompt_text({"prompt": [1, 2, 3]}) == "[1,2,3]"
    assert prompt_text({"prompt": []}) is None
    assert prompt_text({"input": "embed me"}) is None
    assert prompt_text(["not", "an", "object"]) is None
    assert prompt_blocks({"model": "m", "prompt": 42}) == []


def test_blocks_are_whole_blocks_only() -> None:
    assert block_hashes("a" * 63, model="m", block_chars=64) == []
    assert len(block_hashes("a" * 64, model="m", block_chars=64)) == 1
    assert len(block_hashes("a" * 200, model="m", block_chars=64)) == 3
    # Identical blocks at different positions hash differently (the chain carries the position).
    hashes = block_hashes("a" * 256, model="m", block_chars=64)
    assert len(set(hashes)) == 4
    assert all(h != 0 for h in hashes)


def test_non_ascii_and_lone_surrogates() -> None:
    text = "héllo wörld ✓ " * 20 + "\ud800"
    assert len(block_hashes(text, model="m", block_chars=16)) == len(text.encode("utf-8", "surrogatepass")) // 16
