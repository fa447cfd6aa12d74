from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntonix.core.sse import (
    EventSplitter,
    ResumeMismatch,
    SentPrint,
    Splice,
    StreamRecorder,
    event_content,
    is_done_event,
)

LF_STREAM = b'data: {"a":1}\n\ndata: {"b":2}\nid: 7\n\n: keep-alive\n\ndata: [DONE]\n\n'
CRLF_STREAM = LF_STREAM.replace(b"\n", b"\r\n")
CR_STREAM = LF_STREAM.replace(b"\n", b"\r")
MIXED_STREAM = b"data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\r\n\ndata: e\n\r\n"


def split_all(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    s = EventSplitter()
    events = [e for c in chunks for e in s.feed(c)]
    return events + s.flush(), s.pending


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- EventSplitter ---------------------------------------------------------------------------


def test_lf_framing() -> None:
    events, pending = split_all([LF_STREAM])
    assert events == [b'data: {"a":1}\n\n', b'data: {"b":2}\nid: 7\n\n', b": keep-alive\n\n", b"data: [DONE]\n\n"]
    assert pending == b""


def test_crlf_framing() -> None:
    s = EventSplitter()
    assert s.feed(CRLF_STREAM) == [
        b'data: {"a":1}\r\n\r\n',
        b'data: {"b":2}\r\nid: 7\r\n\r\n',
        b": keep-alive\r\n\r\n",
        b"data: [DONE]\r\n\r\n",
    ]
    assert s.pending == b""


def test_cr_framing_holds_the_last_cr_until_the_next_byte() -> None:
    s = EventSplitter()
    events = s.feed(CR_STREAM)
    assert events == [b'data: {"a":1}\r\r', b'data: {"b":2}\rid: 7\r\r', b": keep-alive\r\r"]
    assert s.pending == b"data: [DONE]\r\r"
    assert s.flush() == [b"data: [DONE]\r\r"]
    assert s.pending == b""


def test_cr_event_released_by_next_byte() -> None:
    s = EventSplitter()
    assert s.feed(b"data: x\r\r") == []
    assert s.feed(b"d") == [b"data: x\r\r"]
    assert s.pending == b"d"


def test_mixed_line_endings() -> None:
    events, _ = split_all([MIXED_STREAM])
    assert events == [b"data: a\r\n\r\n", b"data: b\n\n", b"data: c\r\r", b"data: d\r\n\n", b"data: e\n\r\n"]


def test_split_inside_crlf_pair() -> None:
    s = EventSplitter()
    assert s.feed(b"data: x\r") == []
    assert s.feed(b"\n\r") == []
    assert s.feed(b"\n") == [b"data: x\r\n\r\n"]
    assert s.pending == b""


def test_incomplete_event_stays_pending() -> None:
    s = EventSplitter()
    assert s.feed(b"data: one\n\ndata: tw") == [b"data: one\n\n"]
    assert s.pending == b"data: tw"
    assert s.feed(b"o\n") == []
    assert s.pending == b"data: two\n"
    assert s.flush() == []
    assert s.pending == b"data: two\n"


def test_extra_blank_lines_are_empty_events() -> None:
    assert split_all([b"data: a\n\n\n\r\n"])[0] == [b"data: a\n\n", b"\n", b"\r\n"]


def test_empty_feed() -> None:
    s = EventSplitter()
    assert s.feed(b"") == []
    assert s.pending == b""


@pytest.mark.parametrize("stream", [LF_STREAM, CRLF_STREAM, CR_STREAM, MIXED_STREAM])
def test_every_single_split_point_and_byte_by_byte(stream: bytes) -> None:
    whole, _ = split_all([stream])
    assert b"".join(whole) == stream
    for i in range(len(stream) + 1):
        assert split_all([stream[:i], stream[i:]]) == (whole, b"")
    assert split_all([stream[i : i + 1] for i in range(len(stream))]) == (whole, b"")


_line = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"") or b"x")
_eol = st.sampled_from([b"\n", b"\r\n", b"\r"])
_event = st.builds(
    lambda lines, ends, last: b"".join(line + end for line, end in zip(lines, ends, strict=False)) + last,
    st.lists(_line, min_size=0, max_size=4),
    st.lists(_eol, min_size=4, max_size=4),
    _eol,
)


@given(
    events=st.lists(_event, max_size=6),
    tail=st.binary(max_size=10),
    data=st.data(),
)
def test_reassembly_is_byte_identical_under_any_split(events: list[bytes], tail: bytes, data: st.DataObject) -> None:
    stream = b"".join(events) + tail
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    s = EventSplitter()
    out = [e for chunk in cut(stream, points) for e in s.feed(chunk)]
    assert b"".join(out) + s.pending == stream
    out += s.flush()
    assert b"".join(out) + s.pending == stream
    assert out == split_all([stream])[0]  # the same events however the stream was cut


@given(st.binary(max_size=40), st.data())
def test_arbitrary_bytes_never_lost(stream: bytes, data: st.DataObject) -> None:
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    s = EventSplitter()
    out = [e for chunk in cut(stream, points) for e in s.feed(chunk)]
    assert b"".join(out) + s.pending == stream


# --- is_done_event ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        b"data: [DONE]\n\n",
        b"data:[DONE]\n\n",
        b"data: [DONE]\r\n\r\n",
        b"data: [DONE]\r\r",
        b"event: end\ndata: [DONE]\n\n",
        b": comment\r\ndata: [DONE]\r\n\r\n",
        b"data: [DONE]",
    ],
)
def test_done_event(event: bytes) -> None:
    assert is_done_event(event)


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"choices": []}\n\n',
        b"data:  [DONE]\n\n",
        b"data: [DONE] \n\n",
        b"data: [done]\n\n",
        b"data: [DONE]\ndata: more\n\n",
        b": data: [DONE]\n\n",
        b"event: [DONE]\n\n",
        b"\n",
        b"",
    ],
)
def test_not_done_event(event: bytes) -> None:
    assert not is_done_event(event)


# --- StreamRecorder --------------------------------------------------------------------------


def record(chunks: list[bytes]) -> StreamRecorder:
    r = StreamRecorder()
    for c in chunks:
        r.feed(c)
    return r


@pytest.mark.parametrize("stream", [LF_STREAM, CRLF_STREAM, CR_STREAM])
def test_recorder_complete_stream(stream: bytes) -> None:
    for i in range(len(stream) + 1):
        r = record([stream[:i], stream[i:]])
        assert r.done
        assert r.body == stream
        assert r.size == len(stream)


@pytest.mark.parametrize("stream", [LF_STREAM, CRLF_STREAM, CR_STREAM])
def test_recorder_stream_cut_before_done_is_not_done(stream: bytes) -> None:
    done_at = stream.index(b"data: [DONE]")
    for i in range(done_at + len(b"data: [DONE]") + 1):
        r = record([stream[:i]])
        assert not r.done, i
        assert r.body == stream[:i]


def test_recorder_done_needs_the_terminating_blank_line() -> None:
    assert not record([b"data: x\n\ndata: [DONE]"]).done
    assert not record([b"data: x\n\ndata: [DONE]\n"]).done
    assert record([b"data: x\r\n\r\ndata: [DONE]\r\n\r"]).done  # that CR ends it, LF or not
    assert record([b"data: x\n\ndata: [DONE]\n\n"]).done


def test_recorder_tolerates_trailing_whitespace() -> None:
    assert record([b"data: [DONE]\n\n", b"\n", b"  \r\n", b"\t"]).done
    assert record([b"data: [DONE]\r\n\r\n\r\n"]).done


def test_recorder_data_after_done_is_not_a_clean_end() -> None:
    r = record([b"data: [DONE]\n\n", b'data: {"x": 1}\n\n'])
    assert not r.done
    r.feed(b"data: [DONE]\n\n")
    assert r.done


def test_recorder_empty() -> None:
    r = StreamRecorder()
    assert not r.done
    assert r.body == b""
    assert r.size == 0


def done_by_events(body: bytes) -> bool:
    """The definition, event by event: a [DONE] event, then nothing but whitespace."""
    events, _ = split_all([body])
    offset, done_end = 0, None
    for e in events:
        offset += len(e)
        if is_done_event(e):
            done_end = offset
    return done_end is not None and not body[done_end:].strip()


_pieces = st.sampled_from([b"data: [DONE]", b"data:[DONE]", b"data: x", b"id: 3", b": c", b"[DONE]", b" ", b"\t",
                           b"\n", b"\r", b"\r\n", b"\n\n", b"data: [DONE]\n\n"])


@given(st.lists(_pieces, max_size=12), st.data())
def test_the_recorder_decides_at_the_end_as_the_events_do(parts: list[bytes], data: st.DataObject) -> None:
    """done looks at the whole body once (the usual ending by its last bytes): the same answer as
    splitting it into events and checking each, however the body arrived."""
    body = b"".join(parts)
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=4))
    assert record(cut(body, points)).done == done_by_events(body)


@pytest.mark.parametrize("body", [LF_STREAM, CRLF_STREAM, CR_STREAM, MIXED_STREAM + b"data: [DONE]\n\n",
                                  b"data: [DONE]\nid: 5\n\n", b"data: x\n\n\ndata: [DONE]\n\n", b"data: [DONE]\n\n"])
def test_the_usual_and_the_unusual_endings(body: bytes) -> None:
    assert record([body]).done == done_by_events(body) is True


# ----------------------------------------------------------------------------- resuming another run


def chunk_event(run: str, text: str) -> bytes:
    """A chat-completion chunk as servers write it: an id and a time of the run's own."""
    return (b'data: {"id":"chatcmpl-' + run.encode() + b'","object":"chat.completion.chunk","created":17'
            + run.encode() + b',"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}\n\n')


def run_of(run: str, words: list[str]) -> list[bytes]:
    return [chunk_event(run, w) for w in words] + [b"data: [DONE]\n\n"]


def resume(sent_chunks: list[bytes], new_chunks: list[bytes], events: bool = True) -> bytes:
    """What a client that got ``sent_chunks`` of one run gets of another run after a splice."""
    sent = SentPrint(events)
    for c in sent_chunks:
        sent.feed(c)
    splice = Splice(sent)
    out = b"".join(splice.feed(c) for c in new_chunks)
    splice.finish()
    return out


WORDS = ["The", " sky", " is", " blue", "."]


@pytest.mark.parametrize("cut", range(0, 6))
def test_another_run_with_the_same_content_takes_over_after_the_events_sent(cut: int) -> None:
    first, second = run_of("1", WORDS), run_of("2", WORDS)
    # Whole events sent; the new run's chunks cut anywhere.
    new = b"".join(second)
    for size in (1, 7, len(new)):
        got = resume(first[:cut], [new[i:i + size] for i in range(0, len(new), size)])
        assert got == b"".join(second[cut:])


def test_a_client_in_the_middle_of_an_event_gets_the_rest_of_that_event() -> None:
    first, second = run_of("1", WORDS), run_of("1", WORDS)  # the same bytes: one run's id held twice
    sent = b"".join(first[:2]) + first[2][:20]
    got = resume([sent], [b"".join(second)])
    assert sent + got == b"".join(second)


def test_the_begun_event_must_match_byte_for_byte() -> None:
    first, second = run_of("1", WORDS), run_of("2", WORDS)
    with pytest.raises(ResumeMismatch):
        resume([b"".join(first[:2]) + first[2][:30]], [b"".join(second)])  # the id differs inside it


def test_other_content_is_a_mismatch() -> None:
    with pytest.raises(ResumeMismatch, match="differs"):
        resume(run_of("1", WORDS)[:3], run_of("2", ["The", " sea", " is", " blue", "."]))


def test_a_shorter_run_is_a_mismatch() -> None:
    with pytest.raises(ResumeMismatch, match="shorter"):
        resume(run_of("1", WORDS)[:4], run_of("2", WORDS[:2]))


def test_keepalive_comments_and_usage_do_not_count_as_content() -> None:
    usage1 = b'data: {"id":"a","choices":[],"usage":{"prompt_tokens":5,"details":{"cached_tokens":0}}}\n\n'
    usage2 = b'data: {"id":"b","choices":[],"usage":{"prompt_tokens":5,"details":{"cached_tokens":4}}}\n\n'
    first = [chunk_event("1", "Hi"), b": keep-alive\n\n", usage1]
    second = [b": ping\n\n", chunk_event("2", "Hi"), usage2, b"data: [DONE]\n\n"]
    assert resume(first, second) == b"data: [DONE]\n\n"


def test_a_plain_body_must_begin_with_the_same_bytes() -> None:
    assert resume([b'{"a":', b"1"], [b'{"a":1', b',"b":2}'], events=False) == b',"b":2}'
    with pytest.raises(ResumeMismatch, match="differs"):
        resume([b'{"a":1'], [b'{"a":2,"b":2}'], events=False)
    assert resume([], [b"x"], events=False) == b"x"


def test_event_content_keeps_only_the_choices_of_a_json_chunk() -> None:
    assert event_content(chunk_event("1", "Hi")) == event_content(chunk_event("9", "Hi"))
    assert event_content(b"data: [DONE]\n\n") == b"[DONE]"
    assert event_content(b": comment\n\n") is None
    assert event_content(b'data: {"error": {"message": "x"}}\n\n') == b'{"error": {"message": "x"}}'


def test_the_print_reads_nothing_until_its_hold_fills_or_it_is_settled() -> None:
    sent = SentPrint(True, hold=1000)
    events = run_of("1", WORDS)
    for e in events[:3]:
        sent.feed(e)
    assert sent.count == 0 and sent.size == sum(map(len, events[:3]))  # held, not parsed
    sent.settle()
    assert sent.count == 3 and not sent.done
    small = SentPrint(True, hold=300)
    for e in events:
        small.feed(e)
    assert small.count >= 2  # parsed as the hold filled
    small.settle()
    assert small.count == len(events) and small.done


def test_an_event_longer_than_the_hold_makes_the_answer_unresumable() -> None:
    sent = SentPrint(True, hold=100)
    sent.feed(chunk_event("1", "Hi"))
    sent.feed(b"data: " + b"x" * 500)  # never ends
    sent.settle()
    assert not sent.resumable and sent.pending == b""  # freed
    with pytest.raises(ResumeMismatch):
        Splice(sent)


def test_choices_nested_deeper_than_orjson_writes_are_compared_as_they_are() -> None:
    deep = b'data: {"choices": ' + b"[" * 300 + b"]" * 300 + b"}\n\n"
    assert event_content(deep) == deep[6:-2]
