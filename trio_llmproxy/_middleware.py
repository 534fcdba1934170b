"""The instrumentation middleware: records each HTTP exchange as an Event.

It wraps any ASGI app. On the request path it only notes what passes:
references to the body chunks (up to the capture caps), their sizes, the
status and headers, and three timestamps. Everything that costs more
(decoding, base64, JSON) waits for the event's subscribers.

A WebSocket session is recorded the same way, as one event with method
``WEBSOCKET``: references to its messages (up to the response capture cap
over both directions), their counts and sizes, each side's close, and the
handshake's answer (the accept, or the refusal and its body).

The app may tell the middleware how an exchange ended (for example that the
upstream failed) with :func:`note_outcome`; otherwise the middleware infers
it from what it saw.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Final

import attrs

from ._access import log_access
from ._asgi import ASGIApp, Message, Receive, Scope, Send
from ._bus import EventBus
from ._errors import is_cancellation
from ._event import Event, WebSocketMessage, WebSocketSession, WebSocketSide
from ._redact import (
    redact_headers,
    redact_query,
    redact_subprotocol,
    secret_header_names,
)

REQUEST_ID_HEADER: Final = b"x-request-id"
MAX_REQUEST_ID_LENGTH: Final = 128
# The key, in the ASGI scope's "extensions", of the recorder of the exchange.
EXTENSION_KEY: Final = "trio_llmproxy.recorder"
# The first response chunks are marked with their end offset and send time,
# for the llm object's time to first token, computed later. A mark costs
# about 0.1-0.3 µs; the cap bounds the memory of a long stream (an LLM
# stream's first content comes within its first few events).
MAX_CHUNK_MARKS: Final = 128
# Close codes that end a WebSocket session normally: done, or going away
# (a server shutting down, say).
CLEAN_CLOSE_CODES: Final = frozenset({1000, 1001})
# Hypercorn answers a websocket.close sent before the accept with this status.
CLOSE_BEFORE_ACCEPT_STATUS: Final = 403
# Upstream text messages beyond the capture cap are still kept when their
# start names one of these Realtime API events: the llm object's usage and
# model come from them. Only the first bytes are searched, where the "type"
# of such an event stands; the bytes kept so are bounded by the cap again.
_LLM_EVENT_MARK: Final = re.compile(
    r'"(?:response\.done|session\.created|session\.updated|error)"'
)
_LLM_EVENT_MARK_SPAN: Final = 256
# What each captured WebSocket message costs against the capture cap beside
# its payload: a little more than its JSON wrapping in the event (from,
# at_ms, type, size: 65 to 75 bytes).
# Without it, a flood of empty messages would grow the list, and the event
# line, without bound.
MESSAGE_OVERHEAD_BYTES: Final = 80

logger = logging.getLogger(__name__)


def _names(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(names)


def _is_sane_request_id(value: bytes) -> bool:
    return 0 < len(value) <= MAX_REQUEST_ID_LENGTH and all(
        0x20 <= byte <= 0x7E for byte in value
    )


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _is_streamed(headers: list[tuple[bytes, bytes]], status: int, method: str) -> bool:
    """Whether a response was streamed: SSE, or sent without a length."""
    if not headers:
        return False
    if status < 200 or status in (204, 304) or method == "HEAD":
        # These never carry a body, so a missing length says nothing.
        return False
    content_type = _header(headers, b"content-type") or b""
    if content_type.startswith(b"text/event-stream"):
        return True
    return _header(headers, b"content-length") is None


def _promised_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    length = _header(headers, b"content-length")
    if length is None or _header(headers, b"transfer-encoding") is not None:
        return None
    try:
        return int(length)
    except ValueError:
        return None


def _status_without_response(recorder: Recorder) -> int:
    # No response was started: the client left first (499, as nginx logs
    # it), or the app failed and the server answered 500 on its behalf.
    return 499 if recorder.disconnected else 500


def _session_outcome(
    recorder: Recorder, session: _SessionRecord
) -> tuple[str, str | None]:
    """How a WebSocket session ended, from what passed (no note from the app)."""
    if recorder.disconnected:
        code = session.client.close_code
        return "client_disconnected", f"client closed the session with code {code}"
    if not session.accepted:
        if recorder.status:
            return "upstream_error", f"handshake refused with status {recorder.status}"
        return "upstream_error", "the app ended without answering the handshake"
    if session.closed_by == "proxy":
        error = f"the proxy closed the session with code {session.proxy_close_code}"
        reason = session.proxy_close_reason
        return "upstream_error", error if reason is None else f"{error}: {reason}"
    code = session.upstream.close_code
    if code is None:
        # Hypercorn closes such a session with 1011 for the app.
        return "upstream_error", "the app ended the session without closing it"
    if code in CLEAN_CLOSE_CODES:
        return "ok", None
    reason = session.upstream.close_reason
    error = f"upstream closed the session with code {code}"
    return "upstream_error", error if reason is None else f"{error}: {reason}"


def _new_id() -> str:
    return uuid.uuid4().hex


def _describe(exc: BaseException) -> str:
    """A short description of ``exc``, looking inside one-error groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _with_request_id(
    headers: Iterable[tuple[bytes, bytes]], request_id: bytes
) -> list[tuple[bytes, bytes]]:
    """``headers`` with the app's own request ID, if any, replaced by ours."""
    kept = [
        (name, value) for name, value in headers if name.lower() != REQUEST_ID_HEADER
    ]
    kept.append((REQUEST_ID_HEADER, request_id))
    return kept


@attrs.frozen(kw_only=True)
class CaptureSettings:
    """What the middleware keeps of each exchange.

    Bodies are captured up to ``max_request_body_bytes`` and
    ``max_response_body_bytes``; the true sizes are always counted.
    ``secret_headers`` adds header names to redact to the built-in ones.
    """

    max_request_body_bytes: int = attrs.field(
        default=1_048_576, validator=attrs.validators.ge(0)
    )
    max_response_body_bytes: int = attrs.field(
        default=4_194_304, validator=attrs.validators.ge(0)
    )
    secret_headers: tuple[str, ...] = attrs.field(default=(), converter=_names)


@attrs.define
class _Body:
    """Captured chunks of one body, up to a cap, and its true size."""

    cap: int
    chunks: list[bytes] = attrs.field(factory=list)
    captured: int = 0
    size: int = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        room = self.cap - self.captured
        if room <= 0:
            return
        if len(chunk) > room:
            chunk = chunk[:room]
        self.chunks.append(chunk)
        self.captured += len(chunk)

    @property
    def truncated(self) -> bool:
        return self.size > self.captured

    def data(self) -> bytes:
        return b"".join(self.chunks)


def _size(data: str | bytes) -> int:
    if isinstance(data, bytes):
        return len(data)
    # Most text (JSON events) is ASCII: its length is its size, no copy.
    return len(data) if data.isascii() else len(data.encode("utf-8"))


def _cut(data: str | bytes, room: int) -> str | bytes:
    """The first ``room`` bytes of ``data``; text loses a cut last character."""
    if isinstance(data, bytes):
        return data[:room]
    return data.encode("utf-8")[:room].decode("utf-8", "ignore")


@attrs.define
class _Side:
    messages: int = 0
    bytes: int = 0
    close_code: int | None = None
    close_reason: str | None = None

    def freeze(self) -> WebSocketSide:
        return WebSocketSide(
            messages=self.messages,
            bytes=self.bytes,
            close_code=self.close_code,
            close_reason=self.close_reason,
        )


@attrs.define
class _SessionRecord:
    """What the middleware knows of one WebSocket session while it runs."""

    cap: int
    started: float
    captured: int = 0
    messages: list[WebSocketMessage] = attrs.field(factory=list)
    truncated: bool = False
    llm_messages: list[WebSocketMessage] = attrs.field(factory=list)
    llm_captured: int = 0
    client: _Side = attrs.field(factory=_Side)
    upstream: _Side = attrs.field(factory=_Side)
    accepted: bool = False
    subprotocol: str | None = None
    closed_by: str | None = None
    proxy_close_code: int | None = None
    proxy_close_reason: str | None = None

    def add(self, from_client: bool, data: str | bytes | None) -> None:
        if data is None:
            return
        size = _size(data)
        side = self.client if from_client else self.upstream
        side.messages += 1
        side.bytes += size
        cost = size + MESSAGE_OVERHEAD_BYTES
        if not self.truncated:
            at_ms = (time.perf_counter() - self.started) * 1000.0
            room = self.cap - self.captured
            if cost <= room:
                self.messages.append(WebSocketMessage(from_client, at_ms, data, size))
                self.captured += cost
                return
            # The list stays a prefix of the session: the first message that
            # does not fit is cut to the room left, and none comes after it.
            self.truncated = True
            if room > MESSAGE_OVERHEAD_BYTES:
                part = _cut(data, room - MESSAGE_OVERHEAD_BYTES)
                self.messages.append(WebSocketMessage(from_client, at_ms, part, size))
            self.captured = self.cap
        # Beyond the cap a message costs two additions and, for upstream
        # text with room left in the second budget, a search of its start.
        if (
            not from_client
            and isinstance(data, str)
            and self.llm_captured + cost <= self.cap
            and _LLM_EVENT_MARK.search(data, 0, _LLM_EVENT_MARK_SPAN)
        ):
            at_ms = (time.perf_counter() - self.started) * 1000.0
            self.llm_messages.append(WebSocketMessage(from_client, at_ms, data, size))
            self.llm_captured += cost

    def close(self, from_client: bool, message: Message) -> None:
        if not from_client and self.proxy_close_code is not None:
            # The app's close is the proxy's own (see note_proxy_close), not
            # the upstream's: the upstream side did not close.
            return
        side = self.client if from_client else self.upstream
        if side.close_code is not None:
            return
        code = message.get("code")
        reason = message.get("reason")
        # ASGI's defaults: 1005 (no code received) from the client, 1000 for
        # the app's own close.
        default = 1005 if from_client else 1000
        side.close_code = code if isinstance(code, int) else default
        side.close_reason = reason if isinstance(reason, str) and reason else None
        if self.closed_by is None:
            self.closed_by = "client" if from_client else "upstream"

    def freeze(self) -> WebSocketSession:
        return WebSocketSession(
            subprotocol=self.subprotocol,
            closed_by=self.closed_by,
            proxy_close_code=self.proxy_close_code,
            proxy_close_reason=self.proxy_close_reason,
            client=self.client.freeze(),
            upstream=self.upstream.freeze(),
            messages=self.messages,
            messages_truncated=self.truncated,
            llm_messages=self.llm_messages,
            captured_bytes=self.captured + self.llm_captured,
        )


@attrs.define
class Recorder:
    """What the middleware knows of one exchange while it runs."""

    request_id: str
    started: float
    started_wall: float
    request_body: _Body
    response_body: _Body
    status: int = 0
    response_headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    first_byte: float | None = None
    finished: float | None = None
    chunk_marks: list[tuple[int, float]] = attrs.field(factory=list)
    answered: bool = False
    promised_length: int | None = None
    disconnected: bool = False
    outcome: str | None = None
    error: str | None = None
    session: _SessionRecord | None = None

    def note(self, outcome: str, error: str | None) -> None:
        """Record how the exchange ended; the first note wins."""
        if self.outcome is None:
            self.outcome = outcome
            self.error = error


def note_outcome(scope: Scope, outcome: str, error: str | None = None) -> None:
    """Tell the instrumentation middleware (if any) how an exchange ended.

    ``outcome`` is one of the event's outcomes (``"upstream_error"`` say) and
    ``error`` a short description. Without the middleware this does nothing.
    """
    recorder = scope.get("extensions", {}).get(EXTENSION_KEY)
    if isinstance(recorder, Recorder):
        recorder.note(outcome, error)


def note_proxy_close(scope: Scope, code: int, reason: str | None) -> None:
    """Tell the middleware (if any) that the app closes the session itself.

    Call it just before sending the ``websocket.close`` that the proxy makes
    on its own behalf (at shutdown, or because the upstream misbehaved),
    rather than one that passes the upstream's close on. The event then has
    ``closed_by`` ``"proxy"`` with ``code`` and ``reason`` (unless a side
    closed first), and the upstream side no close of its own. Without the
    middleware, or outside a session, this does nothing.
    """
    recorder = scope.get("extensions", {}).get(EXTENSION_KEY)
    if not isinstance(recorder, Recorder) or recorder.session is None:
        return
    session = recorder.session
    if session.closed_by is None and not recorder.disconnected:
        session.closed_by = "proxy"
        session.proxy_close_code = code
        session.proxy_close_reason = reason or None


def request_id_of(scope: Scope) -> str | None:
    """Return the request ID the middleware gave this exchange, if any."""
    recorder = scope.get("extensions", {}).get(EXTENSION_KEY)
    return recorder.request_id if isinstance(recorder, Recorder) else None


class InstrumentationMiddleware:
    """ASGI middleware that publishes one :class:`Event` per HTTP request.

    It keeps the client's ``X-Request-ID`` when sane (at most 128 printable
    ASCII characters) or makes one, passes it to the app in the request
    headers and returns it in the response headers. A WebSocket session
    makes one event too, when it ends (method ``WEBSOCKET``, its messages in
    :attr:`Event.websocket`); its ID goes back in the accept's or the
    refusal's headers. Lifespan scopes pass through untouched.

    Args:
        app: the ASGI app to wrap.
        bus: where finished events are published.
        settings: capture caps and extra secret header names.
        enrich: called with each event before it is published; it returns the
            event to publish (for example with ``attrs.evolve(event,
            extra={...})``). It runs on the request path: keep it cheap.
    """

    def __init__(
        self,
        app: ASGIApp,
        bus: EventBus,
        settings: CaptureSettings | None = None,
        *,
        enrich: Callable[[Event], Event] | None = None,
    ) -> None:
        self._app = app
        self._bus = bus
        self._settings = settings or CaptureSettings()
        self._secret_names = secret_header_names(self._settings.secret_headers)
        self._enrich = enrich

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._record_session(scope, receive, send)
            return
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        recorder, scope = self._start(scope)
        request_id = recorder.request_id.encode("ascii")
        request_body = recorder.request_body
        response_body = recorder.response_body
        chunk_marks = recorder.chunk_marks

        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                request_body.add(message.get("body", b""))
            elif message["type"] == "http.disconnect" and not recorder.answered:
                recorder.disconnected = True
            return message

        async def recording_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    if recorder.first_byte is None:
                        recorder.first_byte = time.perf_counter()
                    response_body.add(chunk)
                    if response_body.size == recorder.promised_length:
                        # The client has every byte Content-Length promised:
                        # it may close now without cutting the exchange.
                        recorder.answered = True
                        recorder.finished = time.perf_counter()
                    if len(chunk_marks) < MAX_CHUNK_MARKS:
                        chunk_marks.append((response_body.size, time.perf_counter()))
                if not message.get("more_body", False):
                    # The client has its whole answer once this send is done;
                    # a disconnect seen meanwhile is not a cut exchange.
                    recorder.answered = True
                    await send(message)
                    recorder.finished = time.perf_counter()
                    return
                await send(message)
                return
            if kind == "http.response.start":
                message = self._stamp_response(message, request_id, recorder)
            await send(message)

        await self._run_recorded(scope, recording_receive, recording_send, recorder)

    async def _record_session(self, scope: Scope, receive: Receive, send: Send) -> None:
        recorder, scope = self._start(scope)
        request_id = recorder.request_id.encode("ascii")
        session = recorder.session = _SessionRecord(
            self._settings.max_response_body_bytes, recorder.started
        )

        async def recording_receive() -> Message:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = message.get("bytes")
                session.add(True, message.get("text") if data is None else data)
            elif kind == "websocket.disconnect":
                session.close(True, message)
                if recorder.finished is None:
                    # The client left before the app closed or refused.
                    recorder.disconnected = True
                    recorder.finished = time.perf_counter()
            return message

        async def recording_send(message: Message) -> None:
            kind = message["type"]
            if kind == "websocket.send":
                if recorder.first_byte is None:
                    recorder.first_byte = time.perf_counter()
                data = message.get("bytes")
                session.add(False, message.get("text") if data is None else data)
            elif kind == "websocket.close":
                if session.accepted and not recorder.disconnected:
                    # After the client left, the server drops the app's close.
                    session.close(False, message)
                elif not recorder.status:
                    # Before the accept, Hypercorn refuses the handshake for it.
                    recorder.status = CLOSE_BEFORE_ACCEPT_STATUS
                await send(message)
                if recorder.finished is None:
                    recorder.finished = time.perf_counter()
                return
            elif kind == "websocket.accept":
                message = self._stamp_accept(message, request_id, recorder)
            elif kind == "websocket.http.response.start":
                message = self._stamp_response(message, request_id, recorder)
            elif kind == "websocket.http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    if recorder.first_byte is None:
                        recorder.first_byte = time.perf_counter()
                    recorder.response_body.add(chunk)
                if not message.get("more_body", False):
                    await send(message)
                    if recorder.finished is None:
                        recorder.finished = time.perf_counter()
                    return
            await send(message)

        await self._run_recorded(scope, recording_receive, recording_send, recorder)

    async def _run_recorded(
        self, scope: Scope, receive: Receive, send: Send, recorder: Recorder
    ) -> None:
        """Run the app on the recording channels; publish the event however it ends."""
        try:
            await self._app(scope, receive, send)
        except BaseException as exc:
            if is_cancellation(exc):
                recorder.note(*self._cancelled_outcome(recorder))
            else:
                recorder.note("upstream_error", _describe(exc))
            raise
        finally:
            self._publish(scope, recorder)

    @staticmethod
    def _stamp_accept(
        message: Message, request_id: bytes, recorder: Recorder
    ) -> Message:
        headers = _with_request_id(message.get("headers") or (), request_id)
        recorder.status = 101
        recorder.response_headers = [(name.lower(), value) for name, value in headers]
        session = recorder.session
        if session is not None:
            session.accepted = True
            subprotocol = message.get("subprotocol")
            # An upstream may pick the client's key offered as a subprotocol.
            session.subprotocol = (
                redact_subprotocol(subprotocol)
                if isinstance(subprotocol, str)
                else None
            )
        return {**message, "headers": headers}

    def _start(self, scope: Scope) -> tuple[Recorder, Scope]:
        headers = scope["headers"]
        given = [value for name, value in headers if name == REQUEST_ID_HEADER]
        if len(given) == 1 and _is_sane_request_id(given[0]):
            request_id = given[0].decode("ascii")
            forwarded = headers
        else:
            # Missing, insane, or repeated: exactly one ID goes upstream,
            # the first sane one the client sent or a new one.
            if given and _is_sane_request_id(given[0]):
                request_id = given[0].decode("ascii")
            else:
                request_id = _new_id()
            forwarded = [(n, v) for n, v in headers if n != REQUEST_ID_HEADER]
            forwarded.append((REQUEST_ID_HEADER, request_id.encode("ascii")))
        recorder = Recorder(
            request_id=request_id,
            started=time.perf_counter(),
            started_wall=time.time(),
            request_body=_Body(self._settings.max_request_body_bytes),
            response_body=_Body(self._settings.max_response_body_bytes),
        )
        # A copy of the scope, so the server's own is never changed.
        scope = dict(scope)
        scope["headers"] = forwarded
        scope["extensions"] = {
            **(scope.get("extensions") or {}),
            EXTENSION_KEY: recorder,
        }
        return recorder, scope

    @staticmethod
    def _stamp_response(
        message: Message, request_id: bytes, recorder: Recorder
    ) -> Message:
        headers = _with_request_id(message.get("headers") or (), request_id)
        recorder.status = int(message["status"])
        # Apps may send names in any case (the proxy passes the upstream's
        # as they came); the event, redaction and the lookups of
        # Content-Type, -Length and -Encoding all expect lower case.
        recorder.response_headers = [(name.lower(), value) for name, value in headers]
        recorder.promised_length = _promised_length(recorder.response_headers)
        return {**message, "headers": headers}

    @staticmethod
    def _cancelled_outcome(recorder: Recorder) -> tuple[str, str]:
        if recorder.disconnected:
            return "client_disconnected", "client closed the connection"
        return "upstream_error", "cancelled: the proxy is shutting down"

    def _publish(self, scope: Scope, recorder: Recorder) -> None:
        try:
            event = self._build_event(scope, recorder)
            if self._enrich is not None:
                event = self._enrich(event)
        except Exception:
            # Never let instrumentation break the exchange it records.
            logger.exception(
                "cannot build the event of request %s", recorder.request_id
            )
            return
        self._bus.publish(event)
        log_access(event)

    def _build_event(self, scope: Scope, recorder: Recorder) -> Event:
        end = recorder.finished or time.perf_counter()
        session = recorder.session
        if session is not None and recorder.outcome is None:
            recorder.note(*_session_outcome(recorder, session))
        if recorder.outcome is None:
            if recorder.disconnected and recorder.finished is None:
                recorder.note("client_disconnected", "client closed the connection")
            else:
                recorder.note("ok", None)
        response_headers = recorder.response_headers
        content_encoding = _header(response_headers, b"content-encoding")
        return Event(
            event_id=_new_id(),
            request_id=recorder.request_id,
            timestamp=recorder.started_wall,
            method="WEBSOCKET" if session is not None else scope["method"],
            path=scope.get("raw_path", b"").decode("latin-1") or scope["path"],
            query=redact_query(scope.get("query_string", b"").decode("latin-1")),
            status=recorder.status or _status_without_response(recorder),
            duration_ms=(end - recorder.started) * 1000.0,
            ttfb_ms=None
            if recorder.first_byte is None
            else (recorder.first_byte - recorder.started) * 1000.0,
            request_headers=redact_headers(scope["headers"], self._secret_names),
            response_headers=redact_headers(response_headers, self._secret_names),
            request_body=recorder.request_body.data(),
            request_body_size=recorder.request_body.size,
            request_body_truncated=recorder.request_body.truncated,
            response_body=recorder.response_body.data(),
            response_body_size=recorder.response_body.size,
            response_body_truncated=recorder.response_body.truncated,
            response_body_content_encoding=None
            if content_encoding is None
            else content_encoding.decode("latin-1"),
            response_chunk_marks=[
                (end, (at - recorder.started) * 1000.0)
                for end, at in recorder.chunk_marks
            ],
            streamed=self._streamed(recorder, scope),
            outcome=recorder.outcome or "ok",
            error=recorder.error,
            websocket=None if session is None else session.freeze(),
        )

    @staticmethod
    def _streamed(recorder: Recorder, scope: Scope) -> bool:
        session = recorder.session
        if session is None:
            return _is_streamed(
                recorder.response_headers, recorder.status, scope["method"]
            )
        # An accepted session streams; a refusal is an HTTP answer.
        return session.accepted or _is_streamed(
            recorder.response_headers, recorder.status, "GET"
        )
