"""``AsyncClient``: the same core as ``Client``, awaited on the caller's event loop.

Thousands of requests can wait at once without a thread each: they all wait on the core's one
listener (one Redis pub/sub connection). Publishing, which Celery does with blocking calls,
runs on the core's few publishing threads. Use one AsyncClient per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Literal, overload

from ._cache_admin import CacheStats
from ._core import Core, classify
from ._exceptions import CoalesceError, RequestTimeout
from ._listener import Outcome, Signal
from ._models import Answer, CacheOption, Request
from ._relay import RelayItem, chunk_key, decode
from ._settings import Settings, get_settings


class AsyncTicket:
    """A handle on one enqueued request; ``id`` is its Celery task id."""

    def __init__(self, task_id: str, core: Core) -> None:
        self.id = task_id
        self._core = core

    def __repr__(self) -> str:
        return f"AsyncTicket(id={self.id!r})"

    async def ready(self) -> bool:
        """Whether a result is stored; BrokerUnavailable if Redis cannot be asked."""
        return await self._core.ready(self.id)

    async def get(self, timeout: float | None = None) -> Answer:
        """The answer; RequestFailed if the worker gave up, RequestTimeout after ``timeout`` s.

        A Redis restart meanwhile is waited out until the timeout.
        """
        return await self._core.wait(self.id, timeout)

    async def chunks(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """The upstream's ``chat.completion.chunk`` objects of a passthrough stream, in order.

        Ends after the last chunk, or as soon as the request has a result without a stream
        (batched, dedup, not streamed, failed): then it yields nothing more, and ``get()``
        gives the final answer or error. RequestTimeout if ``timeout`` s pass first.
        """
        reader = _StreamReader(self._core, self.id, timeout)
        try:
            while True:
                items = await reader.next_items()
                if items is None:
                    return
                for item in items:
                    if item.chunk is not None:
                        yield item.chunk
        finally:
            reader.close()


class _StreamReader:
    """Merges a task's relay list (catch-up) and channel (live) into chunks in seq order."""

    def __init__(self, core: Core, task_id: str, timeout: float | None) -> None:
        self._core, self._id = core, task_id
        self._key = chunk_key(task_id)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        listener = core.listener
        self._queue = listener.watch(self._key)
        self._result: asyncio.Task[Outcome] = asyncio.ensure_future(
            listener.result(core.result_channel(task_id))
        )
        # Once the result is stored the list is complete: one last read, then the end.
        self._result.add_done_callback(lambda _: self._queue.put_nowait("resync"))
        self._next: int | None = None  # seq of the next chunk to yield; None before the first
        self._heard = 0.0  # when the channel last carried an item
        self._ended = False

    async def next_items(self) -> list[RelayItem] | None:
        """The next in-order items (possibly none), or None when the stream is over."""
        if self._ended:
            return None
        event = await self._event()
        finished = self._result.done()
        if isinstance(event, bytes):
            item = _decode(event)
            self._heard = time.monotonic()
            if item is not None and self._next is not None and item.seq == self._next:
                return self._take([item])
            if item is not None and self._next is not None and item.seq < self._next:
                return []
            event = "resync"  # the first item, or a gap: the list has everything in order
        if event == "tick" and time.monotonic() - self._heard < 1.0:
            return []
        items = await self._read_list(final=finished)
        if items is None:
            return []
        taken = self._take(items)
        if finished:
            self._ended = True
        return taken

    def _take(self, items: list[RelayItem]) -> list[RelayItem]:
        """The items from ``_next`` on, contiguous, stopping at (and noting) the end marker."""
        out: list[RelayItem] = []
        for item in items:
            if self._next is None:
                self._next = item.seq
            if item.seq != self._next:
                continue
            if item.done:
                self._ended = True
                break
            out.append(item)
            self._next += 1
        return out

    async def _event(self) -> bytes | Signal:
        left = None if self._deadline is None else self._deadline - time.monotonic()
        try:
            async with asyncio.timeout(left):
                return await self._queue.get()
        except TimeoutError:
            raise RequestTimeout(
                f"no end of stream for request {self._id} within {self._timeout} s"
            ) from None

    async def _read_list(self, *, final: bool) -> list[RelayItem] | None:
        """Every relay item stored so far; None if Redis cannot be read (the listener will
        signal again once it is back). The final read is retried until the deadline."""
        while True:
            try:
                raw = await self._core.listener.redis.lrange(self._key, 0, -1)
            except Exception as exc:
                if classify(exc) is None:
                    raise
                if not final:
                    return None
                left = None if self._deadline is None else self._deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RequestTimeout(
                        f"no end of stream for request {self._id} within {self._timeout} s"
                    ) from None
                await asyncio.sleep(0.5 if left is None else min(0.5, left))
                continue
            return [item for item in map(_decode, raw) if item is not None]

    def close(self) -> None:
        self._core.listener.unwatch(self._key, self._queue)
        self._result.cancel()


def _decode(raw: bytes | str) -> RelayItem | None:
    with contextlib.suppress(ValueError):
        return decode(raw)
    return None


class AsyncClient:
    """Submit requests and await their answers without a thread per waiting request."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if redis_url is not None:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        self._core = Core(self.settings, publish=self._publish)

    async def submit(
        self,
        prompt: str,
        *,
        model: str,
        system: str | None = None,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        tenant: str | None = None,
        cache: CacheOption = None,
        tags: Mapping[str, str] | None = None,
    ) -> AsyncTicket:
        """Enqueue one prompt; InvalidRequest (a ValueError) for bad input, before enqueueing.

        BrokerUnavailable if Redis stays unreachable for ``COALESCE_SUBMIT_RETRY_S``.
        """
        request = self._core.prompt_request(
            prompt,
            model=model,
            system=system,
            temperature=temperature,
            max_tokens=max_tokens,
            tenant=tenant,
            cache=cache,
            tags=tags,
        )
        return (await self._send([request]))[0]

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str,
        tenant: str | None = None,
        stream: bool = False,
        cache: CacheOption = None,
        tags: Mapping[str, str] | None = None,
        **params: Any,
    ) -> AsyncTicket:
        """Enqueue an OpenAI-shaped conversation; ``params`` are the other body fields.

        With ``stream=True`` a passthrough request's chunks can be read with
        ``ticket.chunks()`` as the upstream sends them.
        """
        if stream:
            params = {**params, "stream": True}
        request = self._core.chat_request(messages, model, tenant, params, cache, tags)
        return (await self._send([request]))[0]

    async def submit_many(self, items: Iterable[Request | Mapping[str, Any]]) -> list[AsyncTicket]:
        """Validate every item first, so one bad item enqueues nothing; then enqueue all."""
        return await self._send(self._core.requests(items))

    @overload
    async def get_many(
        self,
        tickets: Iterable[AsyncTicket],
        timeout: float | None = None,
        *,
        return_exceptions: Literal[False] = False,
    ) -> list[Answer]: ...
    @overload
    async def get_many(
        self,
        tickets: Iterable[AsyncTicket],
        timeout: float | None = None,
        *,
        return_exceptions: bool,
    ) -> list[Answer | CoalesceError]: ...
    async def get_many(
        self,
        tickets: Iterable[AsyncTicket],
        timeout: float | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list[Answer] | list[Answer | CoalesceError]:
        """Like ``Client.get_many``: every answer in order, within one ``timeout`` for all."""
        ids = [ticket.id for ticket in tickets]
        return await self._core.wait_many(ids, timeout, return_exceptions=return_exceptions)

    async def cache_stats(
        self, *, tenant: str | None = None, namespace: str | None = None
    ) -> CacheStats:
        """Cache entries (of one tenant or namespace if given), hits, misses and cost saved."""
        return await self._core.cache_stats(tenant, namespace)

    async def clear_cache(self, *, tenant: str | None = None, namespace: str | None = None) -> int:
        """Drop cached answers (all, or one tenant's and/or one namespace's); returns how many."""
        return await self._core.clear_cache(tenant, namespace)

    def ticket(self, task_id: str) -> AsyncTicket:
        """A handle on a request submitted earlier (for example by another process)."""
        return AsyncTicket(task_id, self._core)

    async def _send(self, requests: list[Request]) -> list[AsyncTicket]:
        return [AsyncTicket(task_id, self._core) for task_id in await self._core.send(requests)]

    def _publish(self, task_id: str, payload: dict[str, Any]) -> object:
        """One publish attempt (runs on a publishing thread); a seam for fault tests."""
        return self._core.publish_one(task_id, payload)

    async def aclose(self) -> None:
        await self._core.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
