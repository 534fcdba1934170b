"""The access log: one INFO line per finished exchange.

Every access line comes from this module's logger, ``trio_llmproxy.access``
(named apart so operators can route it apart from errors). Lines carry sizes
and timings, never bodies or header values.
"""

from __future__ import annotations

import logging

from ._event import Event

logger = logging.getLogger("trio_llmproxy.access")


def log_access(event: Event) -> None:
    """Log the one access line of ``event`` (cheap when INFO is off)."""
    if not logger.isEnabledFor(logging.INFO):
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
