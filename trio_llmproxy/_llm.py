"""The ``llm`` object of an event: what an LLM call asked for and really got.

:func:`describe_llm` reads an :class:`~trio_llmproxy.Event`'s captured
request and response (JSON, or an SSE stream; for a WebSocket session, the
Realtime API events the upstream sent) and returns the API shape it
recognised, the models, the usage the upstream reported, finish reasons, the
output text, tool calls put back together from their fragments, the time to
the first generated content, and whether the call really succeeded (an HTTP
200 stream may carry an error event, or end before its terminal event).

Where it runs, and why there: it is part of rendering the event.
:meth:`Event.to_dict` calls it (once per event: the result is cached on the
event), and only subscribers call ``to_dict``: sinks in their worker
threads, the Redis forwarder, and the metrics subscriber, which also runs it
in a worker thread. So the request path pays nothing for it but the
timestamps of the first response chunks, which the middleware notes anyway
beside its capture (``Event.response_chunk_marks``). Being part of the
rendering, the object appears in every sink's JSON without any setup, an
embedding application's own sinks included, and it is computed once however
many subscribers read it. An event rebuilt from JSON (a dispatcher reading
the Redis stream) keeps the ``llm`` object it was written with, so the time
to first token, which needs the chunk timestamps, survives that hop.

Nothing is estimated: usage is what the upstream reported, or ``null``.
Malformed JSON in one event of a stream is counted, never raised, and a
failure of the whole analysis leaves the ``llm`` object ``null`` with the
reason logged, so that an odd body can never cost an event.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import attrs
import orjson

from ._sse import SSEEvent, SSEParser

if TYPE_CHECKING:
    from ._event import Event, WebSocketMessage, WebSocketSession

CHAT_COMPLETIONS: Final = "chat.completions"
REALTIME: Final = "realtime"
RESPONSES: Final = "responses"
ANTHROPIC_MESSAGES: Final = "anthropic.messages"
EMBEDDINGS: Final = "embeddings"
OTHER: Final = "other"

# The values of ``outcome_detail.outcome`` besides the event's own outcomes.
HTTP_ERROR: Final = "http_error"
INCOMPLETE: Final = "incomplete"
UNKNOWN: Final = "unknown"

# Path endings, most specific first; Azure's deployment paths and any base
# path in front of them end the same way.
_API_BY_PATH_END: Final = (
    ("/chat/completions", CHAT_COMPLETIONS),
    ("/responses", RESPONSES),
    ("/messages", ANTHROPIC_MESSAGES),
    ("/embeddings", EMBEDDINGS),
)
# Events of the Responses API that carry generated content.
_RESPONSES_CONTENT_EVENTS: Final = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.audio.transcript.delta",
    }
)
_RESPONSES_TERMINAL_EVENTS: Final = frozenset(
    {"response.completed", "response.failed", "response.incomplete"}
)

# Server events of the Realtime API (the beta's names and the GA's) that
# carry generated content: the first one's time is the time to first token.
_REALTIME_CONTENT_EVENTS: Final = frozenset(
    {
        "response.text.delta",
        "response.output_text.delta",
        "response.audio.delta",
        "response.output_audio.delta",
        "response.audio_transcript.delta",
        "response.output_audio_transcript.delta",
        "response.function_call_arguments.delta",
    }
)

# The largest token count summed over a session; beyond it, counts are junk.
_MAX_COUNT: Final = 2**53

logger = logging.getLogger(__name__)

Json = dict[str, Any]


def _loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _object(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def recognise_api(path: str, request: Json | None) -> str | None:
    """Name the API shape of a call from its path and its JSON request body.

    Returns ``None`` when the call does not look like an LLM call at all (no
    JSON object body with a ``model``, and no known path).
    """
    route = path.split("?", 1)[0].rstrip("/")
    for end, api in _API_BY_PATH_END:
        if route.endswith(end):
            return api
    if request is not None and isinstance(request.get("model"), str):
        return OTHER
    return None


@attrs.define
class _ToolCall:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: list[str] = attrs.field(factory=list)
    choice: int = 0

    def as_json(self) -> Json:
        return {
            "choice": self.choice,
            "index": self.index,
            "id": self.id,
            "name": self.name,
            "arguments": "".join(self.arguments),
        }


@attrs.define
class _Analysis:
    """What the response said, gathered event by event."""

    api: str | None
    response_model: str | None = None
    usage: Json | None = None
    # Chat choices by index; other APIs use choice 0.
    texts: dict[int, list[str]] = attrs.field(factory=dict)
    reasoning: list[str] = attrs.field(factory=list)
    finish_reasons: dict[int, str] = attrs.field(factory=dict)
    tool_calls: dict[tuple[int, Any], _ToolCall] = attrs.field(factory=dict)
    error: Json | None = None
    terminal: bool = False
    malformed_events: int = 0
    saw_content: bool = False

    def add_text(self, text: Any, choice: int = 0) -> None:
        if isinstance(text, str) and text:
            self.texts.setdefault(choice, []).append(text)
            self.saw_content = True

    def add_reasoning(self, text: Any) -> None:
        if isinstance(text, str) and text:
            self.reasoning.append(text)
            self.saw_content = True

    def tool_call(self, key: tuple[int, Any], index: int, choice: int = 0) -> _ToolCall:
        call = self.tool_calls.get(key)
        if call is None:
            call = self.tool_calls[key] = _ToolCall(index=index, choice=choice)
        self.saw_content = True
        return call

    def note_model(self, model: Any) -> None:
        # Azure's first chunk names no model (""): keep the first real one.
        if isinstance(model, str) and model and self.response_model is None:
            self.response_model = model

    def note_error(self, error: Any, *, kind: str | None = None) -> None:
        if self.error is not None:
            return
        details = _object(error)
        code = details.get("code")
        self.error = {
            "type": _text(details.get("type")) or kind,
            "code": None if code is None else str(code),
            "message": _text(details.get("message")),
        }


# Chat Completions (and the legacy completions, which "other" streams share).


def _chat_chunk(analysis: _Analysis, chunk: Json) -> None:
    if "error" in chunk and not chunk.get("choices"):
        analysis.note_error(chunk["error"])
        return
    analysis.note_model(chunk.get("model"))
    if isinstance(chunk.get("usage"), dict):
        analysis.usage = chunk["usage"]
    for choice in chunk.get("choices") or ():
        _chat_choice(analysis, _object(choice), delta_key="delta")


def _chat_choice(analysis: _Analysis, choice: Json, *, delta_key: str) -> None:
    index = _int(choice.get("index")) or 0
    delta = _object(choice.get(delta_key))
    analysis.add_text(delta.get("content"), index)
    analysis.add_text(choice.get("text"), index)
    analysis.add_text(delta.get("refusal"), index)
    analysis.add_reasoning(delta.get("reasoning_content"))
    analysis.add_reasoning(delta.get("reasoning"))
    for position, fragment in enumerate(delta.get("tool_calls") or ()):
        fragment = _object(fragment)
        tool_index = _int(fragment.get("index"))
        if tool_index is None:
            tool_index = position
        call = analysis.tool_call((index, tool_index), tool_index, index)
        function = _object(fragment.get("function"))
        call.id = _text(fragment.get("id")) or call.id
        call.name = _text(function.get("name")) or call.name
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            call.arguments.append(arguments)
    reason = _text(choice.get("finish_reason"))
    if reason:
        analysis.finish_reasons[index] = reason


def _chat_body(analysis: _Analysis, body: Json) -> None:
    analysis.note_model(body.get("model"))
    if isinstance(body.get("usage"), dict):
        analysis.usage = body["usage"]
    for choice in body.get("choices") or ():
        _chat_choice(analysis, _object(choice), delta_key="message")
    analysis.terminal = True


# The Responses API.


def _responses_event(analysis: _Analysis, data: Json) -> None:
    kind = data.get("type")
    response = _object(data.get("response"))
    if response:
        analysis.note_model(response.get("model"))
    if kind in _RESPONSES_CONTENT_EVENTS:
        analysis.saw_content = True
    if kind == "response.output_text.delta" or kind == "response.refusal.delta":
        analysis.add_text(data.get("delta"))
    elif kind in (
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    ):
        analysis.add_reasoning(data.get("delta"))
    elif kind == "response.output_item.added":
        item = _object(data.get("item"))
        if item.get("type") == "function_call":
            call = analysis.tool_call(
                (0, item.get("id")), _int(data.get("output_index")) or 0
            )
            call.id = _text(item.get("call_id")) or _text(item.get("id"))
            call.name = _text(item.get("name"))
    elif kind == "response.function_call_arguments.delta":
        call = analysis.tool_call(
            (0, data.get("item_id")), _int(data.get("output_index")) or 0
        )
        if isinstance(data.get("delta"), str):
            call.arguments.append(data["delta"])
    elif kind in _RESPONSES_TERMINAL_EVENTS:
        analysis.terminal = True
        _responses_final(analysis, response, kind)
    elif kind == "error":
        analysis.note_error(data.get("error") or data)


def _responses_final(analysis: _Analysis, response: Json, kind: str) -> None:
    if isinstance(response.get("usage"), dict):
        analysis.usage = response["usage"]
    reason = _text(_object(response.get("incomplete_details")).get("reason"))
    analysis.finish_reasons[0] = reason or _text(response.get("status")) or "unknown"
    if kind == "response.failed":
        analysis.note_error(response.get("error"), kind="response.failed")


def _responses_body(analysis: _Analysis, body: Json) -> None:
    analysis.note_model(body.get("model"))
    for position, item in enumerate(body.get("output") or ()):
        item = _object(item)
        if item.get("type") == "message":
            for part in item.get("content") or ():
                part = _object(part)
                analysis.add_text(part.get("text") or part.get("refusal"))
        elif item.get("type") == "function_call":
            call = analysis.tool_call((0, item.get("id")), position)
            call.id = _text(item.get("call_id")) or _text(item.get("id"))
            call.name = _text(item.get("name"))
            if isinstance(item.get("arguments"), str):
                call.arguments.append(item["arguments"])
        elif item.get("type") == "reasoning":
            for part in item.get("summary") or ():
                analysis.add_reasoning(_object(part).get("text"))
    _responses_final(analysis, body, "response.completed")
    if body.get("status") == "failed":
        analysis.note_error(body.get("error"), kind="response.failed")


# Anthropic Messages.


def _anthropic_event(analysis: _Analysis, data: Json) -> None:
    kind = data.get("type")
    if kind == "message_start":
        message = _object(data.get("message"))
        analysis.note_model(message.get("model"))
        if isinstance(message.get("usage"), dict):
            analysis.usage = dict(message["usage"])
    elif kind == "content_block_start":
        block = _object(data.get("content_block"))
        if block.get("type") == "tool_use":
            index = _int(data.get("index")) or 0
            call = analysis.tool_call((0, index), index)
            call.id = _text(block.get("id"))
            call.name = _text(block.get("name"))
        else:
            analysis.add_text(block.get("text"))
            analysis.add_reasoning(block.get("thinking"))
    elif kind == "content_block_delta":
        _anthropic_delta(analysis, data)
    elif kind == "message_delta":
        reason = _text(_object(data.get("delta")).get("stop_reason"))
        if reason:
            analysis.finish_reasons[0] = reason
        if isinstance(data.get("usage"), dict):
            # The final counts; keys it lacks keep message_start's values.
            analysis.usage = {**(analysis.usage or {}), **data["usage"]}
    elif kind == "message_stop":
        analysis.terminal = True
    elif kind == "error":
        analysis.note_error(data.get("error"))


def _anthropic_delta(analysis: _Analysis, data: Json) -> None:
    delta = _object(data.get("delta"))
    kind = delta.get("type")
    if kind == "text_delta":
        analysis.add_text(delta.get("text"))
    elif kind == "thinking_delta":
        analysis.add_reasoning(delta.get("thinking"))
    elif kind == "input_json_delta":
        index = _int(data.get("index")) or 0
        call = analysis.tool_call((0, index), index)
        if isinstance(delta.get("partial_json"), str):
            call.arguments.append(delta["partial_json"])


def _anthropic_body(analysis: _Analysis, body: Json) -> None:
    if body.get("type") == "error":
        analysis.note_error(body.get("error"))
        return
    analysis.note_model(body.get("model"))
    if isinstance(body.get("usage"), dict):
        analysis.usage = body["usage"]
    for index, block in enumerate(body.get("content") or ()):
        block = _object(block)
        if block.get("type") == "tool_use":
            call = analysis.tool_call((0, index), index)
            call.id = _text(block.get("id"))
            call.name = _text(block.get("name"))
            call.arguments.append(orjson.dumps(block.get("input", {})).decode())
        else:
            analysis.add_text(block.get("text"))
            analysis.add_reasoning(block.get("thinking"))
    reason = _text(body.get("stop_reason"))
    if reason:
        analysis.finish_reasons[0] = reason
    analysis.terminal = True


def _embeddings_body(analysis: _Analysis, body: Json) -> None:
    analysis.note_model(body.get("model"))
    if isinstance(body.get("usage"), dict):
        analysis.usage = body["usage"]
    analysis.terminal = True


_STREAM_HANDLERS: Final[dict[str | None, Callable[[_Analysis, Json], None]]] = {
    CHAT_COMPLETIONS: _chat_chunk,
    RESPONSES: _responses_event,
    ANTHROPIC_MESSAGES: _anthropic_event,
    OTHER: _chat_chunk,
}
_BODY_HANDLERS: Final[dict[str | None, Callable[[_Analysis, Json], None]]] = {
    CHAT_COMPLETIONS: _chat_body,
    RESPONSES: _responses_body,
    ANTHROPIC_MESSAGES: _anthropic_body,
    EMBEDDINGS: _embeddings_body,
    OTHER: _chat_body,
}


def _stream_event(analysis: _Analysis, event: SSEEvent) -> None:
    """Fold one SSE event into ``analysis``."""
    if event.data == "[DONE]":
        analysis.terminal = True
        return
    data = _loads(event.data)
    if not isinstance(data, dict):
        analysis.malformed_events += 1
        return
    if event.event == "error" and analysis.api != RESPONSES:
        # Anthropic's "event: error", or an OpenAI-compatible server's.
        analysis.note_error(data.get("error") or data)
        return
    handler = _STREAM_HANDLERS.get(analysis.api, _chat_chunk)
    handler(analysis, data)


# Usage, normalised.


def _first_int(*values: Any) -> int | None:
    for value in values:
        number = _int(value)
        if number is not None:
            return number
    return None


def normalise_usage(api: str | None, raw: Json) -> Json:
    """Return the usage of one call in the same terms whatever the API.

    ``input_tokens`` counts the whole prompt, cached parts included (for
    Anthropic that is ``input_tokens`` plus both cache counts), so it compares
    with OpenAI's ``prompt_tokens``; ``total_tokens`` is the upstream's own,
    or input plus output when the API reports no total.
    """
    prompt = _object(
        raw.get("prompt_tokens_details") or raw.get("input_tokens_details")
    )
    completion = _object(
        raw.get("completion_tokens_details") or raw.get("output_tokens_details")
    )
    input_tokens = _first_int(raw.get("prompt_tokens"), raw.get("input_tokens"))
    cached = _first_int(prompt.get("cached_tokens"), raw.get("cache_read_input_tokens"))
    if api == ANTHROPIC_MESSAGES and input_tokens is not None:
        input_tokens += (_int(raw.get("cache_read_input_tokens")) or 0) + (
            _int(raw.get("cache_creation_input_tokens")) or 0
        )
    output_tokens = _first_int(raw.get("completion_tokens"), raw.get("output_tokens"))
    total = _int(raw.get("total_tokens"))
    if total is None and input_tokens is not None and output_tokens is not None:
        total = input_tokens + output_tokens
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": total,
        "reasoning_tokens": _int(completion.get("reasoning_tokens")),
        "cached_tokens": cached,
        "raw": raw,
    }


# The response body, chunk by chunk, with the time each chunk was sent.


def _incremental_decoder(coding: str | None) -> Callable[[bytes], bytes] | None:
    """A function that undoes ``coding`` one piece at a time; None if unknown."""
    codings = [c.strip().lower() for c in (coding or "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return lambda data: data
    if len(codings) > 1:
        return None
    name = codings[0]
    if name in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if name == "deflate":
        return _Deflate().decode
    if name == "br":
        import brotli  # type: ignore[import-untyped]  # ships no type hints

        decompress: Callable[[bytes], bytes] = brotli.Decompressor().process
        return decompress
    if name == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress
    return None


@attrs.define
class _Deflate:
    """zlib-wrapped deflate, or raw deflate from servers that send that."""

    _decompressor: Any = None

    def decode(self, data: bytes) -> bytes:
        if self._decompressor is None:
            wbits = zlib.MAX_WBITS if data[:1] and data[0] & 0x0F == 8 else -15
            self._decompressor = zlib.decompressobj(wbits)
        decoded: bytes = self._decompressor.decompress(data)
        return decoded


def _timed_pieces(
    body: bytes, marks: Sequence[tuple[int, float]]
) -> Iterator[tuple[bytes, float | None]]:
    """Cut ``body`` where the chunks ended; each piece with its send time."""
    start = 0
    for end, at_ms in marks:
        if end > len(body):
            end = len(body)
        if end > start:
            yield body[start:end], at_ms
            start = end
    if start < len(body):
        yield body[start:], None


def _analyse_stream(event: Event, analysis: _Analysis) -> float | None:
    """Parse an SSE response into ``analysis``; return the ttft in ms, if seen."""
    decode = _incremental_decoder(event.response_body_content_encoding)
    marks: Sequence[tuple[int, float]] = event.response_chunk_marks
    if decode is None:
        decode, marks = (lambda data: data), ()
    parser = SSEParser()
    ttft: float | None = None
    timed = True
    for piece, at_ms in _timed_pieces(event.response_body, marks):
        try:
            text = decode(piece)
        except Exception:
            # A corrupt or cut compressed body: what decoded so far counts.
            break
        for sse in parser.feed(text):
            _stream_event(analysis, sse)
            if timed and analysis.saw_content:
                ttft, timed = at_ms, False
    for sse in parser.close():
        _stream_event(analysis, sse)
    return ttft


def _json_body(event: Event) -> Json | None:
    from ._event import _content_decode

    body = event.response_body
    coding = event.response_body_content_encoding
    if body and coding:
        decoded = _content_decode(body, coding)
        if decoded is None:
            return None
        body = decoded
    data = _loads(body)
    return data if isinstance(data, dict) else None


def _request_json(event: Event) -> Json | None:
    if not event.request_body or event.request_body_truncated:
        return None
    data = _loads(event.request_body)
    return data if isinstance(data, dict) else None


def _is_sse(event: Event) -> bool:
    content_type = _header(event.response_headers, b"content-type") or ""
    return content_type.lower().startswith("text/event-stream")


# The verdict.


def _outcome_detail(event: Event, analysis: _Analysis, *, checked_end: bool) -> Json:
    error = analysis.error
    if event.outcome != "ok":
        outcome = event.outcome
        error = {"type": None, "code": None, "message": event.error}
    elif error is not None:
        outcome = "upstream_error" if event.status < 400 else HTTP_ERROR
    elif event.status >= 400:
        outcome = HTTP_ERROR
    elif checked_end and not analysis.terminal:
        # A body cut by the capture cap may well have ended properly.
        outcome = UNKNOWN if event.response_body_truncated else INCOMPLETE
    else:
        outcome = "ok"
    error = error or {}
    return {
        "outcome": outcome,
        "error_type": error.get("type"),
        "error_code": error.get("code"),
        "error_message": error.get("message"),
    }


# The Realtime API, over a WebSocket session.


def _add_usage(total: Json, usage: Json) -> None:
    """Add the counts of ``usage`` into ``total``, nested objects included.

    Only sane counts are added: a sum past 2**53 could not be written as
    JSON by every reader (nor past 2**64 by orjson at all).
    """
    for key, value in usage.items():
        if isinstance(value, dict):
            inner = total.get(key)
            if not isinstance(inner, dict):
                inner = total[key] = {}
            _add_usage(inner, value)
            continue
        count = _int(value)
        if count is not None and 0 <= count < _MAX_COUNT:
            current = _int(total.get(key)) or 0
            total[key] = min(current + count, _MAX_COUNT)


def _realtime_usage(raw: Json) -> Json:
    details = _object(raw.get("input_token_details"))
    usage = normalise_usage(REALTIME, raw)
    if usage["cached_tokens"] is None:
        usage["cached_tokens"] = _int(details.get("cached_tokens"))
    return usage


@attrs.define
class _Realtime:
    """What the upstream's Realtime events said, gathered event by event."""

    analysis: _Analysis
    usage: Json | None = None
    responses: int = 0
    outputs: list[str] = attrs.field(factory=list)
    ttft: float | None = None

    def server_event(self, data: Json, at_ms: float) -> None:
        kind = _text(data.get("type"))
        if kind in _REALTIME_CONTENT_EVENTS and self.ttft is None:
            self.ttft = at_ms
        if kind in ("session.created", "session.updated"):
            self.analysis.note_model(_object(data.get("session")).get("model"))
        elif kind == "response.done":
            self.response_done(_object(data.get("response")))
        elif kind == "error":
            self.analysis.note_error(data.get("error") or data)

    def response_done(self, response: Json) -> None:
        self.responses += 1
        usage = response.get("usage")
        if isinstance(usage, dict):
            if self.usage is None:
                self.usage = {}
            _add_usage(self.usage, usage)
        details = _object(response.get("status_details"))
        status = _text(response.get("status")) or "unknown"
        reason = _text(details.get("reason"))
        position = len(self.analysis.finish_reasons)
        self.analysis.finish_reasons[position] = reason or status
        if status == "failed":
            self.analysis.note_error(details.get("error"), kind="response.failed")
        texts: list[str] = []
        for item in _list(response.get("output")):
            self.output_item(_object(item), texts)
        if texts:
            self.outputs.append("".join(texts))

    def output_item(self, item: Json, texts: list[str]) -> None:
        if item.get("type") == "function_call":
            call = self.analysis.tool_call(
                (0, len(self.analysis.tool_calls)), len(self.analysis.tool_calls)
            )
            call.id = _text(item.get("call_id")) or _text(item.get("id"))
            call.name = _text(item.get("name"))
            if isinstance(item.get("arguments"), str):
                call.arguments.append(item["arguments"])
            return
        for part in _list(item.get("content")):
            part = _object(part)
            # Text parts carry "text"; audio parts their "transcript".
            text = _text(part.get("text")) or _text(part.get("transcript"))
            if text:
                texts.append(text)


def _is_realtime(event: Event) -> bool:
    route = event.path.split("?", 1)[0].rstrip("/")
    if route.endswith("/realtime"):
        return True
    session = event.websocket
    for message in session.messages[:8] if session is not None else ():
        if not message.from_client and isinstance(message.data, str):
            data = _loads(message.data)
            if isinstance(data, dict) and data.get("type") == "session.created":
                return True
    return False


def _whole_server_texts(session: WebSocketSession) -> Iterator[WebSocketMessage]:
    """The upstream's text messages that were captured whole, in order.

    Those in ``messages`` come first; the message the capture cap cut is
    taken whole from ``llm_messages``, with the ones after it kept there.
    """
    for message in session.messages:
        if message.from_client or not isinstance(message.data, str):
            continue
        if session.messages_truncated and message is session.messages[-1]:
            if len(message.data.encode("utf-8")) < message.size:
                continue
        yield message
    yield from session.llm_messages


def _query_model(query: str) -> str | None:
    models = parse_qs(query).get("model")
    return models[0] if models else None


def describe_realtime(event: Event) -> Json | None:
    """Return the ``llm`` object of a Realtime API session, or None.

    ``None`` means the session does not look like one: its path does not end
    in ``/realtime`` and the upstream did not open with ``session.created``.
    Usage is the sum over the session's ``response.done`` events.
    """
    session = event.websocket
    if session is None or not _is_realtime(event):
        return None
    realtime = _Realtime(_Analysis(REALTIME))
    for message in _whole_server_texts(session):
        data = _loads(message.data)
        if not isinstance(data, dict):
            realtime.analysis.malformed_events += 1
            continue
        try:
            realtime.server_event(data, message.at_ms)
        except Exception:
            # An event of an unexpected shape costs itself, not the session.
            realtime.analysis.malformed_events += 1
    analysis = realtime.analysis
    detail = _outcome_detail(event, analysis, checked_end=False)
    if event.status >= 400:
        # A refused handshake: its body says why, as an HTTP error's does.
        body = _json_body(event) or {}
        analysis.note_error(body.get("error") or body)
        detail = _outcome_detail(
            attrs.evolve(event, outcome="ok"), analysis, checked_end=False
        )
    usage = realtime.usage
    return {
        "api": REALTIME,
        "request_model": _query_model(event.query),
        "response_model": analysis.response_model,
        "stream": True,
        "usage": None if usage is None else _realtime_usage(usage),
        "finish_reasons": [
            analysis.finish_reasons[index] for index in sorted(analysis.finish_reasons)
        ],
        "output_text": "\n".join(realtime.outputs) if realtime.outputs else None,
        "reasoning_text": None,
        "tool_calls": [call.as_json() for call in analysis.tool_calls.values()],
        "ttft_ms": None if realtime.ttft is None else round(realtime.ttft, 3),
        "outcome_detail": detail,
        "malformed_events": analysis.malformed_events,
        "responses": realtime.responses,
    }


def describe_llm(event: Event) -> Json | None:
    """Return the ``llm`` object of ``event`` (see docs/events.md), or None.

    ``None`` means the exchange is not an LLM call: its path is none of the
    known APIs' and its request is no JSON object naming a ``model``. This
    parses the captured bodies: call it off the request path. A WebSocket
    session is described by :func:`describe_realtime`.
    """
    if event.websocket is not None:
        return describe_realtime(event)
    request = _request_json(event)
    api = recognise_api(event.path, request)
    if api is None:
        return None
    request = request or {}
    analysis = _Analysis(api)
    sse = _is_sse(event)
    ttft: float | None = None
    # Whether the body must end in a terminal event (a stream) or be whole
    # JSON; a 2xx answer without either is incomplete, or unknown if cut.
    checked_end = sse
    if sse:
        ttft = _analyse_stream(event, analysis)
    else:
        body = _json_body(event)
        checked_end = body is None and event.response_body_truncated
        if body is not None:
            if event.status >= 400 or ("error" in body and api != RESPONSES):
                analysis.note_error(body.get("error") or body)
            else:
                _BODY_HANDLERS.get(api, _chat_body)(analysis, body)
        if analysis.saw_content:
            # A whole JSON answer: its first byte carried the content.
            ttft = event.ttfb_ms
    usage = analysis.usage
    stream = request.get("stream")
    return {
        "api": api,
        "request_model": _text(request.get("model")),
        "response_model": analysis.response_model,
        "stream": stream if isinstance(stream, bool) else False,
        "usage": None if usage is None else normalise_usage(api, usage),
        "finish_reasons": [
            analysis.finish_reasons[index] for index in sorted(analysis.finish_reasons)
        ],
        "output_text": "".join(analysis.texts[0]) if 0 in analysis.texts else None,
        "reasoning_text": "".join(analysis.reasoning) if analysis.reasoning else None,
        "tool_calls": [call.as_json() for call in analysis.tool_calls.values()],
        "ttft_ms": None if ttft is None else round(ttft, 3),
        "outcome_detail": _outcome_detail(event, analysis, checked_end=checked_end),
        "malformed_events": analysis.malformed_events,
    }


def safe_describe_llm(event: Event) -> Json | None:
    """:func:`describe_llm`, but a failure gives ``None`` (logged), never raises."""
    try:
        return describe_llm(event)
    except Exception:
        logger.exception("cannot describe the LLM call of request %s", event.request_id)
        return None
