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

from producer import Answer, Request, Settings, UpstreamError
from producer._exceptions import UpstreamRejected
from producer._relay import CHUNK_TTL_S, chunk_key, encode_chunk, encode_done

from .batching.collector import Collector
from .batching.window import Item
from .pricing import cost_usd
from .shared.dedup import Outcome
from .shared.redisconn import TRANSIENT
from .shared.settle import Settlement
from .tokens import count_tokens
from .upstream.raw import RawCompletion

log = logging.getLogger("coalesce.passthrough")

SETTLE_GRACE_S = 5.0  # settling may retry Redis this long past the request's deadline


def task_id_of(delivery: str) -> str:
    """The task id inside a delivery id (``<task id>:<worker>:<serial>``)."""
    return delivery.rsplit(":", 2)[0]


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
        try:
            raw = await self._ask(request, task_id_of(item.delivery), deadline)
        except Exception as exc:
            if isinstance(exc, UpstreamRejected):
                self.collector.stats.add_soon(request.model, rejected=1)
            outcome = _failure(exc)
        else:
            self.collector.stats.add_soon(request.model, passthrough=1)
            outcome = Outcome(answer=answer_of(self.settings, request, raw))
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


def answer_of(settings: Settings, request: Request, raw: RawCompletion) -> Answer:
    """The Answer for a passthrough reply: the whole message, tokens billed, their cost."""
    prompt_tokens = raw.prompt_tokens or _prompt_tokens(request.messages or [])
    completion_tokens = raw.completion_tokens or count_tokens(raw.text)
    return Answer(
        text=raw.text,
        source="passthrough",
        model=request.model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost_usd=cost_usd(settings.prices, request.model, prompt_tokens, completion_tokens),
        message=raw.message,
        finish_reason=raw.finish_reason,
    )


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """An estimate for a provider that sent no usage: message text plus OpenAI's framing."""
    total = 3
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
            )
        total += 4 + count_tokens(content if isinstance(content, str) else "")
    return total


def _failure(exc: BaseException) -> Outcome:
    kind = type(exc).__name__ if isinstance(exc, UpstreamError) else "RequestFailed"
    return Outcome(error=str(exc) or type(exc).__name__, kind=kind)


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
