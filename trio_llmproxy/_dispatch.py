"""Dispatchers: the loop that moves batches from a subscription into a sink.

A batch is retried with exponential backoff while the sink says the failure
is transient, and only the part the sink did not take is sent again. What
got through is acknowledged; a permanent refusal is acknowledged too (it is
logged and counted, since retrying cannot help); a batch still failing after
the last attempt is not acknowledged, so a bus that can redeliver (Redis)
hands it out again later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import attrs
import tenacity
import trio

from ._bus import Subscription
from ._errors import SinkError
from ._event import Event
from ._sinks import Sink

logger = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a dispatcher retries a batch: attempts and exponential backoff."""

    attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    initial_backoff_seconds: float = attrs.field(
        default=0.5, validator=attrs.validators.gt(0)
    )
    max_backoff_seconds: float = attrs.field(
        default=30.0, validator=attrs.validators.gt(0)
    )


@attrs.define
class DispatchStatistics:
    """Counters of one dispatcher (mutable; read them, do not write)."""

    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    retries: int = 0


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, SinkError) and not exc.permanent


@attrs.define
class Dispatcher:
    """Delivers a subscription's batches to a sink until the bus closes.

    Set :attr:`stopping` to cut backoff sleeps short: the batch at hand then
    gets one more attempt and no further retries.
    """

    sink: Sink
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    stopping: trio.Event = attrs.field(factory=trio.Event)
    stats: DispatchStatistics = attrs.field(factory=DispatchStatistics)

    async def serve(self, subscription: Subscription) -> None:
        """Deliver batches until the subscription ends; never returns early."""
        async for batch in subscription:
            accepted = await self.deliver(batch)
            if accepted:
                await subscription.ack(batch[:accepted])

    async def deliver(self, batch: Sequence[Event]) -> int:
        """Deliver one batch with retries; return how many to acknowledge."""
        done = 0
        try:
            async for attempt in self._retrying():
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.stats.retries += 1
                    try:
                        await self._attempt(batch[done:])
                    except SinkError as exc:
                        # Only the events the sink did not take are sent again.
                        done += exc.delivered
                        raise
                    done = len(batch)
        except SinkError as exc:
            self.stats.delivered += done
            return self._give_up(batch, done, exc)
        self.stats.delivered += done
        return done

    async def _attempt(self, events: Sequence[Event]) -> None:
        try:
            await self.sink.deliver(events)
        except SinkError:
            raise
        except Exception as exc:
            # A bug in a user's sink: logged with its traceback, then retried
            # like any transient failure.
            logger.exception("sink %r raised", self.sink.name)
            msg = f"sink {self.sink.name!r} raised {exc!r}"
            raise SinkError(msg) from exc

    def _give_up(self, batch: Sequence[Event], done: int, exc: SinkError) -> int:
        rest = len(batch) - done
        if exc.permanent:
            self.stats.rejected += rest
            logger.error(
                "sink %r refused %d event(s) for good: %s", self.sink.name, rest, exc
            )
            return len(batch)
        self.stats.failed += rest
        logger.error(
            "sink %r failed %d event(s) after %d attempt(s): %s",
            self.sink.name,
            rest,
            self.retry.attempts,
            exc,
        )
        return done

    def _retrying(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_transient),
            stop=tenacity.stop_any(
                tenacity.stop_after_attempt(self.retry.attempts),
                _StopWhenSet(self.stopping),
            ),
            wait=tenacity.wait_exponential(
                multiplier=self.retry.initial_backoff_seconds,
                max=self.retry.max_backoff_seconds,
            ),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )

    async def _sleep(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self.stopping.wait()

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        logger.warning(
            "sink %r: attempt %d failed (%s); retrying in %.2f s",
            self.sink.name,
            retry_state.attempt_number,
            error,
            retry_state.upcoming_sleep,
        )


class _StopWhenSet(tenacity.stop.stop_base):
    """Stops retrying once ``event`` is set (shutdown has begun)."""

    def __init__(self, event: trio.Event) -> None:
        self._event = event

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._event.is_set()
