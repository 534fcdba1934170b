"""The event: one record per proxied request or WebSocket session, and its JSON.

An :class:`Event` is built on the request path from what the request already
had to touch (headers, body chunks, timings), so it holds raw bytes. Turning
it into JSON (decoding compressed bodies, choosing text or base64, naming
timestamps) happens in :meth:`Event.to_dict`, which only subscribers call,
off the request path. A WebSocket session's messages are held the same way
(:class:`WebSocketSession`): references to what passed, rendered later.
"""

from __future__ import annotations

import base64
import codecs
import datetime
import io
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import attrs
import orjson

from ._errors import ProxyError
from ._llm import safe_describe_llm

SCHEMA_VERSION: Final = 1
OUTCOMES: Final = frozenset(
    {"ok", "client_disconnected", "upstream_error", "upstream_timeout"}
)
# A decompressed body in an event is cut here, so that a small compressed
# response cannot blow up a subscriber's memory (a "zip bomb").
MAX_DECODED_BODY_BYTES: Final = 16 * 1024 * 1024

# Content types whose bodies are binary even when their bytes happen to be
# valid UTF-8; they are always base64 in the event.
_BINARY_TYPE_PREFIXES = (
    b"audio/",
    b"image/",
    b"video/",
    b"application/octet-stream",
    b"application/zip",
    b"application/pdf",
)

Headers = Sequence[tuple[bytes, bytes]]


def _decode_zlib(data: bytes, wbits: int) -> bytes:
    decompressor = zlib.decompressobj(wbits)
    # One byte past the cap tells a cut body from one exactly at the cap.
    return decompressor.decompress(data, MAX_DECODED_BODY_BYTES + 1)


def _decode_gzip(data: bytes) -> bytes:
    return _decode_zlib(data, 16 + zlib.MAX_WBITS)


def _decode_deflate(data: bytes) -> bytes:
    # "deflate" is meant to be zlib-wrapped, but some servers send raw deflate.
    try:
        return _decode_zlib(data, zlib.MAX_WBITS)
    except zlib.error:
        return _decode_zlib(data, -zlib.MAX_WBITS)


def _decode_brotli(data: bytes) -> bytes:
    import brotli  # type: ignore[import-untyped]  # ships no type hints

    # The limit stops the output from growing past the cap (a brotli bomb of
    # a few kilobytes decodes to gigabytes); the rest is never produced.
    decompressor = brotli.Decompressor()
    decoded: bytes = decompressor.process(
        data, output_buffer_limit=MAX_DECODED_BODY_BYTES + 1
    )
    return decoded[: MAX_DECODED_BODY_BYTES + 1]


def _decode_zstd(data: bytes) -> bytes:
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
    return reader.read(MAX_DECODED_BODY_BYTES + 1)


_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _decode_gzip,
    "x-gzip": _decode_gzip,
    "deflate": _decode_deflate,
    "br": _decode_brotli,
    "zstd": _decode_zstd,
}


def _content_decode(data: bytes, content_encoding: str) -> bytes | None:
    """Undo ``content_encoding`` (possibly a list); None when that fails."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        decoder = _DECODERS.get(coding)
        if decoder is None:
            return None
        try:
            data = decoder(data)
        except Exception:
            # A corrupt or cut body: the event keeps the raw bytes instead.
            return None
    return data


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _render_body(
    data: bytes, *, truncated: bool, content_type: bytes | None
) -> tuple[str | None, str]:
    if not data:
        return None, "utf-8"
    if content_type is None or not content_type.lower().startswith(
        _BINARY_TYPE_PREFIXES
    ):
        try:
            # A capture cut by the cap may end inside a multi-byte character;
            # the incremental decoder leaves that partial character out.
            decoder = codecs.getincrementaldecoder("utf-8")()
            text = decoder.decode(data, final=not truncated)
            # Nothing left (a lone partial character): as an empty body.
            return text or None, "utf-8"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(data).decode("ascii"), "base64"


def _render_headers(headers: Headers) -> dict[str, list[str]]:
    rendered: dict[str, list[str]] = {}
    for name, value in headers:
        key = name.decode("latin-1").lower()
        rendered.setdefault(key, []).append(value.decode("latin-1"))
    return rendered


def _parse_headers(rendered: Mapping[str, Sequence[str]]) -> list[tuple[bytes, bytes]]:
    return [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, values in rendered.items()
        for value in values
    ]


def _format_timestamp(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_timestamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _true_outcome(
    outcome: str, error: str | None, llm: Mapping[str, Any] | None
) -> tuple[str, str | None]:
    """The exchange's outcome, made ``upstream_error`` by an in-band error.

    A 2xx answer that carries an error event (found when the body is parsed,
    off the request path) is not a success, whatever the exchange looked like.
    """
    detail = (llm or {}).get("outcome_detail") or {}
    if outcome != "ok" or detail.get("outcome") != "upstream_error":
        return outcome, error
    message = detail.get("error_message") or "the upstream reported an error"
    return "upstream_error", error or f"in-band error: {message}"


def _parse_body(text: str | None, encoding: str) -> bytes:
    if text is None:
        return b""
    if encoding == "base64":
        return base64.b64decode(text)
    return text.encode("utf-8")


class WebSocketMessage(NamedTuple):
    """One message of a WebSocket session, as captured.

    ``data`` is ``str`` for a text message and ``bytes`` for a binary one; it
    holds only the first bytes of the message when the capture cap cut it,
    while ``size`` is always the message's true size in bytes (UTF-8 for
    text). ``at_ms`` is when the message passed, in ms since the handshake
    arrived.
    """

    from_client: bool
    at_ms: float
    data: str | bytes
    size: int


@attrs.frozen(kw_only=True)
class WebSocketSide:
    """What one side of a session sent: counts, bytes, and its close."""

    messages: int = 0
    bytes: int = 0
    close_code: int | None = None
    close_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object of this side (see docs/events.md)."""
        return {
            "messages": self.messages,
            "bytes": self.bytes,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WebSocketSide:
        """Rebuild a side from :meth:`to_dict`'s output."""
        return cls(
            messages=data["messages"],
            bytes=data["bytes"],
            close_code=data["close_code"],
            close_reason=data["close_reason"],
        )


def _render_message(message: WebSocketMessage) -> dict[str, Any]:
    data = message.data
    return {
        "from": "client" if message.from_client else "upstream",
        "at_ms": round(message.at_ms, 3),
        "type": "text" if isinstance(data, str) else "binary",
        "data": data if isinstance(data, str) else base64.b64encode(data).decode(),
        "size": message.size,
    }


def _parse_message(data: Mapping[str, Any]) -> WebSocketMessage:
    text = data["data"]
    if data["type"] != "text":
        text = base64.b64decode(text)
    elif not isinstance(text, str):
        msg = f"a text message's data must be a string, not {type(text).__name__}"
        raise TypeError(msg)
    return WebSocketMessage(
        from_client=data["from"] == "client",
        at_ms=data["at_ms"],
        data=text,
        size=data["size"],
    )


@attrs.frozen(kw_only=True)
class WebSocketSession:
    """What passed in one WebSocket session: the ``websocket`` object of its event.

    ``messages`` lists the captured messages of both directions in the order
    they passed, up to the response capture cap over both directions;
    ``messages_truncated`` says whether the cap left some out (or cut one).
    The counts of ``client`` and ``upstream`` are exact whatever the cap.
    ``closed_by`` names the side that closed first (``"client"`` or
    ``"upstream"``), or ``"proxy"`` when the proxy closed the session itself
    (at shutdown, or because the upstream misbehaved), with the code and
    reason it sent in ``proxy_close_code`` and ``proxy_close_reason``; it is
    ``None`` when no one closed (the handshake was refused, or the session was
    cut without a close). ``llm_messages`` holds upstream
    messages that the cap left out of ``messages`` but that look like
    Realtime API events the ``llm`` object needs (``response.done``,
    ``session.*``, ``error``); they are not part of the JSON form.
    """

    subprotocol: str | None = None
    closed_by: str | None = None
    proxy_close_code: int | None = None
    proxy_close_reason: str | None = None
    client: WebSocketSide = WebSocketSide()
    upstream: WebSocketSide = WebSocketSide()
    messages: Sequence[WebSocketMessage] = ()
    messages_truncated: bool = False
    llm_messages: Sequence[WebSocketMessage] = attrs.field(
        default=(), eq=False, repr=False
    )
    #: What ``messages`` and ``llm_messages`` hold, as counted against the
    #: capture cap; buffers measure events by it. Not part of the JSON form.
    captured_bytes: int = attrs.field(default=0, eq=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object of the session (see docs/events.md)."""
        return {
            "subprotocol": self.subprotocol,
            "closed_by": self.closed_by,
            "proxy_close_code": self.proxy_close_code,
            "proxy_close_reason": self.proxy_close_reason,
            "client": self.client.to_dict(),
            "upstream": self.upstream.to_dict(),
            "messages": [_render_message(message) for message in self.messages],
            "messages_truncated": self.messages_truncated,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WebSocketSession:
        """Rebuild a session from :meth:`to_dict`'s output."""
        messages = [_parse_message(message) for message in data["messages"]]
        return cls(
            subprotocol=data["subprotocol"],
            closed_by=data["closed_by"],
            # Events written before the proxy recorded its own closes.
            proxy_close_code=data.get("proxy_close_code"),
            proxy_close_reason=data.get("proxy_close_reason"),
            client=WebSocketSide.from_dict(data["client"]),
            upstream=WebSocketSide.from_dict(data["upstream"]),
            messages=messages,
            messages_truncated=data["messages_truncated"],
            captured_bytes=sum(len(message.data) for message in messages),
        )


@attrs.frozen(kw_only=True)
class Event:
    """One proxied request and its response, as recorded by the middleware.

    Headers are ``(name, value)`` byte pairs with lower-case names, secrets
    already redacted. Bodies are the captured bytes (up to the capture caps);
    ``response_body_content_encoding`` names the content coding still applied
    to ``response_body`` (``None`` once decoded). Keys of ``extra`` are added
    to the JSON object beside the fixed fields; that is how enrichers add
    fields of their own. ``response_chunk_marks`` holds, for the first
    response chunks sent, the offset in the response body where each ended
    and when it was sent (ms since arrival); the ``llm`` object's time to
    first token comes from them. ``websocket`` is set for a WebSocket session
    (``method`` ``"WEBSOCKET"``) and ``None`` for an HTTP exchange.
    """

    event_id: str
    request_id: str
    timestamp: float
    method: str
    path: str
    query: str
    status: int
    duration_ms: float
    ttfb_ms: float | None
    request_headers: Headers
    response_headers: Headers
    request_body: bytes
    request_body_size: int
    request_body_truncated: bool
    response_body: bytes
    response_body_size: int
    response_body_truncated: bool
    response_body_content_encoding: str | None = None
    response_chunk_marks: Sequence[tuple[int, float]] = attrs.field(
        default=(), eq=False, repr=False
    )
    streamed: bool
    outcome: str
    error: str | None
    websocket: WebSocketSession | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    schema_version: int = SCHEMA_VERSION
    _json: list[bytes] = attrs.field(
        factory=list, init=False, eq=False, repr=False, alias="_json"
    )
    _llm: list[dict[str, Any] | None] = attrs.field(
        factory=list, init=False, eq=False, repr=False, alias="_llm"
    )

    def to_dict(self) -> dict[str, Any]:
        """Return the event's JSON object, bodies decoded (see docs/events.md)."""
        request_body, request_encoding = _render_body(
            self.request_body,
            truncated=self.request_body_truncated,
            content_type=_header(self.request_headers, b"content-type"),
        )
        response_body, response_encoding, decoded_cut = self._render_response_body()
        llm = self.describe_llm()
        outcome, error = _true_outcome(self.outcome, self.error, llm)
        rendered: dict[str, Any] = {
            "schema_version": self.schema_version,
            "event_id": self.event_id,
            "request_id": self.request_id,
            "timestamp": _format_timestamp(self.timestamp),
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 3),
            "ttfb_ms": None if self.ttfb_ms is None else round(self.ttfb_ms, 3),
            "request_headers": _render_headers(self.request_headers),
            "response_headers": _render_headers(self.response_headers),
            "request_body": request_body,
            "request_body_encoding": request_encoding,
            "request_body_size": self.request_body_size,
            "request_body_truncated": self.request_body_truncated,
            "response_body": response_body,
            "response_body_encoding": response_encoding,
            "response_body_size": self.response_body_size,
            "response_body_truncated": self.response_body_truncated or decoded_cut,
            "streamed": self.streamed,
            "outcome": outcome,
            "error": error,
            "llm": llm,
        }
        if self.websocket is not None:
            # Only sessions have the object, so HTTP events keep their shape.
            rendered["websocket"] = self.websocket.to_dict()
        for key, value in self.extra.items():
            if key not in _OPTIONAL_FIELD_NAMES:
                rendered.setdefault(key, value)
        return rendered

    def captured_bytes(self) -> int:
        """The size of what the event captured: bodies, a session's messages.

        Buffers of the bus measure events by it.
        """
        size = len(self.request_body) + len(self.response_body)
        if self.websocket is not None:
            size += self.websocket.captured_bytes
        return size

    def describe_llm(self) -> dict[str, Any] | None:
        """Return the event's ``llm`` object (see docs/events.md), computed once.

        It parses the captured bodies, so only subscribers should call it (as
        :meth:`to_dict` does); ``None`` when the call is not an LLM call.
        """
        if not self._llm:
            self._llm.append(safe_describe_llm(self))
        return self._llm[0]

    def to_json(self) -> bytes:
        """Return the event as one line of JSON (no newline), computed once."""
        if not self._json:
            self._json.append(orjson.dumps(self.to_dict()))
        return self._json[0]

    def _render_response_body(self) -> tuple[str | None, str, bool]:
        """The response body as text or base64, and whether decoding cut it."""
        body = self.response_body
        coding = self.response_body_content_encoding
        cut = False
        if body and coding:
            decoded = _content_decode(body, coding)
            if decoded is None:
                # Undecodable: keep the bytes the client got, as base64.
                return base64.b64encode(body).decode("ascii"), "base64", False
            cut = len(decoded) > MAX_DECODED_BODY_BYTES
            body = decoded[:MAX_DECODED_BODY_BYTES]
        text, encoding = _render_body(
            body,
            truncated=self.response_body_truncated or cut,
            content_type=_header(self.response_headers, b"content-type"),
        )
        return text, encoding, cut

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Rebuild an event from :meth:`to_dict`'s output (bodies stay decoded).

        Raises:
            ProxyError: ``data`` lacks a field or holds a value of the wrong kind.
        """
        try:
            event = cls(
                event_id=data["event_id"],
                request_id=data["request_id"],
                timestamp=_parse_timestamp(data["timestamp"]),
                method=data["method"],
                path=data["path"],
                query=data["query"],
                status=data["status"],
                duration_ms=data["duration_ms"],
                ttfb_ms=data["ttfb_ms"],
                request_headers=_parse_headers(data["request_headers"]),
                response_headers=_parse_headers(data["response_headers"]),
                request_body=_parse_body(
                    data["request_body"], data["request_body_encoding"]
                ),
                request_body_size=data["request_body_size"],
                request_body_truncated=data["request_body_truncated"],
                response_body=_parse_body(
                    data["response_body"], data["response_body_encoding"]
                ),
                response_body_size=data["response_body_size"],
                response_body_truncated=data["response_body_truncated"],
                streamed=data["streamed"],
                outcome=data["outcome"],
                error=data["error"],
                websocket=None
                if data.get("websocket") is None
                else WebSocketSession.from_dict(data["websocket"]),
                extra={k: v for k, v in data.items() if k not in _FIELD_NAMES},
                schema_version=data["schema_version"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"not an event object: {exc!r}"
            raise ProxyError(msg) from exc
        llm = data.get("llm")
        if isinstance(llm, dict) or (llm is None and "llm" in data):
            # Keep the object as written: its time to first token came from
            # chunk timestamps that the JSON form does not carry.
            event._llm.append(llm)
        return event

    @classmethod
    def from_json(cls, line: bytes | str) -> Event:
        """Rebuild an event from one line of JSON written by :meth:`to_json`."""
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            msg = f"not valid JSON: {exc}"
            raise ProxyError(msg) from exc
        if not isinstance(data, dict):
            msg = f"an event must be a JSON object, not {type(data).__name__}"
            raise ProxyError(msg)
        return cls.from_dict(data)


# Fields that only some events have; an extra field never takes their name.
_OPTIONAL_FIELD_NAMES: Final = frozenset({"websocket"})
_FIELD_NAMES: Final = _OPTIONAL_FIELD_NAMES | frozenset(
    Event(
        event_id="",
        request_id="",
        timestamp=0.0,
        method="",
        path="",
        query="",
        status=0,
        duration_ms=0.0,
        ttfb_ms=None,
        request_headers=(),
        response_headers=(),
        request_body=b"",
        request_body_size=0,
        request_body_truncated=False,
        response_body=b"",
        response_body_size=0,
        response_body_truncated=False,
        streamed=False,
        outcome="ok",
        error=None,
    ).to_dict()
)
