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

__all__ = ["EventSplitter", "StreamRecorder", "ends_with_done", "is_done_event"]

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
