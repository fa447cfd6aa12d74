"""Incremental Server-Sent-Events framing, to record streamed answers and see them end cleanly.

Theory of operation (https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream):
a line ends with CRLF, LF or a lone CR, and an event ends at the first empty line. The splitter
keeps the bytes of the event being built and where its current line starts; each feed scans
only the new bytes. Events come out byte-exact, terminating blank line included, so joining them
gives back the input. A CR that ends the buffered bytes is held back until the next byte says
whether it is a lone CR or half of a CRLF, so the events are the same however the stream was cut
into chunks; :meth:`EventSplitter.flush` settles it at end of stream.

A chat-completions stream ends with the event ``data: [DONE]``; :class:`StreamRecorder` keeps the
whole body and, at its end, reports ``done`` when that event arrived and only whitespace followed
it (:func:`ends_with_done`).
"""

from __future__ import annotations

import re

import orjson
import xxhash

__all__ = ["EventSplitter", "ResumeMismatch", "SentPrint", "Splice", "StreamRecorder", "ends_with_done",
           "event_content", "is_done_event"]

_LINE_END = re.compile(rb"\r\n?|\n")
_DONE = b"[DONE]"


class EventSplitter:
    """Cuts a byte stream into complete SSE events, whatever the chunk boundaries."""

    __slots__ = ("_buf", "_line_start")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._line_start = 0  # where the unfinished line of the buffered event begins

    @property
    def pending(self) -> bytes:
        """Bytes received that are not yet part of a complete event."""
        return bytes(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every event it completes, each with its terminating blank line."""
        self._buf += data
        return self._split(final=False)

    def flush(self) -> list[bytes]:
        """End of stream: settle a held-back trailing CR, which is a line end after all.

        Returns the event this completes, if any; whatever stays in ``pending`` was never terminated.
        """
        return self._split(final=True)

    def _split(self, final: bool) -> list[bytes]:
        events: list[bytes] = []
        buf = self._buf
        while (match := _LINE_END.search(buf, self._line_start)) is not None:
            end = match.end()
            if not final and end == len(buf) and match.group() == b"\r":
                break  # a CR at the end of the buffer may be the first half of a CRLF
            if match.start() == self._line_start:  # an empty line ends the event
                events.append(bytes(buf[:end]))
                del buf[:end]
                self._line_start = 0
            else:
                self._line_start = end
        return events


def _data_field(event: bytes) -> bytes | None:
    """The event's data buffer as the spec assembles it; None when it has no data line."""
    values: list[bytes] = []
    for line in _LINE_END.split(event):
        name, colon, value = line.partition(b":")
        if name != b"data":
            continue  # other fields, comments (":...") and blank lines
        if colon and value.startswith(b" "):
            value = value[1:]
        values.append(value)
    return b"\n".join(values) if values else None


def is_done_event(event: bytes) -> bool:
    """Is this the end-of-stream event, whose data is exactly ``[DONE]``?"""
    return _data_field(event) == _DONE


class StreamRecorder:
    """Keeps a streamed body byte-exact and tells, at its end, whether it ended with
    ``data: [DONE]``.

    Nothing is parsed while the stream flows (each event cost a split and a field parse, ~7 % of
    a streaming worker's samples, py-spy): :attr:`done` looks once, at the end. The pieces are
    kept as given, not copied: a coalescing leader holds the same ``bytes`` objects for a
    follower who may still join (ntonix/cache/coalescer.py), so the two share one copy.
    """

    __slots__ = ("_pieces", "_size")

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        """Record the next chunk of the body."""
        self._pieces.append(data)
        self._size += len(data)

    @property
    def body(self) -> bytes:
        pieces = self._pieces
        if len(pieces) != 1:
            self._pieces = pieces = [b"".join(pieces)]
        return bytes(pieces[0])

    @property
    def size(self) -> int:
        """Bytes recorded so far."""
        return self._size

    @property
    def done(self) -> bool:
        """Has a [DONE] event arrived with nothing but whitespace after it?"""
        return ends_with_done(self.body)


_USUAL_END = b"\n\ndata: " + _DONE + b"\n\n"


def ends_with_done(body: bytes | bytearray) -> bool:
    """Does the SSE stream ``body`` end with a ``[DONE]`` event, nothing but whitespace after it?

    The usual end (LF framing, ``data: [DONE]`` then a blank line) is recognised from its last
    bytes: an LF followed by an empty line ends the previous event, so the last event is exactly
    ``data: [DONE]``. Anything else goes through :class:`EventSplitter` (the same events however
    the body was cut, so all at once is as good as chunk by chunk).
    """
    if _DONE not in body:
        return False
    if body.endswith(_USUAL_END) or body == _USUAL_END[2:]:
        return True
    splitter = EventSplitter()
    done_end: int | None = None
    offset = 0
    for event in splitter.feed(bytes(body)) + splitter.flush():
        offset += len(event)
        if is_done_event(event):
            done_end = offset
    return done_end is not None and not body[done_end:].strip()


class ResumeMismatch(ValueError):
    """A new run of a request does not carry what the client was already sent."""


def event_content(event: bytes) -> bytes | None:
    """What two runs of one request must agree on in this event: its data, and of a JSON
    object that has ``choices`` only those (sorted keys): the chunk's ``id``, ``created``,
    ``system_fingerprint``, a server's timings and the usage (cached prompt tokens) differ from
    run to run. None for an event without data (a comment, a keep-alive)."""
    data = _data_field(event)
    if data is None:
        return None
    try:
        obj = orjson.loads(data)
        if isinstance(obj, dict) and "choices" in obj:
            return orjson.dumps(obj["choices"], option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONDecodeError, TypeError):  # not JSON; or nested deeper than orjson writes
        pass
    return data


class SentPrint:
    """What a client was sent of an answer, kept so that another run of the same request can
    take over where it stopped (a coalesced follower whose leader stopped publishing,
    ntonix/gateway/bodies.py ``FollowerBody``), without keeping the bytes themselves.

    A plain body: its length and xxh3-128 hash; the new run must begin with the same bytes. An
    event stream (``events``): the :func:`event_content` of each complete event, hashed in order,
    and the bytes of an event begun; the new run must carry the same content, event for event
    (so the text the client has is the text the new run continues), then go on from there,
    beginning its next event with those bytes when the client has part of one.

    The events are read lazily: the chunks sent are only held (up to ``hold`` bytes, the same
    ``bytes`` objects) and read when that much has gathered or a new run takes over, so a
    follower whose leader never fails, and whose answer is shorter than ``hold``, parses
    nothing (the parse costs ~5 µs an event). An event left unfinished past ``hold`` bytes
    makes the answer unresumable (:attr:`resumable`), so nothing grows without bound.
    """

    __slots__ = ("_hash", "_held", "_held_size", "_hold", "_split", "count", "done", "events", "resumable", "size")

    def __init__(self, events: bool, hold: int = 64 * 1024) -> None:
        self.events = events
        self.size = 0  # bytes fed
        self.count = 0  # complete events with content
        self.done = False  # the last complete event with content was data: [DONE]
        self.resumable = True
        self._hash = xxhash.xxh3_128()
        self._split: EventSplitter | None = EventSplitter() if events else None
        self._held: list[bytes] = []
        self._held_size = 0
        self._hold = hold

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self._split is None:
            self._hash.update(data)
            return
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size > self._hold:
            self.settle()

    def settle(self) -> None:
        """Read the chunks held so far (an event stream's)."""
        split = self._split
        if split is None or not self._held:
            return
        held, self._held, self._held_size = self._held, [], 0
        if not self.resumable:
            return
        for chunk in held:
            for event in split.feed(chunk):
                self.add(event)
        if len(split.pending) > self._hold:
            self.resumable = False  # one event longer than we would keep: give up, and free it
            self._split = EventSplitter()

    def add(self, event: bytes) -> bool:
        """Count one complete event; whether it had content."""
        content = event_content(event)
        if content is None:
            return False
        self._hash.update(len(content).to_bytes(8, "big"))
        self._hash.update(content)
        self.count += 1
        self.done = content == _DONE
        return True

    @property
    def pending(self) -> bytes:
        """The bytes of an event begun and not finished (an event stream's; after :meth:`settle`)."""
        return self._split.pending if self._split is not None else b""

    def digest(self) -> bytes:
        return self._hash.digest()


class Splice:
    """A new run of a request, fed chunk by chunk: :meth:`feed` returns what the client still
    needs of it (``b""`` while the new run is still inside what was sent), and raises
    :class:`ResumeMismatch` once it is clear that it does not carry what was sent."""

    __slots__ = ("_count", "_digest", "_held", "_matched", "_prefix", "_seen", "_size", "passing")

    def __init__(self, sent: SentPrint) -> None:
        sent.settle()
        if not sent.resumable:
            raise ResumeMismatch("what was sent cannot be compared (an event past the bytes kept)")
        # What was sent, as of now (the caller may go on feeding its print).
        self._count, self._size, self._digest = sent.count, sent.size, sent.digest()
        self._seen = SentPrint(sent.events)
        self._prefix = sent.pending  # the client has this much of the event after the matched ones
        self._held = b""
        # The complete events match (none were sent): what is left to check is the begun one.
        self._matched = sent.events and sent.count == 0
        self.passing = (self._matched and not self._prefix) or (not sent.events and sent.size == 0)

    def feed(self, data: bytes) -> bytes:
        if self.passing:
            return data
        if self._matched:
            return self._past(data)
        seen = self._seen
        if seen._split is None:
            head = data[: self._size - seen.size]
            seen.feed(head)
            if seen.size < self._size:
                return b""
            if seen.digest() != self._digest:
                raise ResumeMismatch("the backend's new answer differs")
            self.passing = True
            return data[len(head):]
        events = seen._split.feed(data)
        for i, event in enumerate(events):
            if seen.add(event) and seen.count == self._count:
                if seen.digest() != self._digest:
                    raise ResumeMismatch("the backend's new answer differs")
                self._matched = True
                return self._past(b"".join(events[i + 1:]) + seen._split.pending)
        return b""

    def _past(self, rest: bytes) -> bytes:
        """Bytes after the last complete event the client has: first, the part of the next
        event it has too."""
        held, prefix = self._held + rest, self._prefix
        n = min(len(held), len(prefix))
        if held[:n] != prefix[:n]:
            raise ResumeMismatch("the backend's new answer differs")
        if len(held) < len(prefix):
            self._held = held
            return b""
        self._held = b""
        self.passing = True
        return held[len(prefix):]

    def finish(self) -> None:
        """The new run ended: raise if it ended inside what was sent."""
        if not self.passing:
            raise ResumeMismatch("the backend's new answer is shorter")
