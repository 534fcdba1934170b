"""A cheap, deterministic fake of an OpenAI-compatible API, for demos and benchmarks.

The mock is the upstream in benchmarks, so it must never be the bottleneck: it is a
raw ASGI 3 app with no framework, constant bodies and SSE fragments are encoded once,
and each response costs one orjson call (plus one tiny one per streamed chunk).

Everything is deterministic: the text cycles through a fixed sentence, ids and
timestamps are fixed, token counts are estimated from character counts and
embeddings come from a hash of each input. Request headers tune one request:
``X-Mock-Chunk-Count``, ``X-Mock-Chunk-Size`` and ``X-Mock-Chunk-Delay-Ms`` override
the settings, ``X-Mock-Status: NNN`` forces an error status on any endpoint, and
``X-Request-ID`` is echoed back.

A WebSocket session at ``/v1/realtime`` plays a small part of the Realtime API:
``session.created`` on connect, ``session.updated`` for ``session.update``, and
for ``response.create`` the text in ``response.text.delta`` events, then a
``response.done`` with the text as its output, and usage.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, TypeVar, cast

import attrs
import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ._asgi import ASGIApp, Receive, Scope, Send, answer_lifespan
from ._config import parse_listen_address

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

__all__ = [
    "MockUpstreamHandle",
    "MockUpstreamSettings",
    "create_mock_upstream_app",
    "serve_mock_upstream",
]

_Number = TypeVar("_Number", int, float)

REALTIME_PATH = "/v1/realtime"
REALTIME_SUBPROTOCOL = "realtime"
# Words sent per response of a Realtime session.
REALTIME_WORD_COUNT = 9

# Bounds that keep one request from asking the mock for gigabytes of output.
MAX_CHUNK_COUNT = 1_000_000
MAX_CONTENT_CHARS = 10_000_000
MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
EMBEDDING_DIMENSIONS = 8

COMPLETION_ID = "chatcmpl-mock"
CREATED_UNIX_SECONDS = 1_700_000_000
SENTENCE = "The quick brown fox jumps over the lazy dog. "

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]
_SSE_DONE = b"data: [DONE]\n\n"
_CHUNK_HEAD = (
    b'data: {"id":"' + COMPLETION_ID.encode() + b'","object":"chat.completion.chunk",'
    b'"created":' + str(CREATED_UNIX_SECONDS).encode() + b',"model":'
)
_CONTENT_HEAD = b',"choices":[{"index":0,"delta":{"content":'
_CONTENT_TAIL = b'},"logprobs":null,"finish_reason":null}]}\n\n'
_ROLE_CHOICES = (
    b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)
_STOP_CHOICES = (
    b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
)

# OpenAI's error "type" for the statuses clients most often branch on.
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}

# Benchmarks open many connections at once and keep them between requests.
LISTEN_BACKLOG = 1024
KEEP_ALIVE_TIMEOUT_SECONDS = 75.0
# On a graceful shutdown, streams still running after this are cut.
GRACEFUL_SHUTDOWN_SECONDS = 5.0

logger = logging.getLogger(__name__)


class _HTTPError(Exception):
    """A request the mock refuses; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _int_up_to(maximum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if type(value) is not int or not 0 <= value <= maximum:
            msg = f"{attribute.name} must be an int from 0 to {maximum}, got {value!r}"
            raise ValueError(msg)

    return check


def _check_delay(
    instance: object, attribute: attrs.Attribute[float], value: float
) -> None:
    if not isinstance(value, int | float) or not 0 <= value < math.inf:
        msg = f"{attribute.name} must be a finite number >= 0, got {value!r}"
        raise ValueError(msg)


@attrs.frozen(kw_only=True)
class MockUpstreamSettings:
    """How the mock upstream shapes its chat completions.

    ``chunk_count * chunk_size`` may not exceed ``MAX_CONTENT_CHARS``.

    Args:
        chunk_count: Number of content chunks in a streamed completion.
        chunk_size: Characters of generated text per content chunk.
        chunk_delay_seconds: Sleep before each content chunk of a stream, so a
            stream lasts about ``chunk_count * chunk_delay_seconds``.
        model: Model named in responses when the request names none, and the one
            model listed by ``GET /v1/models``.
    """

    chunk_count: int = attrs.field(default=8, validator=_int_up_to(MAX_CHUNK_COUNT))
    chunk_size: int = attrs.field(default=4, validator=_int_up_to(MAX_CONTENT_CHARS))
    chunk_delay_seconds: float = attrs.field(default=0.0, validator=_check_delay)
    model: str = attrs.field(
        default="mock-gpt",
        validator=[attrs.validators.instance_of(str), attrs.validators.min_len(1)],
    )

    def __attrs_post_init__(self) -> None:
        content_chars = self.chunk_count * self.chunk_size
        if content_chars > MAX_CONTENT_CHARS:
            msg = (
                f"chunk_count * chunk_size must be at most {MAX_CONTENT_CHARS}"
                f" characters, got {self.chunk_count} * {self.chunk_size}"
            )
            raise ValueError(msg)


@attrs.frozen
class _Request:
    method: str
    path: str
    headers: Mapping[bytes, bytes]
    body: bytes
    receive: Receive


@attrs.frozen(kw_only=True)
class _Completion:
    """What one chat completion answers, streamed or not."""

    model: str
    text: str
    usage: dict[str, int]
    settings: MockUpstreamSettings


@attrs.frozen
class _Responder:
    """Sends one HTTP response, adding the headers every response carries."""

    _send: Send
    _extra_headers: list[tuple[bytes, bytes]]

    async def json(self, status: int, body: bytes) -> None:
        length = (b"content-length", str(len(body)).encode())
        headers = [*_JSON_HEADERS, length, *self._extra_headers]
        start = {"type": "http.response.start", "status": status, "headers": headers}
        await self._send(start)
        await self._send({"type": "http.response.body", "body": body})

    async def error(self, exc: _HTTPError) -> None:
        await self.json(exc.status, _error_body(exc.status, exc.message, exc.code))

    async def start_stream(self) -> None:
        headers = [*_SSE_HEADERS, *self._extra_headers]
        await self._send(
            {"type": "http.response.start", "status": 200, "headers": headers}
        )

    async def event(self, data: bytes) -> None:
        """Sends one SSE event as its own body message, so proxies see it alone."""
        await self._send(
            {"type": "http.response.body", "body": data, "more_body": True}
        )

    async def end_stream(self) -> None:
        await self._send({"type": "http.response.body", "body": b""})


def _generated_text(char_count: int) -> str:
    repeats = char_count // len(SENTENCE) + 1
    return (SENTENCE * repeats)[:char_count]


def _estimate_tokens(char_count: int) -> int:
    # The usual rule of thumb for English text: about four characters per token.
    return (char_count + 3) // 4


def _dicts(values: Iterable[object]) -> Iterator[Mapping[str, object]]:
    return (cast("dict[str, object]", v) for v in values if isinstance(v, dict))


def _text_length(content: object) -> int:
    """Counts the characters of a message content: a string or a list of parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(_text_length(part.get("text")) for part in _dicts(content))
    return 0


def _prompt_tokens(messages: object) -> int:
    if not isinstance(messages, list):
        return 0
    return _estimate_tokens(
        sum(_text_length(m.get("content")) for m in _dicts(messages))
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _error_body(status: int, message: str, code: str) -> bytes:
    error_type = _ERROR_TYPES.get(status, "invalid_request_error")
    if status >= 500:
        error_type = "server_error"
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return orjson.dumps({"error": error})


def _parse_json_object(body: bytes) -> dict[str, object]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        msg = f"request body is not valid JSON: {exc}"
        raise _HTTPError(400, msg, "invalid_json") from exc
    if not isinstance(value, dict):
        msg = f"request body must be a JSON object, got {type(value).__name__}"
        raise _HTTPError(400, msg, "invalid_json")
    return cast("dict[str, object]", value)


def _header_number(
    headers: Mapping[bytes, bytes], name: str, parse: Callable[[str], _Number]
) -> _Number | None:
    """Parses the non-negative number in header ``name``, if the request sent it."""
    raw = headers.get(name.lower().encode())
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    try:
        value: _Number | None = parse(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < math.inf:
        kind = "integer" if parse is int else "finite number"
        msg = f"{name} must be a non-negative {kind}, got {text!r}"
        raise _HTTPError(400, msg, "invalid_mock_header")
    return value


def _settings_for(
    settings: MockUpstreamSettings, headers: Mapping[bytes, bytes]
) -> MockUpstreamSettings:
    """Applies the ``X-Mock-Chunk-*`` overrides of one request to ``settings``."""
    count = _header_number(headers, "X-Mock-Chunk-Count", int)
    size = _header_number(headers, "X-Mock-Chunk-Size", int)
    delay_ms = _header_number(headers, "X-Mock-Chunk-Delay-Ms", float)
    if count is None and size is None and delay_ms is None:
        return settings

    delay = settings.chunk_delay_seconds if delay_ms is None else delay_ms / 1000
    try:
        return attrs.evolve(
            settings,
            chunk_count=settings.chunk_count if count is None else count,
            chunk_size=settings.chunk_size if size is None else size,
            chunk_delay_seconds=delay,
        )
    except ValueError as exc:
        msg = f"X-Mock-Chunk-* headers ask for too much: {exc}"
        raise _HTTPError(400, msg, "invalid_mock_header") from exc


def _mock_status(headers: Mapping[bytes, bytes]) -> int | None:
    raw = headers.get(b"x-mock-status")
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    if not (text.isdigit() and 400 <= int(text) <= 599):
        msg = f"X-Mock-Status must be an error status from 400 to 599, got {text!r}"
        raise _HTTPError(400, msg, "invalid_mock_header")
    return int(text)


def _requested_model(body: Mapping[str, object], default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def _include_usage(body: Mapping[str, object]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _completion_json(kind: str, completion: _Completion, choices: object) -> bytes:
    return orjson.dumps(
        {
            "id": COMPLETION_ID,
            "object": kind,
            "created": CREATED_UNIX_SECONDS,
            "model": completion.model,
            "choices": choices,
            "usage": completion.usage,
        }
    )


def _completion_body(completion: _Completion) -> bytes:
    message = {"role": "assistant", "content": completion.text, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return _completion_json("chat.completion", completion, [choice])


def _usage_event(completion: _Completion) -> bytes:
    chunk = _completion_json("chat.completion.chunk", completion, [])
    return b"data: " + chunk + b"\n\n"


async def _send_stream(
    responder: _Responder, completion: _Completion, include_usage: bool
) -> None:
    """Sends the SSE events of a completion: role, content chunks, stop, [DONE]."""
    head = _CHUNK_HEAD + orjson.dumps(completion.model)
    size = completion.settings.chunk_size
    delay = completion.settings.chunk_delay_seconds
    await responder.event(head + _ROLE_CHOICES)

    for index in range(completion.settings.chunk_count):
        if delay:
            await trio.sleep(delay)
        piece = orjson.dumps(completion.text[index * size : (index + 1) * size])
        await responder.event(head + _CONTENT_HEAD + piece + _CONTENT_TAIL)

    await responder.event(head + _STOP_CHOICES)
    if include_usage:
        await responder.event(_usage_event(completion))
    await responder.event(_SSE_DONE)
    await responder.end_stream()


async def _read_body(receive: Receive) -> bytes | None:
    """Returns the whole request body, or None if the client left first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = cast("bytes", message.get("body", b""))
        size += len(chunk)
        if size > MAX_REQUEST_BODY_BYTES:
            msg = f"request body is larger than {MAX_REQUEST_BODY_BYTES} bytes"
            raise _HTTPError(413, msg, "request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _cancel_on_disconnect(
    receive: Receive, cancel_scope: trio.CancelScope
) -> None:
    # Hypercorn quietly drops sends once the client is gone, so the only way to
    # notice a departed client is to wait for http.disconnect on receive().
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel_scope.cancel()


async def _send_event(send: Send, event: Mapping[str, object]) -> None:
    await send({"type": "websocket.send", "text": orjson.dumps(event).decode()})


def _embedding(text: str, encoding_format: str) -> list[float] | str:
    # Each digest byte maps to a multiple of 1/128, which float32 holds exactly, so
    # the "float" and "base64" encodings carry the very same vector.
    digest = hashlib.blake2b(text.encode(), digest_size=EMBEDDING_DIMENSIONS).digest()
    vector = [(byte - 128) / 128 for byte in digest]
    if encoding_format == "float":
        return vector
    packed = struct.pack(f"<{len(vector)}f", *vector)
    return base64.b64encode(packed).decode("ascii")


def _embedding_inputs(body: Mapping[str, object]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return cast("list[str]", value)
    msg = f"input must be a string or a list of strings, got {value!r:.80}"
    raise _HTTPError(400, msg, "invalid_input")


def _encoding_format(body: Mapping[str, object]) -> str:
    value = body.get("encoding_format", "float")
    if value not in ("float", "base64"):
        msg = f"encoding_format must be 'float' or 'base64', got {value!r:.80}"
        raise _HTTPError(400, msg, "invalid_encoding_format")
    return value


def _embeddings_body(body: Mapping[str, object], default_model: str) -> bytes:
    inputs = _embedding_inputs(body)
    fmt = _encoding_format(body)
    data = [
        {"object": "embedding", "index": index, "embedding": _embedding(text, fmt)}
        for index, text in enumerate(inputs)
    ]
    tokens = _estimate_tokens(sum(len(text) for text in inputs))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    model = _requested_model(body, default_model)
    return orjson.dumps(
        {"object": "list", "data": data, "model": model, "usage": usage}
    )


def _models_body(model: str) -> bytes:
    entry = {
        "id": model,
        "object": "model",
        "created": CREATED_UNIX_SECONDS,
        "owned_by": "trio-llmproxy-mock",
    }
    return orjson.dumps({"object": "list", "data": [entry]})


@attrs.frozen
class _MockUpstreamApp:
    """The ASGI application that ``create_mock_upstream_app`` returns."""

    _settings: MockUpstreamSettings
    _models: bytes = attrs.field(init=False)

    @_models.default
    def _encode_models(self) -> bytes:
        return _models_body(self._settings.model)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._serve_http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._serve_realtime(scope, receive, send)
        elif scope["type"] == "lifespan":
            await answer_lifespan(receive, send)

    async def _serve_realtime(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if scope["path"] != REALTIME_PATH:
            # Closing before the accept refuses the handshake (403).
            await send({"type": "websocket.close"})
            return
        offered = cast("list[str]", scope.get("subprotocols") or [])
        chosen = REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None
        await send({"type": "websocket.accept", "subprotocol": chosen})
        session = {
            "id": "sess_mock",
            "object": "realtime.session",
            "model": self._settings.model,
        }
        await _send_event(send, {"type": "session.created", "session": session})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if isinstance(text, str):
                # Binary messages (input audio, say) are taken and not answered.
                await self._realtime_event(send, text)

    async def _realtime_event(self, send: Send, text: str) -> None:
        try:
            event = orjson.loads(text)
            kind = event.get("type") if isinstance(event, dict) else None
        except orjson.JSONDecodeError:
            kind = None
        if kind == "session.update":
            await _send_event(send, {**event, "type": "session.updated"})
        elif kind == "response.create":
            words = SENTENCE.split()[:REALTIME_WORD_COUNT]
            response = {"id": "resp_mock", "object": "realtime.response"}
            await _send_event(send, {"type": "response.created", "response": response})
            for word in words:
                delta = {"type": "response.text.delta", "delta": word + " "}
                await _send_event(send, delta)
            usage = {
                "total_tokens": REALTIME_WORD_COUNT + 5,
                "input_tokens": 5,
                "output_tokens": REALTIME_WORD_COUNT,
                "input_token_details": {"text_tokens": 5, "audio_tokens": 0},
                "output_token_details": {
                    "text_tokens": REALTIME_WORD_COUNT,
                    "audio_tokens": 0,
                },
            }
            # Like the Realtime API's, the answer's text is in its output too.
            content = [{"type": "text", "text": " ".join(words)}]
            output = [{"type": "message", "role": "assistant", "content": content}]
            done = {
                **response,
                "status": "completed",
                "output": output,
                "usage": usage,
            }
            await _send_event(send, {"type": "response.done", "response": done})
        else:
            error = {"type": "invalid_request_error", "message": "unknown event type"}
            await _send_event(send, {"type": "error", "error": error})

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(cast("Iterable[tuple[bytes, bytes]]", scope["headers"]))
        request_id = headers.get(b"x-request-id")
        echoed = [] if request_id is None else [(b"x-request-id", request_id)]
        responder = _Responder(send, echoed)
        try:
            body = await _read_body(receive)
            if body is None:
                return
            method, path = cast("str", scope["method"]), cast("str", scope["path"])
            request = _Request(method, path, headers, body, receive)
            await self._route(request, responder)
        except _HTTPError as exc:
            await responder.error(exc)

    async def _route(self, request: _Request, responder: _Responder) -> None:
        status = _mock_status(request.headers)
        if status is not None:
            msg = f"mock upstream answers {status} because X-Mock-Status asked for it"
            raise _HTTPError(status, msg, "mock_status")

        route = (request.method, request.path)
        if route == ("POST", "/v1/chat/completions"):
            await self._chat_completions(request, responder)
        elif route == ("GET", "/v1/models"):
            await responder.json(200, self._models)
        elif route == ("POST", "/v1/embeddings"):
            body = _parse_json_object(request.body)
            await responder.json(200, _embeddings_body(body, self._settings.model))
        else:
            msg = f"no route for {request.method} {request.path}"
            raise _HTTPError(404, msg, "not_found")

    async def _chat_completions(self, request: _Request, responder: _Responder) -> None:
        body = _parse_json_object(request.body)
        settings = _settings_for(self._settings, request.headers)
        completion = _Completion(
            model=_requested_model(body, settings.model),
            text=_generated_text(settings.chunk_count * settings.chunk_size),
            usage=_usage(_prompt_tokens(body.get("messages")), settings.chunk_count),
            settings=settings,
        )
        if body.get("stream") is not True:
            await responder.json(200, _completion_body(completion))
            return

        await responder.start_stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _cancel_on_disconnect, request.receive, nursery.cancel_scope
            )
            await _send_stream(responder, completion, _include_usage(body))
            nursery.cancel_scope.cancel()


def create_mock_upstream_app(settings: MockUpstreamSettings) -> ASGIApp:
    """Creates the mock upstream: an ASGI 3 app that fakes an OpenAI-compatible API.

    It serves ``POST /v1/chat/completions`` (plain or streamed), ``GET /v1/models``
    and ``POST /v1/embeddings``, ignores ``Authorization``, and answers anything
    else with an OpenAI-style 404. WebSocket sessions are served at
    ``/v1/realtime`` only. Run it under Hypercorn's Trio worker: streamed
    completions sleep with ``trio.sleep`` between chunks.

    Args:
        settings: The chunking and model to use when request headers do not
            override them.
    """
    return _MockUpstreamApp(settings)


@attrs.define(eq=False)
class MockUpstreamHandle:
    """What :func:`serve_mock_upstream` reports once it accepts connections.

    Attributes:
        addresses: the bound addresses, such as ``["http://127.0.0.1:9000"]``,
            with the port the system chose when ``listen`` asked for port 0.
    """

    addresses: list[str]
    _shutdown: trio.Event

    def shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, let open streams finish."""
        self._shutdown.set()


async def serve_mock_upstream(
    settings: MockUpstreamSettings | None = None,
    *,
    listen: str = "127.0.0.1:0",
    task_status: trio.TaskStatus[MockUpstreamHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves the mock upstream with Hypercorn; start it with ``nursery.start``.

    Reports a :class:`MockUpstreamHandle` once the socket is listening, so the
    caller learns the bound address (the port too, with ``listen`` on port 0)
    without polling. Runs until :meth:`MockUpstreamHandle.shutdown`, which
    lets open responses finish for up to ``GRACEFUL_SHUTDOWN_SECONDS``, or
    until its cancel scope is cancelled, which cuts them at once. Installs no
    signal handlers.

    Args:
        settings: as for :func:`create_mock_upstream_app`; the defaults
            without it.
        listen: the address to accept clients on, ``HOST:PORT``.

    Raises:
        ConfigError: ``listen`` is not ``HOST:PORT``.
        OSError: the address cannot be bound.
    """
    parse_listen_address(listen)
    app = create_mock_upstream_app(settings or MockUpstreamSettings())
    hyper = HypercornConfig()
    hyper.bind = [listen]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_SECONDS
    hyper.backlog = LISTEN_BACKLOG
    hyper.graceful_timeout = GRACEFUL_SHUTDOWN_SECONDS

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        # Hypercorn types apps with its own TypedDicts; ours use plain
        # mappings of the same ASGI messages.
        framework = cast("ASGIFramework", app)
        # An explicit trigger keeps Hypercorn from installing signal handlers.
        server = partial(hypercorn_serve, framework, hyper, shutdown_trigger=stop.wait)
        addresses: list[str] = await nursery.start(server)
        logger.info("mock upstream listening on %s", ", ".join(addresses))
        task_status.started(MockUpstreamHandle(addresses, stop))
