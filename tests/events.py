"""One builder of :class:`Event` values for tests that need an event, not a proxy.

Import it like the other support modules: ``from events import make_event``
(pytest puts ``tests/`` on the import path, as it holds no ``__init__.py``).
"""

from __future__ import annotations

from typing import Any

from trio_llmproxy import Event


def make_event(number: int = 1, **overrides: Any) -> Event:
    """Return a complete event: a small JSON chat completion answered 200, whole.

    ``event_id`` and ``request_id`` are ``e<number>`` and ``r<number>``, so a
    run of numbers gives distinct events in a known order. Any keyword replaces
    that field. Unless given, ``request_body_size`` and ``response_body_size``
    are the lengths of the bodies.
    """
    fields: dict[str, Any] = {
        "event_id": f"e{number}",
        "request_id": f"r{number}",
        # Exact in binary, so it survives the trip through microseconds.
        "timestamp": 1_700_000_000.0,
        "method": "POST",
        "path": "/v1/chat/completions",
        "query": "",
        "status": 200,
        "duration_ms": 1.0,
        "ttfb_ms": 0.5,
        "request_headers": [(b"content-type", b"application/json")],
        "response_headers": [(b"content-type", b"application/json")],
        "request_body": b"{}",
        "request_body_truncated": False,
        "response_body": b'{"ok": true}',
        "response_body_truncated": False,
        "streamed": False,
        "outcome": "ok",
        "error": None,
    }
    fields.update(overrides)
    fields.setdefault("request_body_size", len(fields["request_body"]))
    fields.setdefault("response_body_size", len(fields["response_body"]))
    return Event(**fields)
