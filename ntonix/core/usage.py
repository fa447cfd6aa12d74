"""Token usage from backend answers, JSON or streamed (pure).

OpenAI-compatible servers report ``usage`` = ``{"prompt_tokens", "completion_tokens",
"prompt_tokens_details": {"cached_tokens"}}`` in a JSON answer, and in a stream in a final chunk
(when the client asked for ``stream_options.include_usage``; vLLM can repeat it in every chunk).
The Responses API spells them ``input_tokens``, ``output_tokens``, ``input_tokens_details``.

``UsageScanner`` sits on the relay path of a stream, so it must cost next to nothing per chunk:
it keeps only the unfinished last line, and looks for ``"usage"`` with a substring test before it
parses anything; only a ``data:`` line holding a ``"usage": {`` object is parsed (OpenAI sends
``"usage": null`` in every other chunk). The last usage seen wins, as servers that repeat it send
running totals.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

__all__ = ["Usage", "UsageScanner", "UsageTap", "usage_from_json", "usage_of", "usage_of_body"]

_MAX_LINE = 1 << 20  # a line longer than this is not kept whole (and holds no usage worth the memory)
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_LINE_END = re.compile(rb"[\r\n]")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt: int = 0  # all prompt tokens, cached ones included
    completion: int = 0
    cached_prompt: int = 0


def usage_of(doc: object) -> Usage | None:
    """The ``usage`` of a parsed answer (or chunk), if it carries one."""
    if not isinstance(doc, Mapping):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, Mapping):
        response = doc.get("response")  # Responses API stream events wrap the response
        usage = response.get("usage") if isinstance(response, Mapping) else None
        if not isinstance(usage, Mapping):
            return None
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    completion = _count(usage, "completion_tokens", "output_tokens")
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _count(details, "cached_tokens") if isinstance(details, Mapping) else 0
    return Usage(prompt, completion, min(cached, prompt))  # cached ones are among the prompt's


# More tokens than any answer has (a trillion): a broken or hostile backend's number, not a count.
# Counting it would poison the gateway's totals (and a sum past 2^64 cannot even be written as JSON).
MAX_COUNT = 1 << 40


def _count(mapping: Mapping[str, object], *names: str) -> int:
    for name in names:
        value = mapping.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT:
            return value
    return 0


def usage_from_json(body: bytes) -> Usage | None:
    """The usage of a JSON answer body; None when it is not JSON or has none.

    Only the ``usage`` object is parsed when it is where servers put it: last in the answer (only
    the answer's own closing brace after it), with at most one nested object
    (``prompt_tokens_details``). A key ``"usage"`` cannot occur inside a JSON string (its quotes
    would be escaped). Anything else (e.g. a ``usage`` inside some other object): the whole
    answer is parsed, and only its top-level ``usage`` counts.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    start = body.find(b"{", at)
    end = body.find(b"}", start)
    inner = body.find(b"{", start + 1)
    if 0 <= inner < end:
        end = body.find(b"}", end + 1)
    if (start >= 0 and end >= 0 and body[at + 7:start].strip(b" \t\r\n") == b":"
            and body[end + 1:].strip(b" \t\r\n") == b"}"):
        try:
            return usage_of({"usage": orjson.loads(body[start:end + 1])})
        except orjson.JSONDecodeError:
            pass
    try:
        return usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


class UsageScanner:
    """Fed the raw bytes of an SSE stream as they are relayed; ``usage`` is the last one seen."""

    __slots__ = ("_skipping", "_tail", "usage")

    def __init__(self) -> None:
        self._tail = b""
        self._skipping = False  # inside an over-long line, dropped up to its end
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if cut < 0:
            self._hold(data)
            return
        complete = data[:cut + 1]
        if self._skipping:
            self._skipping = False
            first = _LINE_END.search(complete)
            assert first is not None  # complete ends with a line end
            complete = complete[first.end():]
        self._hold(data[cut + 1:])
        if b'"usage"' in complete:
            self._scan(complete)

    def finish(self) -> Usage | None:
        """End of stream: a last line without a line end counts too."""
        if self._tail and not self._skipping and b'"usage"' in self._tail:
            self._scan(self._tail)
        self._tail = b""
        return self.usage

    def _hold(self, rest: bytes) -> None:
        if len(rest) > _MAX_LINE:
            self._tail, self._skipping = b"", True
        elif not self._skipping:
            self._tail = rest

    def _scan(self, data: bytes) -> None:
        for line in data.splitlines():
            if line.startswith(b"data:") and _USAGE_OBJECT.search(line):
                try:
                    found = usage_of(orjson.loads(line[5:]))
                except orjson.JSONDecodeError:
                    continue
                if found is not None:
                    self.usage = found


_MAX_JSON = 1 << 20  # a JSON answer longer than this is not kept for its usage (nor parsed)


class UsageTap:
    """The usage of one answer as it is relayed: an SSE stream is scanned chunk by chunk; a
    JSON answer is kept (up to ``_MAX_JSON`` bytes) and read once at its end."""

    __slots__ = ("_chunks", "_scanner", "_size")

    def __init__(self, stream: bool) -> None:
        self._scanner: UsageScanner | None = UsageScanner() if stream else None
        self._chunks: list[bytes] | None = None if stream else []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        if self._scanner is not None:
            self._scanner.feed(chunk)
        elif self._chunks is not None:
            self._size += len(chunk)
            if self._size > _MAX_JSON:
                self._chunks = None
            else:
                self._chunks.append(chunk)

    def finish(self) -> Usage | None:
        """The usage of the whole answer (call once, after its last chunk)."""
        if self._scanner is not None:
            return self._scanner.finish()
        if not self._chunks:
            return None
        return usage_from_json(self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks))


def usage_of_body(body: bytes, streamed: bool) -> Usage | None:
    """The usage of a whole answer (a cached one, replayed)."""
    tap = UsageTap(streamed)
    tap.feed(body)
    return tap.finish()
