"""A stand-in for the producer's AsyncClient, for tests of the API server alone.

It validates with the real ``validate_request`` (so bad input fails as it would), records
what it was asked and answers at once, or after ``delay``, or with ``error``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from producer import Answer, RequestTimeout, validate_request

KEY_A, KEY_B = "sk-test-alpha-0001", "sk-test-bravo-0002"


class StubTicket:
    def __init__(
        self,
        task_id: str,
        answer: Answer | None,
        error: BaseException | None,
        chunks: list[dict[str, Any]],
        delay: float,
    ) -> None:
        self.id = task_id
        self._answer, self._error, self._chunks, self._delay = answer, error, chunks, delay

    async def get(self, timeout: float | None = None) -> Answer:
        if self._delay:
            if timeout is not None and timeout < self._delay:
                await asyncio.sleep(timeout)
                raise RequestTimeout(f"no answer for request {self.id} within {timeout} s")
            await asyncio.sleep(self._delay)
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    async def chunks(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        for chunk in self._chunks:
            yield chunk


class StubClient:
    """Validates like AsyncClient.chat, records what it was asked, answers as told."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.calls: list[dict[str, Any]] = []
        self.answer = Answer(text="Hi!", source="batched", model="gpt-4o-mini", batch_size=3)
        self.error: BaseException | None = None
        self.chunks: list[dict[str, Any]] = []
        self.delay = 0.0
        self.closed = False

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str,
        tenant: str | None = None,
        stream: bool = False,
        cache: Any = None,
        tags: Any = None,
        **params: Any,
    ) -> StubTicket:
        fields = {**params, "messages": messages, "model": model, "tenant": tenant}
        if stream:
            fields["stream"] = True
        if cache is not None:
            fields["cache"] = cache
        if tags is not None:
            fields["tags"] = tags
        validate_request(self.settings, fields)
        self.calls.append(fields)
        return self.ticket(f"task-{len(self.calls)}")

    def ticket(self, task_id: str) -> StubTicket:
        return StubTicket(task_id, self.answer, self.error, self.chunks, self.delay)

    async def aclose(self) -> None:
        self.closed = True
