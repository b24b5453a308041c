"""AIMD limit on upstream calls in flight, so a provider that takes 2 calls at a time gets ~2.

TCP-style: the limit starts at the configured maximum, halves when the provider says it is
overloaded (429) and grows by ``1/limit`` per success, i.e. by about one per round of
successful calls, back up to the maximum. A burst of 429s from calls that were all in flight
when the limit dropped counts once: only a call that started after the last decrease can
halve the limit again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Literal

Verdict = Literal["ok", "overloaded", "neutral"]


class AdaptiveLimit:
    """Slots for calls in flight (``int(limit)``, at least 1), handed out first come first served.

    Not thread-safe; use it from one event loop at a time.
    """

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("the concurrency limit must be at least 1")
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_flight = 0
        self._issued = 0  # tickets handed out so far; a ticket orders a call's start
        self._decreased_at = 0  # tickets issued when the limit last dropped
        self._waiters: deque[asyncio.Future[int]] = deque()

    @property
    def slots(self) -> int:
        return max(1, int(self.limit))

    async def acquire(self) -> int:
        """Wait for a slot; returns the call's ticket, to be handed back to ``release``."""
        if not self._waiters and self.in_flight < self.slots:
            return self._take()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self.in_flight -= 1
                self._wake()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, ticket: int, verdict: Verdict) -> None:
        """Free the call's slot and adjust the limit by what the call showed."""
        self.in_flight -= 1
        if verdict == "ok":
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        elif verdict == "overloaded" and ticket > self._decreased_at:
            self.limit = max(1.0, self.limit / 2.0)
            self._decreased_at = self._issued
        self._wake()

    def _take(self) -> int:
        self.in_flight += 1
        self._issued += 1
        return self._issued

    def _wake(self) -> None:
        """Hand free slots to waiters in arrival order (the slot is taken on their behalf)."""
        while self._waiters and self.in_flight < self.slots:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(self._take())
