"""Redis clients for a worker process, and retrying within a request's deadline.

A Redis restart of a few seconds must cost time, not requests: every call on a request's path
goes through :func:`retry_sync` or :func:`retry_async`, which retry connection problems with
capped, jittered backoff until the caller's deadline. The clients themselves do not retry, so
there is one retry policy and it knows the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer._exceptions import BrokerUnavailable

log = logging.getLogger("coalesce.redis")

T = TypeVar("T")

# Connection problems worth waiting out; anything else (a script error, a wrong type) is a bug.
TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    ConnectionError,
    TimeoutError,
    OSError,
)
BASE_DELAY_S = 0.05
MAX_DELAY_S = 1.0


class RedisUnavailable(BrokerUnavailable):
    """Redis did not answer before the request's deadline; the message says for how long and why."""


# Wait up to 30 s for a free connection; fail a connect fast (the caller's retry waits it out).
POOL: dict[str, Any] = {"timeout": 30, "socket_connect_timeout": 2, "health_check_interval": 30}


def sync_client(url: str, *, max_connections: int) -> redis.Redis:
    """A thread-safe client whose pool blocks for a free connection instead of failing.

    The pool is sized by the caller for the process's threads; a blocking pool turns a burst
    beyond that into a short wait, never into ``MaxConnectionsError``.
    """
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, **POOL)
    return redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))


def async_client(url: str, *, max_connections: int = 512) -> aioredis.Redis:
    """The collector loop's client.

    A plain pool: the loop's own tasks bound how many connections it uses (settles, flushes,
    leases: tens), and asyncio's blocking pool costs a condition and a timeout per command.
    """
    pool = aioredis.ConnectionPool.from_url(
        url, max_connections=max_connections, socket_connect_timeout=2, health_check_interval=30
    )
    return aioredis.Redis(connection_pool=pool, retry=AsyncRetry(NoBackoff(), 0))


class Backoff:
    """One retry policy for sync and async callers: how long to wait next, or give up."""

    def __init__(self, what: str, deadline: float) -> None:
        self.what = what
        self.deadline = deadline
        self.started = time.monotonic()
        self.attempt = 0

    def delay_cap(self) -> float:
        """The longest the next wait may be."""
        return min(MAX_DELAY_S, BASE_DELAY_S * 2.0**self.attempt)

    def unavailable(self, exc: BaseException) -> RedisUnavailable:
        """The error for giving up: for how long, during what, and the last problem."""
        waited = time.monotonic() - self.started
        return RedisUnavailable(
            f"Redis unavailable for {waited:.1f} s during {self.what} ({type(exc).__name__}: {exc})"
        )

    def next_wait(self, exc: BaseException) -> float:
        """Seconds to wait before the next try; raises RedisUnavailable past the deadline."""
        wait = random.uniform(0, self.delay_cap())
        if time.monotonic() + wait >= self.deadline:
            raise self.unavailable(exc) from None
        if self.attempt == 0:
            log.warning("Redis call %s failed (%s); retrying", self.what, type(exc).__name__)
        self.attempt += 1
        return wait


def retry_sync(what: str, call: Callable[[], T], deadline: float) -> T:
    """``call()``, retried on connection problems until ``deadline`` (monotonic seconds)."""
    backoff = Backoff(what, deadline)
    while True:
        try:
            return call()
        except TRANSIENT as exc:
            time.sleep(backoff.next_wait(exc))


async def retry_async(what: str, call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """:func:`retry_sync` for the event loop: the same policy, awaiting instead of sleeping."""
    backoff = Backoff(what, deadline)
    while True:
        try:
            return await call()
        except TRANSIENT as exc:
            await asyncio.sleep(backoff.next_wait(exc))
