"""The access log: one INFO line per finished exchange or WebSocket session.

Every access line comes from this module's logger, ``trio_llmproxy.access``
(named apart so operators can route it apart from errors). Lines carry sizes
and timings, never bodies or header values.

The line is written on the request path, when the event is built, so its
outcome is the exchange's own: a 2xx answer that ends in an in-band error is
logged ``ok``, although its event says ``upstream_error``. Finding that error
means parsing the body, which only the event's subscribers do.
"""

from __future__ import annotations

import logging

from ._event import Event, WebSocketSession, WebSocketSide

logger = logging.getLogger("trio_llmproxy.access")


def _side(side: WebSocketSide) -> str:
    return f"{side.messages}msg/{side.bytes}B"


def _closed(session: WebSocketSession) -> str:
    """Who closed the session first and with which code, as ``client:1000``.

    ``proxy:1001`` when the proxy closed it itself (at shutdown, say).
    """
    if session.closed_by is None:
        return "-"
    if session.closed_by == "proxy":
        return f"proxy:{session.proxy_close_code}"
    side = session.client if session.closed_by == "client" else session.upstream
    code = "-" if side.close_code is None else str(side.close_code)
    return f"{session.closed_by}:{code}"


def _log_session(event: Event, session: WebSocketSession) -> None:
    # The session's bodies are empty: its traffic is in messages each way.
    logger.info(
        "%r %s %r %d %s client=%s upstream=%s closed=%s total=%.1fms%s",
        event.request_id,
        event.method,
        event.path,
        event.status,
        event.outcome,
        _side(session.client),
        _side(session.upstream),
        _closed(session),
        event.duration_ms,
        "" if event.error is None else f" error={event.error!r}",
    )


def log_access(event: Event) -> None:
    """Log the one access line of ``event`` (cheap when INFO is off).

    The line of an accepted WebSocket session (status 101) gives, instead of
    body sizes and time to first byte, the messages and bytes each side sent
    and who closed first with which code. A refused handshake was an HTTP
    exchange, and its line is one.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    if event.websocket is not None and event.status == 101:
        _log_session(event, event.websocket)
        return
    logger.info(
        # The request ID and path come from the client: quoted with %r, they
        # cannot forge fields of the line.
        "%r %s %r %d %s in=%dB out=%dB ttfb=%sms total=%.1fms%s",
        event.request_id,
        event.method,
        event.path,
        event.status,
        event.outcome,
        event.request_body_size,
        event.response_body_size,
        "-" if event.ttfb_ms is None else f"{event.ttfb_ms:.1f}",
        event.duration_ms,
        "" if event.error is None else f" error={event.error!r}",
    )
