"""Work on events off the request path, without stalling the event loop.

Subscribers do the costly work on events: decoding bodies, parsing the
``llm`` object, encoding JSON. Done in a worker thread, that work holds the
GIL while the event loop waits to take it back after each of its socket
calls (up to the interpreter's 5 ms switch interval, every time): under load
it delayed first tokens and the chunks of other streams by tens of
milliseconds. So events with small captures are handled on the event loop,
one at a time, yielding to the other tasks at least every
``SLICE_SECONDS``. Only events whose captures are larger, whose work alone
could stall the loop, go to a worker thread.

An event caches its JSON and its ``llm`` object, so whichever subscriber
renders an event first does it for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final

import trio

from ._event import Event

# Events whose captures are at most this large are worked on in the event
# loop (parsing and rendering one takes up to a few milliseconds).
INLINE_BODY_BYTES: Final = 16 * 1024
SLICE_SECONDS: Final = 0.001


async def process_events(
    events: Sequence[Event], work: Callable[[Sequence[Event]], object]
) -> None:
    """Call ``work`` on ``events``: small ones on the loop, large ones in a thread.

    Small events are handed to ``work`` one at a time, in order; the large
    ones go to it together, in a worker thread, once the small ones are done.
    """
    large = []
    started = time.perf_counter()
    for event in events:
        if event.captured_bytes() > INLINE_BODY_BYTES:
            large.append(event)
            continue
        work((event,))
        if time.perf_counter() - started >= SLICE_SECONDS:
            await trio.lowlevel.checkpoint()
            started = time.perf_counter()
    if large:
        await trio.to_thread.run_sync(work, large)


def _render_all(events: Sequence[Event]) -> None:
    for event in events:
        event.to_json()


async def render_events(events: Sequence[Event]) -> None:
    """Render each event's JSON (kept by the event) without stalling the loop.

    Sinks call it before they encode a batch, so that their own worker
    thread only joins bytes already made.
    """
    await process_events(events, _render_all)
