"""ntonix.core.usage: token usage from JSON answers and, incrementally, from SSE streams."""

from __future__ import annotations

import orjson
import pytest

from ntonix.core.usage import MAX_COUNT, Usage, UsageScanner, UsageTap, usage_from_json, usage_of, usage_of_body

USAGE = {"prompt_tokens": 1400, "completion_tokens": 12, "total_tokens": 1412,
         "prompt_tokens_details": {"cached_tokens": 1392}}


def chunk(content: str | None = None, usage: object = None) -> bytes:
    doc = {"id": "c1", "object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": {"content": content}}] if content is not None else [],
           "usage": usage}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


STREAM = b"".join([chunk("Hel"), chunk("lo"), chunk(usage=USAGE), b"data: [DONE]\n\n"])


def test_json_answer() -> None:
    body = orjson.dumps({"id": "x", "choices": [], "usage": USAGE})
    assert usage_from_json(body) == Usage(1400, 12, 1392)


@pytest.mark.parametrize("body", [b"", b"not json", b'{"usage": null}', b'{"choices": []}', b'"usage"',
                                  b'{"usage": "lots"}'])
def test_json_without_usage(body: bytes) -> None:
    assert usage_from_json(body) is None


def test_missing_or_odd_fields_count_as_zero() -> None:
    assert usage_of({"usage": {"prompt_tokens": 5}}) == Usage(5, 0, 0)
    assert usage_of({"usage": {"prompt_tokens": -1, "completion_tokens": True}}) == Usage(0, 0, 0)
    assert usage_of({"usage": {"prompt_tokens": 5, "prompt_tokens_details": None}}) == Usage(5, 0, 0)
    # never more cached than prompt tokens
    assert usage_of({"usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}}}) == Usage(5, 0, 5)
    assert usage_of({"usage": {"prompt_tokens": 0, "completion_tokens": 4,
                               "prompt_tokens_details": {"cached_tokens": 30}}}) == Usage(0, 4, 0)


@pytest.mark.parametrize("huge", [MAX_COUNT + 1, 2**63 - 1, 2**64 - 1, 10**30])
def test_a_count_no_answer_can_have_is_not_counted(huge: int) -> None:
    # Two such answers summed past 2^64 made GET /metrics (JSON) fail for good.
    body = orjson.dumps({"usage": {"prompt_tokens": 7, "completion_tokens": 1}}).replace(b"7", str(huge).encode())
    assert usage_from_json(body) == Usage(0, 1, 0)
    assert usage_of({"usage": {"prompt_tokens": MAX_COUNT, "completion_tokens": huge}}) == Usage(MAX_COUNT, 0, 0)


def test_responses_api_names() -> None:
    usage = {"input_tokens": 30, "output_tokens": 4, "input_tokens_details": {"cached_tokens": 16}}
    assert usage_of({"usage": usage}) == Usage(30, 4, 16)
    assert usage_of({"type": "response.completed", "response": {"usage": usage}}) == Usage(30, 4, 16)


def test_stream_whole() -> None:
    scanner = UsageScanner()
    scanner.feed(STREAM)
    assert scanner.finish() == Usage(1400, 12, 1392)


def test_stream_cut_anywhere() -> None:
    for cut in range(1, len(STREAM)):
        scanner = UsageScanner()
        scanner.feed(STREAM[:cut])
        scanner.feed(STREAM[cut:])
        assert scanner.finish() == Usage(1400, 12, 1392), cut


def test_stream_byte_by_byte_with_crlf() -> None:
    scanner = UsageScanner()
    for i in range(len(STREAM)):
        scanner.feed(STREAM.replace(b"\n", b"\r\n")[i:i + 1])
    scanner.feed(STREAM.replace(b"\n", b"\r\n")[len(STREAM):])
    assert scanner.finish() == Usage(1400, 12, 1392)


def test_stream_without_usage() -> None:
    scanner = UsageScanner()
    scanner.feed(chunk("a") + chunk("b") + b"data: [DONE]\n\n")
    assert scanner.finish() is None


def test_repeated_usage_last_wins() -> None:
    scanner = UsageScanner()
    scanner.feed(chunk("a", {"prompt_tokens": 10, "completion_tokens": 1}))
    scanner.feed(chunk("b", {"prompt_tokens": 10, "completion_tokens": 2}))
    assert scanner.usage == Usage(10, 2, 0)


def test_last_line_without_line_end() -> None:
    scanner = UsageScanner()
    scanner.feed(chunk(usage=USAGE).rstrip(b"\n"))
    assert scanner.usage is None
    assert scanner.finish() == Usage(1400, 12, 1392)


def test_content_that_mentions_usage_is_not_usage() -> None:
    scanner = UsageScanner()
    scanner.feed(chunk('the "usage": {"prompt_tokens": 9} field'))
    scanner.feed(b'data: {"usage": {broken\n\n')
    assert scanner.finish() is None


def test_over_long_line_is_dropped_and_scanning_resumes() -> None:
    scanner = UsageScanner()
    scanner.feed(b"data: " + b"x" * (1 << 20))
    scanner.feed(b"y" * 100 + b'"usage": {"prompt_tokens": 1}\n\n')  # the end of that long line: not parsed
    assert scanner.usage is None
    scanner.feed(chunk(usage=USAGE))
    assert scanner.finish() == Usage(1400, 12, 1392)


def test_usage_tap_reads_json_at_the_end_and_streams_as_they_go() -> None:
    tap = UsageTap(stream=False)
    for piece in (b'{"id": "x", "usage": {"prompt_tokens": 7, ', b'"completion_tokens": 3, ',
                  b'"prompt_tokens_details": {"cached_tokens": 5}}}'):
        tap.feed(piece)
    assert tap.finish() == Usage(7, 3, 5)
    stream = UsageTap(stream=True)
    stream.feed(b'data: {"choices": [], "usage": null}\n\ndata: {"choices": [], "usa')
    stream.feed(b'ge": {"prompt_tokens": 4, "completion_tokens": 2}}\n\ndata: [DONE]\n\n')
    assert stream.finish() == Usage(4, 2, 0)
    assert UsageTap(stream=False).finish() is None
    big = UsageTap(stream=False)
    big.feed(b" " * (1 << 20) + b'{"usage": {"prompt_tokens": 1}}')  # over the limit: not kept
    assert big.finish() is None
    assert usage_of_body(b'data: {"usage": {"prompt_tokens": 9, "completion_tokens": 1}}\n\n', True) == Usage(9, 1, 0)
    assert usage_of_body(b'{"usage": {"input_tokens": 2, "output_tokens": 8}}', False) == Usage(2, 8, 0)


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"id": 1, "usage": {"prompt_tokens": 4, "prompt_tokens_details": {"cached_tokens": 3}, '
     b'"completion_tokens": 2}}', Usage(4, 2, 3)),
    (b'{"usage" :\n {"prompt_tokens": 4}}', Usage(4, 0, 0)),
    # a later "usage" key that is not the answer's: the whole answer is read
    (b'{"usage": {"prompt_tokens": 1}, "tool": {"usage": 5}}', Usage(1, 0, 0)),
    (b'{"usage": null, "extra": {"prompt_tokens": 9}}', None),
    (b'{"text": "say \\"usage\\": {\\"prompt_tokens\\": 9}"}', None),  # inside a string: not a key
    (b'{"usage": {"prompt_tokens": 1', None),  # cut short: not JSON
    # the last "usage" key belongs to another object: only the answer's own counts
    (b'{"usage": {"prompt_tokens": 10, "completion_tokens": 5}, "meta": {"usage": {"prompt_tokens": 999}}}',
     Usage(10, 5, 0)),
    (b'{"usage": {"prompt_tokens": 10}, "meta": {"usage": {"prompt_tokens": 999}}, "x": 1}', Usage(10, 0, 0)),
    (b'{"choices": [], "meta": {"usage": {"prompt_tokens": 999}}}', None),
    (b'{"usage": {"prompt_tokens": 2}, "system_fingerprint": null}\n', Usage(2, 0, 0)),
])
def test_usage_from_json_reads_the_usage_object_alone_or_falls_back(body: bytes, expected: Usage | None) -> None:
    assert usage_from_json(body) == expected
