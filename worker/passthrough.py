"""Passthrough: a conversation that may not be batched is sent as its own call, exactly as sent.

The request still goes through dedup (the task thread claims its key; followers share the
answer), but never joins a window: its leader hands it here, and the call runs on the
collector's loop under the same adaptive upstream limit as batches. The body is the app's own
(``Request.body()``: every field it sent, unknown ones included); the Answer keeps the whole
assistant message (tool calls included), the finish reason and the usage.

With ``stream`` the upstream is asked to stream and each chunk is relayed to Redis as it
arrives (:mod:`producer._relay`): appended to ``coalesce:chunks:<task id>`` and published on
the channel of that name, then an end marker; the Answer is settled after the end marker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from producer import Answer, Request, Settings
from producer._exceptions import UpstreamRejected
from producer._relay import CHUNK_TTL_S, chunk_key, encode_chunk, encode_done

from .batching.collector import Collector
from .batching.window import Item
from .ledger.books import Books, Share, Usage
from .shared.dedup import Outcome
from .shared.inbox import task_id_of
from .shared.redisconn import TRANSIENT
from .shared.settle import Settlement
from .tokens import count_tokens, messages_tokens
from .upstream.raw import RawCompletion

log = logging.getLogger("coalesce.passthrough")

SETTLE_GRACE_S = 5.0  # settling may retry Redis this long past the request's deadline


class Passthrough:
    """Sends passthrough requests on the collector's loop; ``send`` is called from task threads."""

    def __init__(self, settings: Settings, collector: Collector) -> None:
        self.settings = settings
        self.collector = collector

    def send(self, item: Item) -> None:
        self.collector._call_soon(self._send(item))

    async def _send(self, item: Item) -> None:
        request = item.request
        deadline = time.monotonic() + (item.deadline - time.time())
        books = self.collector.books
        started = time.monotonic()
        try:
            raw = await self._ask(request, task_id_of(item.delivery), deadline)
        except Exception as exc:
            if isinstance(exc, UpstreamRejected):
                self.collector.stats.add_soon(request.model, rejected=1)
            books.failed(request, "passthrough", started, 1, exc)
            outcome = Outcome.failed(exc)
        else:
            self.collector.stats.add_soon(request.model, passthrough=1)
            answer = answer_of(books, request, raw)
            books.call(
                tenant=request.tenant or "", model=request.model, kind="passthrough",
                usage=usage_of(answer), started=started, size=1,
            )  # fmt: skip
            share = Share(answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens,
                          answer.cost_usd)  # fmt: skip
            books.answered(
                request, task_id_of(item.delivery), "passthrough", share, raw.text,
                alone_completion=answer.completion_tokens,
            )  # fmt: skip
            outcome = Outcome(answer=answer)
        settlement = Settlement(item.key, item.delivery, item.inbox, outcome)
        await self.collector.sender.settle([settlement], deadline + SETTLE_GRACE_S)

    async def _ask(self, request: Request, task_id: str, deadline: float) -> RawCompletion:
        upstream = self.collector.upstream
        if not request.stream:
            return await upstream.complete_raw(request.body(), deadline=deadline)
        relay = Relay(self.collector.aredis, task_id)
        try:
            return await upstream.stream_raw(request.body(), deadline=deadline, on_chunk=relay.push)
        finally:
            await relay.close()


def answer_of(books: Books, request: Request, raw: RawCompletion) -> Answer:
    """The Answer for a passthrough reply: the whole message, tokens billed, their cost."""
    usage = Usage(
        raw.prompt_tokens or messages_tokens(request.messages or []),
        raw.completion_tokens or count_tokens(raw.text),
        raw.cached_tokens,
    )
    return Answer(
        text=raw.text,
        source="passthrough",
        model=request.model,
        prompt_tokens=usage.prompt,
        completion_tokens=usage.completion,
        cached_tokens=usage.cached,
        cost_usd=books.cost(request.model, usage),
        message=raw.message,
        finish_reason=raw.finish_reason,
    )


def usage_of(answer: Answer) -> Usage:
    return Usage(answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens)


class Relay:
    """Writes one stream's chunks to Redis in order, without holding up the stream's reading.

    ``push`` only queues (it runs inside the upstream read loop); one writer task sends what
    has queued in one pipeline per round trip. A Redis failure costs the relay, not the
    request: readers then fall back to the final Answer.
    """

    WRITE_RETRY_S = 5.0

    def __init__(self, client: aioredis.Redis, task_id: str) -> None:
        self.key = chunk_key(task_id)
        self._redis = client
        self._queue: list[str] = []
        self._seq = 0
        self._closing = False
        self._failed = False
        self._wake = asyncio.Event()
        self._writer = asyncio.get_running_loop().create_task(self._drain())

    def push(self, chunk: dict[str, Any]) -> None:
        self._queue.append(encode_chunk(self._seq, chunk))
        self._seq += 1
        self._wake.set()

    async def close(self) -> None:
        """Queue the end marker and wait until everything queued is written (or given up)."""
        self._queue.append(encode_done(self._seq))
        self._closing = True
        self._wake.set()
        await self._writer

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            items, self._queue = self._queue, []
            if items and not self._failed:
                await self._write(items)
            if self._closing and not self._queue:
                return

    async def _write(self, items: list[str]) -> None:
        deadline = time.monotonic() + self.WRITE_RETRY_S
        while True:
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.rpush(self.key, *items)
                pipe.expire(self.key, CHUNK_TTL_S)
                for item in items:
                    pipe.publish(self.key, item)
                await pipe.execute()
                return
            except Exception as exc:
                if not isinstance(exc, TRANSIENT) or time.monotonic() >= deadline:
                    log.warning("stream relay stopped: %s", type(exc).__name__)
                    self._failed = True
                    return
                await asyncio.sleep(0.1)
