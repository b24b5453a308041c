"""Writing the ledger off the request's path: rows gather in memory and go out twice a second.

Recording must never fail or slow a request. Rows are appended under a lock from any thread
(task threads, the collector's loop) and one daemon thread sends each batch with one
``Ledger.record`` call. If Redis is away the rows are kept and sent later (up to
``MAX_PENDING`` rows; beyond that the oldest are dropped and the loss is logged), so a Redis
restart costs at most the rows of a crash, not the figures of an outage.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import redis

from .records import CallRecord, RequestRecord
from .store import Ledger

log = logging.getLogger("coalesce.ledger")

FLUSH_S = 0.5
MAX_PENDING = 200_000
RETRY_MAX_S = 5.0

Then = Callable[[], None]  # work that must follow the rows (settling a budget's reservation)


class LedgerWriter:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self._calls: list[CallRecord] = []
        self._requests: list[RequestRecord] = []
        self._then: list[Then] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coalesce-ledger", daemon=True)
        self._thread.start()

    def add(
        self,
        calls: Sequence[CallRecord] = (),
        requests: Sequence[RequestRecord] = (),
        then: Sequence[Then] = (),
    ) -> None:
        """Queue rows, and ``then`` to run on the writer's thread once they are written."""
        with self._lock:
            self._calls.extend(calls)
            self._requests.extend(requests)
            self._then.extend(then)
            dropped = len(self._calls) + len(self._requests) - MAX_PENDING
            if dropped > 0:
                from_calls = min(dropped, len(self._calls))
                del self._calls[:from_calls]
                del self._requests[: dropped - from_calls]
                log.error("ledger: %d rows dropped (Redis unavailable too long)", dropped)

    def flush(self) -> bool:
        """Send what is pending now; False if Redis refused (the rows are kept for later)."""
        with self._lock:
            calls, self._calls = self._calls, []
            requests, self._requests = self._requests, []
            then, self._then = self._then, []
        if not calls and not requests and not then:
            return True
        try:
            if calls or requests:
                self._ledger.record(calls, requests)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._calls[:0] = calls
                self._requests[:0] = requests
                self._then[:0] = then
            log.warning("ledger not written yet (%s); will retry", type(exc).__name__)
            return False
        for step in then:
            try:
                step()
            except Exception as exc:  # a budget's bookkeeping never holds up the ledger
                log.warning("after the ledger write: %s", type(exc).__name__)
        return True

    def stop(self) -> None:
        """Flush once more and stop (warm shutdown)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pause = FLUSH_S
        while not self._stopping.is_set():
            self._wake.wait(pause)
            self._wake.clear()
            pause = FLUSH_S if self.flush() else min(pause * 2, RETRY_MAX_S)
        self.flush()
