"""Redis commands queued in one event-loop tick go out as one pipeline.

Under load many requests are admitted and released at the same moment. One round trip and one
pool checkout per tick, instead of one per command, keeps the per-key limits cheap; a command
queued alone still goes out on the next tick, so nothing waits for company.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

Queue = Callable[[Pipeline], object]  # adds one command to the pipeline


class TickBatcher:
    """``await run(lambda pipe: pipe.zrem(...))``: the command's reply, sent with its tick."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._queued: list[tuple[Queue, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def run(self, queue: Queue) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((queue, future))
        if len(self._queued) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Queue, asyncio.Future[Any]]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for queue, _ in batch:
            queue(pipe)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its request went away meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
