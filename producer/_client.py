"""The blocking client an app imports: validate, enqueue one Celery task per request, wait.

It is a thin shell over :class:`~producer._core.Core`, the same core ``AsyncClient`` uses: each
``Client`` runs the core on a private event-loop thread, and every call (from any thread)
waits there for the core's coroutine. So both clients share validation, publishing, the outage
budget, the one result listener and result decoding. Redis may restart under a running app:
``submit`` retries for ``COALESCE_SUBMIT_RETRY_S`` then raises :class:`BrokerUnavailable`;
``Ticket.get`` rides it out until its timeout.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from ._cache_admin import CacheStats
from ._core import (
    CONNECT_TIMEOUT_S,
    RETRY_CAP_S,
    RETRY_FIRST_S,
    Core,
    classify,
    describe,
    redact_url,
    send_request,
)
from ._exceptions import CoalesceError
from ._listener import POLL_CAP_S, REREAD_S
from ._models import Answer, CacheOption, Request
from ._settings import Settings, get_settings
from ._validate import validate_request

T = TypeVar("T")

build_request = validate_request  # its name before the worker shared it; kept for callers

__all__ = [
    "CONNECT_TIMEOUT_S",
    "POLL_CAP_S",
    "REREAD_S",
    "RETRY_CAP_S",
    "RETRY_FIRST_S",
    "Client",
    "Ticket",
    "build_request",
    "classify",
    "describe",
    "redact_url",
    "send_request",
]


class _LoopThread:
    """A private event loop on a daemon thread; blocking callers hand it coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="coalesce-client", daemon=True
        )
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for it; interrupting the wait cancels it."""
        if self.loop.is_closed():
            coroutine.close()
            raise RuntimeError("this coalesce Client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass(frozen=True)
class Ticket:
    """A handle on one enqueued request; ``id`` is its Celery task id."""

    id: str
    _client: Client

    def ready(self) -> bool:
        """Whether a result is stored; BrokerUnavailable if Redis cannot be asked."""
        return self._client._call(self._client._core.ready(self.id))

    def get(self, timeout: float | None = None) -> Answer:
        """The answer; RequestFailed if the worker gave up, RequestTimeout after ``timeout`` s.

        A Redis restart meanwhile is waited out: the result may be stored while this producer
        is cut off, and is read once Redis answers again.
        """
        return self._client._call(self._client._core.wait(self.id, timeout))


class Client:
    """Submit prompts to the coalesce queue. Thread-safe; one per process is enough."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if redis_url is not None:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        self._core = Core(self.settings, publish=self._publish)
        self._loop = _LoopThread()

    def submit(
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
    ) -> Ticket:
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
        return self._send([request])[0]

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str,
        tenant: str | None = None,
        cache: CacheOption = None,
        tags: Mapping[str, str] | None = None,
        **params: Any,
    ) -> Ticket:
        """Enqueue an OpenAI-shaped conversation; ``params`` are the other body fields
        (temperature, tools, response_format, ...), sent on as given."""
        request = self._core.chat_request(messages, model, tenant, params, cache, tags)
        return self._send([request])[0]

    def submit_many(self, items: Iterable[Request | Mapping[str, Any]]) -> list[Ticket]:
        """Validate every item first, so one bad item enqueues nothing; then enqueue all."""
        return self._send(self._core.requests(items))

    @overload
    def get_many(
        self,
        tickets: Iterable[Ticket],
        timeout: float | None = None,
        *,
        return_exceptions: Literal[False] = False,
    ) -> list[Answer]: ...
    @overload
    def get_many(
        self, tickets: Iterable[Ticket], timeout: float | None = None, *, return_exceptions: bool
    ) -> list[Answer | CoalesceError]: ...
    def get_many(
        self,
        tickets: Iterable[Ticket],
        timeout: float | None = None,
        *,
        return_exceptions: bool = False,
    ) -> list[Answer] | list[Answer | CoalesceError]:
        """Every ticket's answer, in order, within one ``timeout`` for all: one subscription
        and one read for the lot instead of a round trip or two each. The first failure is
        raised unless ``return_exceptions``, which puts each failure in its ticket's place."""
        ids = [ticket.id for ticket in tickets]
        return self._call(self._core.wait_many(ids, timeout, return_exceptions=return_exceptions))

    def cache_stats(self, *, tenant: str | None = None, namespace: str | None = None) -> CacheStats:
        """Cache entries (of one tenant or namespace if given), hits, misses and cost saved."""
        return self._call(self._core.cache_stats(tenant, namespace))

    def clear_cache(self, *, tenant: str | None = None, namespace: str | None = None) -> int:
        """Drop cached answers (all, or one tenant's and/or one namespace's); returns how many."""
        return self._call(self._core.clear_cache(tenant, namespace))

    def ticket(self, task_id: str) -> Ticket:
        """A handle on a request submitted earlier (for example by another process)."""
        return Ticket(task_id, self)

    def _send(self, requests: list[Request]) -> list[Ticket]:
        return [Ticket(task_id, self) for task_id in self._call(self._core.send(requests))]

    def _publish(self, task_id: str, payload: dict[str, Any]) -> object:
        """One publish attempt (runs on a publishing thread); a seam for fault tests."""
        return self._core.publish_one(task_id, payload)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.call(coroutine)

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            self._loop.call(self._core.aclose())
            self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
