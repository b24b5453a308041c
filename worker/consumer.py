"""Celery's consumer with task events sent in batches on a short timer.

A worker sends three task events per request (received, started, succeeded) for Flower.
Celery buffers them, but asks its event loop to publish the buffer after every single event,
and any event sent from a task thread wakes that loop to do it: about one Redis publish and
one cross-thread wake-up per two events. Here the first event after a flush arms one timer,
and the buffer goes out when it fires (``EVENT_FLUSH_S`` later), in one publish. Flower sees
each event at most that much later; nothing is dropped, and shutdown sends what is left.
"""

from __future__ import annotations

import threading
import time

from celery.worker.consumer import Consumer

EVENT_FLUSH_S = 0.05
EVENT_FLUSH_LOST_S = 2.0
# A buffer this full is published at once, by whichever thread sent the event.
EVENT_BUFFER_LIMIT = 512


class BatchedEventsConsumer(Consumer):  # type: ignore[misc]
    """Select with ``worker_consumer = "worker.consumer:BatchedEventsConsumer"``."""

    _armed_at: float | None = None  # monotonic time the pending flush was asked for
    _arm_lock = threading.Lock()

    def on_send_event_buffered(self) -> None:
        if not self.hub:
            return
        now = time.monotonic()
        with self._arm_lock:
            # A flush pending for much longer than its delay was lost with the loop's timers
            # (a reconnect clears them): ask again rather than hold events until a full buffer.
            if self._armed_at is not None and now - self._armed_at < EVENT_FLUSH_LOST_S:
                return
            self._armed_at = now
        self.hub.call_soon(self._arm_event_flush)

    def _arm_event_flush(self) -> None:
        """On the event loop's thread: the timer (the loop's timer is not thread-safe)."""
        dispatcher = self.event_dispatcher
        if dispatcher is not None:
            dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        self.hub.call_later(EVENT_FLUSH_S, self._flush_batched_events)

    def _flush_batched_events(self) -> None:
        with self._arm_lock:
            self._armed_at = None
        self._flush_events()

    def shutdown(self) -> None:
        self._flush_events()
        super().shutdown()
