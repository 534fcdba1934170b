"""The SSE parser follows the event stream rules, whatever the chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_llmproxy._sse import SSEEvent, SSEParser, parse_sse


def _feed_all(chunks: list[bytes]) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events, parser


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_ends_a_line(newline: bytes) -> None:
    stream = b"data: a" + newline + b"data: b" + newline + newline

    assert parse_sse(stream) == [SSEEvent("a\nb")]


def test_other_unicode_line_breaks_stay_inside_the_data() -> None:
    stream = "data: a\u2028b\x0bc\x85d\n\n".encode()

    assert parse_sse(stream) == [SSEEvent("a\u2028b\x0bc\x85d")]


def test_comment_lines_are_skipped_and_counted() -> None:
    parser = SSEParser()

    events = parser.feed(b": keep-alive\n:\n\ndata: x\n: in between\n\n")

    assert events == [SSEEvent("x")]
    assert parser.comments == 3


def test_data_with_and_without_the_space() -> None:
    stream = b"data:tight\n\ndata: spaced\n\ndata:  two spaces\n\n"

    assert [e.data for e in parse_sse(stream)] == ["tight", "spaced", " two spaces"]


def test_a_field_without_colon_has_an_empty_value() -> None:
    assert parse_sse(b"data\ndata\n\n") == [SSEEvent("\n")]


def test_event_type_id_and_retry() -> None:
    stream = b"event: ping\nid: 7\nretry: 1500\ndata: {}\n\ndata: next\n\n"

    assert parse_sse(stream) == [
        SSEEvent("{}", event="ping", id="7", retry=1500),
        SSEEvent("next", event="message", id="7", retry=None),
    ]


def test_bad_retry_and_id_with_nul_are_ignored() -> None:
    stream = b"id: 1\n\ndata: a\nretry: 10s\nid: x\x00y\n\n"

    assert parse_sse(stream) == [SSEEvent("a", id="1", retry=None)]


def test_an_event_without_data_is_not_dispatched() -> None:
    assert parse_sse(b"event: ping\n\nid: 3\n\n") == []


def test_a_leading_byte_order_mark_is_dropped() -> None:
    assert parse_sse(b"\xef\xbb\xbfdata: x\n\n") == [SSEEvent("x")]


def test_an_unfinished_event_is_discarded_at_the_end() -> None:
    parser = SSEParser()

    events = parser.feed(b"data: done\n\ndata: cut")

    assert events == [SSEEvent("done")]
    assert parser.pending
    assert parser.close() == []


def test_cr_then_lf_in_the_next_chunk_is_one_line_end() -> None:
    events, _ = _feed_all([b"data: a\r", b"\ndata: b\r", b"", b"\n\r", b"\n"])

    assert events == [SSEEvent("a\nb")]


def test_a_character_split_across_chunks_decodes_whole() -> None:
    data = "data: café — 東京 🎉\n\n".encode()

    events, _ = _feed_all([data[i : i + 1] for i in range(len(data))])

    assert events == [SSEEvent("café — 東京 🎉")]


def test_invalid_utf8_becomes_a_replacement_character() -> None:
    assert parse_sse(b"data: a\xffb\n\n") == [SSEEvent("a\ufffdb")]


# Property tests: any stream, written with any line endings and cut anywhere.

_FIELD_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
    max_size=20,
)
_EVENTS = st.lists(
    st.tuples(
        st.lists(_FIELD_TEXT, min_size=1, max_size=3),
        st.one_of(st.none(), st.from_regex(r"[a-z][a-z._]{0,15}", fullmatch=True)),
        st.one_of(st.none(), st.from_regex(r"[0-9a-z]{1,8}", fullmatch=True)),
    ),
    max_size=8,
)
_NEWLINES = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """A stream text with random line endings and comments, and its events."""
    lines: list[str] = []
    expected: list[SSEEvent] = []
    last_id = None
    for data_lines, event_type, event_id in draw(_EVENTS):
        if draw(st.booleans()):
            lines.append(":" + draw(_FIELD_TEXT))
        if event_type is not None:
            lines.append(f"event: {event_type}")
        if event_id is not None:
            lines.append(f"id:{event_id}")
            last_id = event_id
        for line in data_lines:
            # A value that starts with a space needs the separating one.
            space = line.startswith(" ") or draw(st.booleans())
            lines.append(f"data:{' ' if space else ''}{line}")
        lines.append("")
        expected.append(
            SSEEvent("\n".join(data_lines), event=event_type or "message", id=last_id)
        )
    text = ""
    for line in lines:
        newline = draw(_NEWLINES)
        if not line and text.endswith("\r") and newline.startswith("\n"):
            # CR then LF would be one line end, not two.
            newline = "\r"
        text += line + newline
    return text.encode(), expected


@given(_streams(), st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_any_stream_cut_anywhere_gives_its_events(
    stream: tuple[bytes, list[SSEEvent]], cuts: list[int]
) -> None:
    data, expected = stream

    events, parser = _feed_all(_split(data, cuts))

    assert events == expected
    assert not parser.pending


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=20))
def test_chunking_never_changes_the_result(data: bytes, cuts: list[int]) -> None:
    whole, _ = _feed_all([data])

    events, _ = _feed_all(_split(data, cuts))

    assert events == whole


@given(st.binary(max_size=300))
def test_byte_by_byte_equals_whole(data: bytes) -> None:
    whole, _ = _feed_all([data])

    events, _ = _feed_all([data[i : i + 1] for i in range(len(data))])

    assert events == whole
