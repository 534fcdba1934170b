"""An incremental parser of Server-Sent Events (the ``text/event-stream`` format).

It follows the WHATWG HTML "event stream interpretation" rules: a line ends
at CRLF, LF or CR (and at nothing else, not at the other characters Python's
``str.splitlines`` knows); a line that starts with ``:`` is a comment; a
field's value loses one leading space; several ``data`` lines join with
``\\n``; an empty line dispatches the event, and an event whose data is empty
is not dispatched; ``id`` is kept from one event to the next and ignored if
it holds NUL; ``retry`` counts only when it is all ASCII digits; a leading
byte order mark is dropped. At the end of the stream an unfinished event is
discarded.

The parser is sans-I/O: :meth:`SSEParser.feed` takes whatever bytes arrived
and returns the events they completed, so the result does not depend on how
the stream was cut into chunks, down to single bytes, and a multi-byte UTF-8
character split across chunks decodes whole. Bytes that are not UTF-8 become
U+FFFD rather than an error. It only reads copies of what the client got;
nothing here touches the forwarded bytes.
"""

from __future__ import annotations

import codecs
import re
from typing import Final

import attrs

DEFAULT_EVENT_TYPE: Final = "message"

_LINE_END: Final = re.compile(r"\r\n|\r|\n")
_BOM: Final = "\ufeff"


@attrs.frozen
class SSEEvent:
    """One dispatched event.

    ``event`` is the type (``"message"`` when the stream named none), ``data``
    the joined data lines, ``id`` the last event ID seen so far in the stream
    (or ``None``), and ``retry`` the reconnection time this event's block set,
    in milliseconds (or ``None``).
    """

    data: str
    event: str = DEFAULT_EVENT_TYPE
    id: str | None = None
    retry: int | None = None


@attrs.define
class SSEParser:
    """Turns the bytes of an event stream into :class:`SSEEvent` objects.

    Feed it chunks in order with :meth:`feed`, then call :meth:`close` at the
    end of the stream. :attr:`comments` counts the comment lines seen.
    """

    comments: int = 0
    _decoder: codecs.IncrementalDecoder = attrs.field(
        factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    # The start of a line whose end has not arrived yet.
    _partial: list[str] = attrs.field(factory=list)
    # The last chunk ended in CR: a LF that starts the next one belongs to it.
    _after_cr: bool = False
    _started: bool = False
    _data: list[str] = attrs.field(factory=list)
    _event_type: str = ""
    _last_id: str | None = None
    _retry: int | None = None
    # Whether the current event block has any line at all (for `pending`).
    _in_block: bool = False

    @property
    def pending(self) -> bool:
        """Whether an event has begun that no empty line has ended yet."""
        return self._in_block or any(self._partial)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse the next bytes of the stream; return the events they completed."""
        return self._feed_text(self._decoder.decode(chunk))

    def close(self) -> list[SSEEvent]:
        """End the stream; an unfinished event is discarded, as the spec says.

        Returns the events completed by the last bytes the decoder held back
        (an incomplete UTF-8 sequence becomes U+FFFD).
        """
        return self._feed_text(self._decoder.decode(b"", final=True))

    def _feed_text(self, text: str) -> list[SSEEvent]:
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix(_BOM)
        if self._after_cr:
            self._after_cr = False
            if text.startswith("\n"):
                text = text[1:]

        events: list[SSEEvent] = []
        start = 0
        for match in _LINE_END.finditer(text):
            piece = text[start : match.start()]
            if self._partial:
                self._partial.append(piece)
                line = "".join(self._partial)
                self._partial.clear()
            else:
                line = piece
            event = self._line(line)
            if event is not None:
                events.append(event)
            start = match.end()
        if start < len(text):
            self._partial.append(text[start:])
        elif text.endswith("\r"):
            self._after_cr = True
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        self._in_block = True
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        # Any other field name is ignored, as the spec says.
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, self._data = self._data, []
        event_type, self._event_type = self._event_type, ""
        retry, self._retry = self._retry, None
        self._in_block = False
        if not data:
            return None
        return SSEEvent(
            data="\n".join(data),
            event=event_type or DEFAULT_EVENT_TYPE,
            id=self._last_id,
            retry=retry,
        )


def parse_sse(data: bytes) -> list[SSEEvent]:
    """Parse a whole event stream at once (an unfinished last event is dropped)."""
    parser = SSEParser()
    return [*parser.feed(data), *parser.close()]
