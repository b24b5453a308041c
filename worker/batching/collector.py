"""The collector: gathers requests for a short window, sends one combined prompt per group.

It runs an asyncio loop on its own thread inside each worker process. Celery task threads
hand it requests with :meth:`Collector.submit` and block on the returned future; the loop
groups them (see :mod:`worker.batching.grouping`), flushes a group when its window closes or it is
full, and resolves every future with that request's own answer or error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from producer import Answer, Request, Settings

from ..pricing import cost_usd, split_prompt, split_total
from ..tokens import count_tokens
from ..upstream import Completion, Upstream
from .grouping import BatchSizer, GroupKey, group_key
from .prompt import build_batch_messages, build_single_messages, is_batch_safe, parse_answers

log = logging.getLogger("coalesce.collector")

# A batch asks for this many tokens per answer on top of the per-request max_tokens,
# for the label and line break.
LABEL_TOKENS = 8

BatchHook = Callable[[str, int, int], None]

# How long the constructor waits for the loop thread to build its upstream and start running.
STARTUP_TIMEOUT_S = 30.0


@dataclass
class _Item:
    request: Request
    key: str
    tokens: int
    deadline: float
    future: concurrent.futures.Future[Answer] = field(default_factory=concurrent.futures.Future)


@dataclass
class _Group:
    items: list[_Item] = field(default_factory=list)
    tokens: int = 0
    timer: asyncio.TimerHandle | None = None


class Collector:
    """One per worker process; thread-safe ``submit``, everything else on its own loop."""

    def __init__(
        self,
        settings: Settings,
        upstream_factory: Callable[[], Upstream],
        *,
        on_batch: BatchHook | None = None,
    ) -> None:
        self.settings = settings
        self.sizer = BatchSizer(settings.max_batch)
        self._on_batch = on_batch
        self._groups: dict[GroupKey, _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name="coalesce-collector", daemon=True
        )
        self._upstream_factory = upstream_factory
        self._upstream: Upstream | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._closed = False
        self._thread.start()
        # Return only once the loop runs, so close() always finds a running loop to drain.
        if not self._started.wait(STARTUP_TIMEOUT_S):
            self._loop.call_soon_threadsafe(self._loop.stop)  # don't leave it running if it starts
            raise RuntimeError(f"collector loop did not start within {STARTUP_TIMEOUT_S} s")
        if self._startup_error is not None:
            raise RuntimeError("collector upstream factory failed") from self._startup_error

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._upstream = self._upstream_factory()
        except BaseException as exc:
            self._startup_error = exc
            self._started.set()
            return
        self._loop.call_soon(self._started.set)  # runs once run_forever() has started
        self._loop.run_forever()

    # -- called from task threads -------------------------------------------------------
    def submit(
        self, request: Request, key: str, deadline: float
    ) -> concurrent.futures.Future[Answer]:
        item = _Item(request, key, count_tokens(request.prompt), deadline)
        self._loop.call_soon_threadsafe(self._add, item)
        return item.future

    def flush_all(self) -> None:
        """Send everything held now (warm shutdown) instead of waiting for windows to close."""
        self._loop.call_soon_threadsafe(self._flush_all)

    def close(self, timeout: float = 10.0) -> None:
        async def _drain() -> None:
            self._flush_all()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=timeout)
            if self._upstream is not None:
                await self._upstream.aclose()

        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(_drain(), self._loop).result(timeout + 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # -- on the loop ----------------------------------------------------------------------
    def _add(self, item: _Item) -> None:
        model = item.request.model
        limit = self.sizer.limit(model)
        if limit == 1 or not is_batch_safe(item.request.prompt):
            self._spawn(self._send_single(item))
            return
        gkey = group_key(item.request)
        group = self._groups.setdefault(gkey, _Group())
        group.items.append(item)
        group.tokens += item.tokens
        if len(group.items) >= limit or group.tokens >= self.settings.max_batch_tokens:
            self._flush(gkey)
        elif group.timer is None:
            group.timer = self._loop.call_later(self.settings.window_ms / 1000, self._flush, gkey)

    def _flush(self, gkey: GroupKey) -> None:
        group = self._groups.pop(gkey, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        if len(group.items) == 1:
            self._spawn(self._send_single(group.items[0]))
        else:
            self._spawn(self._send_batch(gkey, group.items))

    def _flush_all(self) -> None:
        for gkey in list(self._groups):
            self._flush(gkey)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def upstream(self) -> Upstream:
        assert self._upstream is not None
        return self._upstream

    async def _send_single(self, item: _Item) -> None:
        request = item.request
        try:
            completion = await self.upstream.chat(
                model=request.model,
                messages=build_single_messages(request.prompt, system=request.system),
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                deadline=item.deadline,
            )
        except Exception as exc:
            _settle(item.future, exc)
            return
        answer = Answer(
            text=completion.text,
            source="single",
            model=request.model,
            batch_id=None,
            batch_size=1,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            cost_usd=cost_usd(
                self.settings.prices,
                request.model,
                completion.prompt_tokens,
                completion.completion_tokens,
            ),
        )
        _settle(item.future, answer)

    async def _send_batch(self, gkey: GroupKey, items: list[_Item]) -> None:
        batch_id = secrets.token_hex(8)
        per_answer = None if gkey.max_tokens is None else gkey.max_tokens + LABEL_TOKENS
        try:
            completion = await self.upstream.chat(
                model=gkey.model,
                messages=build_batch_messages(
                    [i.request.prompt for i in items], system=gkey.system
                ),
                temperature=gkey.temperature,
                max_tokens=None if per_answer is None else per_answer * len(items),
                deadline=min(i.deadline for i in items),
            )
        except Exception as exc:
            for item in items:
                _settle(item.future, exc)
            return
        texts = self._slots(completion, len(items))
        answered = [(item, text) for item, text in zip(items, texts, strict=True) if text]
        self._settle_batch(batch_id, len(items), completion, answered)
        fallbacks = [item for item, text in zip(items, texts, strict=True) if not text]
        self.sizer.record(gkey.model, len(items), len(fallbacks))
        if self._on_batch is not None:
            self._on_batch(gkey.model, len(items), len(fallbacks))
        if fallbacks:
            log.info(
                "batch %s: %d of %d answers re-sent singly", batch_id, len(fallbacks), len(items)
            )
            await asyncio.gather(*(self._send_single(item) for item in fallbacks))

    @staticmethod
    def _slots(completion: Completion, count: int) -> list[str | None]:
        if completion.finish_reason == "length":
            # The reply was cut off: whichever answer came last may be incomplete, and
            # the parser cannot tell which, so nothing from it is trusted.
            return [None] * count
        return parse_answers(completion.text, count)

    def _settle_batch(
        self, batch_id: str, size: int, completion: Completion, answered: list[tuple[_Item, str]]
    ) -> None:
        """Give each parsed answer its share of the bill: shared prefix evenly, own tokens own."""
        if not answered:
            return
        prompts = split_prompt(completion.prompt_tokens, [item.tokens for item, _ in answered])
        completions = split_total(
            completion.completion_tokens, [count_tokens(text) + 1 for _, text in answered]
        )
        for (item, text), p_tokens, c_tokens in zip(answered, prompts, completions, strict=True):
            model = item.request.model
            _settle(
                item.future,
                Answer(
                    text=text,
                    source="batched",
                    model=model,
                    batch_id=batch_id,
                    batch_size=size,
                    prompt_tokens=p_tokens,
                    completion_tokens=c_tokens,
                    cost_usd=cost_usd(self.settings.prices, model, p_tokens, c_tokens),
                ),
            )


def _settle(future: concurrent.futures.Future[Answer], outcome: Answer | BaseException) -> None:
    """Resolve a future once; a caller that already gave up has cancelled it."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def monotonic_deadline(seconds: float) -> float:
    return time.monotonic() + seconds
