"""``stream: true`` replies: server-sent events in OpenAI's chunk format.

A passthrough request relays the upstream's chunks as they arrive. A batched or deduplicated
answer arrives whole (when its slot is released) and is sent as the chunks a stream of it
would have had. Until the first byte is sent a failure is an ordinary error reply with its
status; after that it is an ``error`` event, which the SDKs raise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse

from .._models import Answer
from . import replies
from .errors import ApiError, from_exception, timeout_message
from .limits import Slot
from .ports import ChatTicket

T = TypeVar("T")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Budget:
    """The time a request has left, shared by every wait of one reply."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = asyncio.get_running_loop().time() + timeout_s

    def left(self) -> float:
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    async def within(self, awaitable: Awaitable[T], task_id: str) -> T:
        """``awaitable``'s result, or a 504 ApiError once the budget is spent."""
        try:
            async with asyncio.timeout_at(self.deadline):
                return await awaitable
        except TimeoutError:
            raise ApiError(504, timeout_message(task_id), code="timeout") from None


async def stream_reply(
    ticket: ChatTicket, *, include_usage: bool, budget: Budget, slot: Slot
) -> StreamingResponse:
    """The SSE reply for ``ticket``; owns ``slot`` from here and releases it when done.

    A ticket with relayed chunks (passthrough) streams them; one without (batched, dedup)
    yields none, and its answer is sent whole when it arrives.
    """
    try:
        chunks = ticket.chunks(timeout=budget.left()).__aiter__()
        first = await budget.within(anext(chunks, None), ticket.id)
        if first is not None:
            events = _relay(first, chunks, ticket, include_usage, budget, slot)
            head = {replies.SOURCE_HEADER: "passthrough", replies.ID_HEADER: ticket.id}
            return _response(events, head)
        answer = await budget.within(ticket.get(timeout=budget.left()), ticket.id)
    except BaseException as exc:
        await slot.release()
        if isinstance(exc, Exception):
            raise from_exception(exc, ticket.id) from None
        raise
    events = _whole(answer, ticket.id, include_usage, slot)
    return _response(events, replies.headers(answer, ticket.id))


def _response(events: AsyncIterator[bytes], headers: dict[str, str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
    )


async def _whole(
    answer: Answer, task_id: str, include_usage: bool, slot: Slot
) -> AsyncIterator[bytes]:
    try:
        for item in replies.answer_chunks(answer, task_id):
            yield replies.sse(item)
        if include_usage:
            yield replies.sse(replies.usage_chunk(answer, task_id))
        yield replies.DONE
    finally:
        await slot.release()


async def _relay(
    first: dict[str, Any],
    chunks: AsyncIterator[dict[str, Any]],
    ticket: ChatTicket,
    include_usage: bool,
    budget: Budget,
    slot: Slot,
) -> AsyncIterator[bytes]:
    """The upstream's chunks as they come, then a usage chunk if asked and none came."""
    try:
        saw_usage = False
        item: dict[str, Any] | None = first
        while item is not None:
            saw_usage = saw_usage or bool(item.get("usage"))
            yield replies.sse(item)
            item = await budget.within(anext(chunks, None), ticket.id)
        if include_usage and not saw_usage:
            answer = await budget.within(ticket.get(timeout=budget.left()), ticket.id)
            yield replies.sse(replies.usage_chunk(answer, ticket.id))
        yield replies.DONE
    except Exception as exc:  # headers are sent: the SDKs raise an ``error`` event
        yield replies.sse(from_exception(exc, ticket.id).body())
    finally:
        await slot.release()
