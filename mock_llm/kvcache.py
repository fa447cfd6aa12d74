"""The pure model behind the mock's inference-server mode: tokens, blocks, a prefix cache, a queue.

Theory of operation
-------------------
An inference server (vLLM, SGLang, llama.cpp) skips the prefill of the part of a prompt whose
key/value tensors it still holds. vLLM's design, which this follows, is:

- The prompt is rendered to text (chat messages through a template) and tokenized.
- Tokens are grouped into fixed-size blocks; a *full* block is identified by a hash chained
  over all blocks before it, so a block hash stands for the whole prefix up to its end.
- A request's cached tokens are its longest run of leading blocks found in the cache, at most
  ``prompt_tokens - 1`` (the last prompt token is always computed: it yields the first logits).
- Blocks live in a least-recently-used pool of fixed capacity; a request touches the blocks it
  reuses and adds the ones it computed, evicting the least recently used beyond capacity.

The mock's choices (documented in mock_llm/README.md):

- **Template**: ``<|role|>\\n{content}\\n`` per message, in order, then ``<|assistant|>\\n`` (the
  generation prompt); a completion prompt is used as is (a list of strings is joined by ``\\n``).
  An earlier turn's rendered prompt is thus a prefix of the next turn's.
- **Tokenizer**: every 4 characters of that text are one token (the last may be shorter), the
  usual rule of thumb for English text; deterministic, and no vocabulary needed.
- **Blocks**: 16 tokens by default (vLLM's default), hashed with BLAKE2b (8 bytes), chained.

Only this module's plain objects are unit-tested (tests/unit/test_mock_kvcache.py); the timing
(prefill, decode, slots) lives in mock_llm/inference.py.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
DEFAULT_BLOCK_TOKENS = 16


def render_prompt(chat: bool, body: dict[str, Any]) -> str:
    """The text the mock tokenizes: chat messages through the template, or the completion prompt."""
    if not chat:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            return "\n".join(p if isinstance(p, str) else json.dumps(p) for p in prompt)
        return prompt if isinstance(prompt, str) else json.dumps(prompt)
    parts = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            message = {"role": "user", "content": message}
        content = message.get("content", "")
        if not isinstance(content, str):  # content parts, tool calls: any stable rendering will do
            content = json.dumps(content, sort_keys=True)
        parts.append(f"<|{message.get('role', 'user')}|>\n{content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def tokenize(text: str) -> list[str]:
    """Deterministic tokens: consecutive 4-character slices of ``text``."""
    return [text[i:i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]


def block_hashes(tokens: Sequence[str], block_tokens: int = DEFAULT_BLOCK_TOKENS) -> list[bytes]:
    """One chained hash per *full* block of ``block_tokens`` tokens (a partial tail has none)."""
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        h = hashlib.blake2b(parent, digest_size=8)
        h.update("\x1f".join(tokens[start:start + block_tokens]).encode())
        parent = h.digest()
        hashes.append(parent)
    return hashes


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache holds of one prompt: ``cached_tokens`` of ``prompt_tokens``."""

    prompt_tokens: int
    cached_blocks: int
    cached_tokens: int

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class PrefixCache:
    """An LRU pool of at most ``capacity_blocks`` block hashes (see the module docstring).

    >>> cache = PrefixCache(capacity_blocks=4, block_tokens=2)
    >>> cache.serve(["a", "b", "c", "d", "e"]).cached_tokens   # cold
    0
    >>> cache.serve(["a", "b", "c", "d", "x"]).cached_tokens   # two full blocks reused
    4
    """

    def __init__(self, capacity_blocks: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if capacity_blocks < 0 or block_tokens < 1:
            raise ValueError(f"capacity_blocks >= 0 and block_tokens >= 1, got {capacity_blocks}, {block_tokens}")
        self.capacity_blocks = capacity_blocks
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self.evicted_blocks = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: bytes) -> bool:
        return block in self._blocks

    def __repr__(self) -> str:
        return (f"<PrefixCache {len(self._blocks)}/{self.capacity_blocks} blocks of {self.block_tokens} tokens "
                f"evicted={self.evicted_blocks}>")

    def lookup(self, tokens: Sequence[str]) -> Lookup:
        """How many leading tokens of ``tokens`` are cached; changes nothing."""
        return self._lookup(len(tokens), block_hashes(tokens, self.block_tokens))

    def _lookup(self, n_tokens: int, hashes: Sequence[bytes]) -> Lookup:
        usable = max(n_tokens - 1, 0) // self.block_tokens  # the last token is always computed
        hit = 0
        for block in hashes[:usable]:
            if block not in self._blocks:
                break
            hit += 1
        return Lookup(n_tokens, hit, hit * self.block_tokens)

    def serve(self, tokens: Sequence[str]) -> Lookup:
        """Schedule a prompt: count its cached prefix, then hold all its full blocks as most recent."""
        hashes = block_hashes(tokens, self.block_tokens)
        found = self._lookup(len(tokens), hashes)
        for block in hashes:
            if block in self._blocks:
                self._blocks.move_to_end(block)
            else:
                self._blocks[block] = None
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
            self.evicted_blocks += 1
        return found

    def clear(self) -> None:
        self._blocks.clear()
        self.evicted_blocks = 0
