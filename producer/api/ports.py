"""What the API needs from the producer's AsyncClient, so a test can hand it a stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from .._models import Answer


class ChatTicket(Protocol):
    @property
    def id(self) -> str: ...

    async def get(self, timeout: float | None = None) -> Answer: ...

    def chunks(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]: ...


class ChatClient(Protocol):
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
    ) -> ChatTicket: ...

    def ticket(self, task_id: str) -> ChatTicket: ...

    async def aclose(self) -> None: ...
