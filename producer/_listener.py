"""One pub/sub connection that waits for every request of a process (or of one AsyncClient).

Celery's Redis result backend stores a result at ``celery-task-meta-<id>`` and PUBLISHes it on
a channel of that name; the stream relay publishes chunks on ``coalesce:chunks:<id>``
(``_relay.py``). The listener subscribes to the channels someone waits on, in batches, and
after each subscription is confirmed reads the stored results (MGET), so nothing stored
earlier is missed. Every second it reads them again, so a lost message costs at most that.
When Redis goes away it reconnects with backoff (at most 0.5 s apart), subscribes again and
reads again; waiters simply keep waiting until their own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger("coalesce.producer")

Outcome = tuple[str, object]  # (Celery state, result value or exception)
Signal = Literal["resync", "tick"]  # to stream readers: read the list (must / if quiet)

RETRY_FIRST_S = 0.05
POLL_CAP_S = 0.5  # longest pause between reconnect attempts while Redis is away
REREAD_S = 1.0  # stored results are read again this often (a lost message costs <= this)
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 5.0  # a half-open connection is noticed by the next re-read
MGET_CHUNK = 500


class Listener:
    """Waits for results and stream items of many requests on one connection."""

    def __init__(self, url: str, decode: Callable[[bytes], Outcome | None]) -> None:
        self.url = url
        self.redis = aredis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._decode = decode
        self._results: dict[str, list[asyncio.Future[Outcome]]] = {}
        self._streams: dict[str, set[asyncio.Queue[bytes | Signal]]] = {}
        self._fresh: set[str] = set()  # channels with a new waiter since the last subscribe sync
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.problem: BaseException | None = None  # set while Redis cannot be reached

    # --- what waiters call -----------------------------------------------------------------------

    async def result(self, channel: str) -> Outcome:
        """The final result published (or stored) under ``channel``; waits until it comes."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._results.setdefault(channel, []).append(future)
        self._changed(channel)
        try:
            return await future
        finally:
            waiters = self._results.get(channel)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._results[channel]
                    self._changed()

    def watch(self, channel: str) -> asyncio.Queue[bytes | Signal]:
        """A queue of raw messages on ``channel``, and signals to read the stored list."""
        queue: asyncio.Queue[bytes | Signal] = asyncio.Queue()
        self._streams.setdefault(channel, set()).add(queue)
        self._changed(channel)
        return queue

    def unwatch(self, channel: str, queue: asyncio.Queue[bytes | Signal]) -> None:
        queues = self._streams.get(channel)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._streams[channel]
                self._changed()

    async def aclose(self) -> None:
        self._closed = True
        if self._task is not None:
            await stop_tasks([self._task])
        await self.redis.aclose()

    # --- the loop ------------------------------------------------------------------------------

    def _wanted(self) -> set[str]:
        return self._results.keys() | self._streams.keys()

    def _changed(self, fresh: str | None = None) -> None:
        if fresh is not None:
            self._fresh.add(fresh)
        self._wake.set()
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="coalesce-wait")

    async def _run(self) -> None:
        """Sessions, one per connection; between them, pauses while Redis is away."""
        pause = RETRY_FIRST_S
        while not self._closed:
            if not self._wanted():
                self._wake.clear()
                await self._wake.wait()
                continue
            pubsub = self.redis.pubsub()
            try:
                await self._session(pubsub)
            except Exception as exc:
                if self.problem is None:
                    pause = RETRY_FIRST_S
                    log.warning("result listener lost Redis (%s); reconnecting", type(exc).__name__)
                self.problem = exc
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, POLL_CAP_S)

    async def _session(self, pubsub: aredis.client.PubSub) -> None:
        """Subscribe everything wanted, then read and (re)subscribe until the connection fails."""
        subscribed = self._wanted()
        self._fresh.clear()  # each gets its read when its subscription is confirmed
        await pubsub.subscribe(*subscribed)
        self.problem = None
        tasks = [
            asyncio.create_task(self._read(pubsub)),
            asyncio.create_task(self._subscriptions(pubsub, subscribed)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await stop_tasks(tasks)
        for task in done:
            task.result()

    async def _subscriptions(self, pubsub: aredis.client.PubSub, subscribed: set[str]) -> None:
        """Follow what is wanted: one SUBSCRIBE / UNSUBSCRIBE for every change since the last.

        A new waiter on a channel already subscribed gets no confirmation, so its stored result
        (or stream list) is read here; the others' is read when their confirmation arrives.
        """
        while True:
            self._wake.clear()
            wanted = self._wanted()
            fresh, self._fresh = self._fresh & wanted, set()
            if added := wanted - subscribed:
                await pubsub.subscribe(*added)
                subscribed |= added
            if dropped := subscribed - wanted:
                await pubsub.unsubscribe(*dropped)
                subscribed -= dropped
            if already := fresh - added:
                await self._reread(already, "resync")
            if not self._wake.is_set():
                await self._wake.wait()

    async def _read(self, pubsub: aredis.client.PubSub) -> None:
        """Dispatch messages; read stored results after confirmations and every REREAD_S."""
        next_reread = time.monotonic() + REREAD_S
        while True:
            confirmed: list[str] = []
            message = await pubsub.get_message(timeout=max(0.0, next_reread - time.monotonic()))
            while message is not None:
                self._dispatch(message, confirmed)
                message = await pubsub.get_message(timeout=0)
            if confirmed:
                await self._reread(confirmed, "resync")
            if time.monotonic() >= next_reread:
                await self._reread(list(self._wanted()), "tick")
                next_reread = time.monotonic() + REREAD_S

    def _dispatch(self, message: dict[str, Any], confirmed: list[str]) -> None:
        channel = _text(message.get("channel"))
        kind = message.get("type")
        if kind == "subscribe":
            confirmed.append(channel)
        elif kind == "message":
            data = message.get("data")
            if isinstance(data, bytes):
                self._deliver(channel, data)

    def _deliver(self, channel: str, data: bytes) -> None:
        if channel in self._results:
            outcome = self._decode(data)
            if outcome is not None:
                for future in self._results.pop(channel):
                    if not future.done():
                        future.set_result(outcome)
                self._changed()
        for queue in self._streams.get(channel, ()):
            queue.put_nowait(data)

    async def _reread(self, channels: Iterable[str], signal: Signal) -> None:
        """Read stored results for result channels; tell stream readers to read their lists."""
        keys = [channel for channel in channels if channel in self._results]
        for start in range(0, len(keys), MGET_CHUNK):
            chunk = keys[start : start + MGET_CHUNK]
            for key, raw in zip(chunk, await self.redis.mget(chunk), strict=True):
                if raw is not None:
                    self._deliver(key, raw if isinstance(raw, bytes) else raw.encode())
        for channel in channels:
            for queue in self._streams.get(channel, ()):
                queue.put_nowait(signal)


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they end, cancelling again any that lost the request:
    on Python 3.11 ``asyncio.wait_for`` (used inside redis-py) can swallow a cancellation
    that races the completion of what it waits for."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the caller reports the one that ended the session


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
