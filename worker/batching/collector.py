"""The collector: one asyncio loop per worker process that sends what the shared window releases.

Task threads join the shared window (:mod:`worker.batching.window`) themselves; the collector
keeps a timer per group the process has items in, flushes the group when its window closes,
sends claimed batches and singles (:mod:`worker.batching.sender`), and, while any request of
this process waits, takes over batches whose sender died. Every Redis call here uses the async
client, so nothing blocks the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis
import redis.asyncio as aioredis

from producer import Settings

from ..ledger.books import Books
from ..shared.dedup import Outcome
from ..shared.redisconn import RedisUnavailable, async_client, retry_async
from ..shared.settle import Settlement, Settler
from ..shared.stats import Stats
from ..upstream import Upstream
from .grouping import Sizer, SizerPolicy
from .sender import Sender, new_batch_id
from .similar import SPLIT_FACTOR, Grouper
from .window import LEASE_S, Item, Limits, Verdict, Window

log = logging.getLogger("coalesce.collector")

STARTUP_TIMEOUT_S = 30.0
FLUSH_RETRY_S = 10.0


def sizer_policy(settings: Settings) -> SizerPolicy:
    return SizerPolicy(max_batch=settings.max_batch)


def split_factor(settings: Settings) -> int:
    """How many calls' worth one claim may hold: more than one only with similarity grouping."""
    return SPLIT_FACTOR if settings.similarity_grouping else 1


def window_limits(settings: Settings) -> Limits:
    """A claim's budgets: one call's, times the split factor."""
    factor = split_factor(settings)
    return Limits(
        settings.window_ms,
        settings.max_batch_tokens * factor,
        settings.max_batch_answer_tokens * factor,
    )


class Collector:
    """Thread-safe entry points; everything else runs on the collector's own loop."""

    def __init__(
        self,
        settings: Settings,
        sync_redis: redis.Redis,
        upstream_factory: Callable[[], Upstream],
        *,
        books: Books,
        worker_id: str = "w",
        own_inbox: str = "",
        resolve: Callable[[str, Outcome], None] = lambda delivery, outcome: None,
        waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        self.worker_id = worker_id
        self.books = books
        self._own_inbox = own_inbox
        self._resolve = resolve
        self.settings = settings
        self._sync_redis = sync_redis
        self._upstream_factory = upstream_factory
        self._waiting = waiting
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._models: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._closed = False
        self._sweeping = False
        self._thread = threading.Thread(target=self._run, name="coalesce-collector", daemon=True)
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT_S):
            raise RuntimeError(f"collector loop did not start within {STARTUP_TIMEOUT_S} s")
        if self._startup_error is not None:
            raise RuntimeError("collector failed to start") from self._startup_error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._build()
        except BaseException as exc:
            self._startup_error = exc
            self._started.set()
            return
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    def _build(self) -> None:
        self.aredis: aioredis.Redis = async_client(self.settings.redis_url)
        self.upstream = self._upstream_factory()
        self.stats = Stats(self.aredis, self._loop)
        self.settler = Settler(
            self.aredis,
            answer_ttl_s=self.settings.dedup_ttl_s,
            result_expires_s=self.settings.result_expires_s,
            own_inbox=self._own_inbox,
            resolve=self._resolve,
        )
        policy = sizer_policy(self.settings)
        self.window = Window(
            self._sync_redis,
            self.aredis,
            window_limits(self.settings),
            policy,
            split_factor=split_factor(self.settings),
        )
        sizer = Sizer(self.aredis, policy)
        grouper = Grouper(self.settings) if self.settings.similarity_grouping else None
        self.sender = Sender(
            self.settings,
            self.upstream,
            self.settler,
            sizer,
            self.stats,
            self.window,
            books=self.books,
            grouper=grouper,
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The collector's event loop (runs on its own thread)."""
        return self._loop

    # -- called from task threads ----------------------------------------------------------
    def send_single(self, item: Item) -> None:
        self._call_soon(self.sender.send_single(item))

    def send_claimed(self, verdict: Verdict, group: str, model: str) -> None:
        """A batch a task thread claimed while joining: send it, and watch what it left."""
        self._call_soon(self._send_claimed(verdict, group, model))

    def watch(self, group: str, model: str, delay_ms: int) -> None:
        """Flush ``group`` when its window closes (in ``delay_ms``), unless already watching.

        Most joins find a timer already set for their window; checking it here, without
        waking the loop, saves a wake-up per request. A timer that fires meanwhile flushes
        this request too, since it joined before looking.
        """
        timer = self._timers.get(group)
        if timer is not None and timer.when() <= self._loop.time() + delay_ms / 1000 + 0.001:
            return
        self._loop.call_soon_threadsafe(self._arm, group, model, delay_ms)

    def fail(self, settlements: list[Settlement]) -> None:
        """Settle failures decided on a task thread (its deadline passed) so followers learn."""
        self._call_soon(self.sender.settle(settlements, time.monotonic() + FLUSH_RETRY_S))

    def flush_all(self) -> None:
        """Warm shutdown: send what the windows this process watches hold, now."""
        self._loop.call_soon_threadsafe(self._flush_all)

    def close(self, timeout: float = 10.0) -> None:
        async def _drain() -> None:
            self._flush_all()
            await asyncio.sleep(0)
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=timeout)
            await self.stats.flush()
            await self.upstream.aclose()
            await self.aredis.aclose()

        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(_drain(), self._loop).result(timeout + 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # -- on the loop ----------------------------------------------------------------------
    def _call_soon(self, coro: Coroutine[Any, Any, None]) -> None:
        self._loop.call_soon_threadsafe(self._spawn, coro)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("collector task failed: %s: %s", type(exc).__name__, exc)

    def _arm(self, group: str, model: str, delay_ms: int) -> None:
        self._ensure_sweeper()
        self._models[group] = model
        timer = self._timers.get(group)
        when = self._loop.time() + delay_ms / 1000
        if timer is not None and timer.when() <= when + 0.001:
            return
        if timer is not None:
            timer.cancel()
        self._timers[group] = self._loop.call_at(when, self._fire, group)

    def _fire(self, group: str) -> None:
        self._timers.pop(group, None)
        self._spawn(self._flush(group, force=False))

    def _flush_all(self) -> None:
        for group in list(self._timers):
            self._timers.pop(group).cancel()
            self._spawn(self._flush(group, force=True))

    async def _flush(self, group: str, *, force: bool) -> None:
        model = self._models.get(group, "")
        batch_id = new_batch_id(self.worker_id)
        try:
            verdict = await retry_async(
                "window flush",
                lambda: self.window.flush(group, model, batch_id, force=force),
                time.monotonic() + FLUSH_RETRY_S,
            )
        except RedisUnavailable as exc:
            log.warning("window flush failed (%s); trying again", exc)
            self._arm(group, model, self.settings.window_ms)
            return
        if verdict.action == "wait":
            self._arm(group, model, verdict.delay_ms)
        elif verdict.action == "batch":
            await self._send_claimed(verdict, group, model)
        else:
            self._models.pop(group, None)

    async def _send_claimed(self, verdict: Verdict, group: str, model: str) -> None:
        if verdict.left:  # the claim took a full batch; the rest waits for its own window
            self._arm(group, model, self.settings.window_ms)
        await self._send(verdict)

    def _send(self, verdict: Verdict) -> Coroutine[Any, Any, None]:
        return self.sender.send_batch(
            verdict.batch,
            verdict.items,
            limit=verdict.limit,
            answer_estimate=verdict.answer_estimate,
        )

    # -- taking over from dead senders ------------------------------------------------------
    def _ensure_sweeper(self) -> None:
        if not self._sweeping:
            self._sweeping = True
            self._spawn(self._sweep())

    async def _sweep(self) -> None:
        """While requests of this process wait, take over batches whose lease ran out.

        It stops when nothing waits, so an idle worker sends no commands for it.
        """
        try:
            while self._waiting() > 0 and not self._closed:
                await asyncio.sleep(LEASE_S / 3)
                try:
                    verdict = await self.window.reclaim()
                except Exception as exc:
                    log.warning("lease sweep failed: %s", type(exc).__name__)
                    continue
                if verdict.action == "batch":
                    log.warning("took over batch %s from a worker that stopped", verdict.batch)
                    self.stats.add_soon(str(verdict.items[0].payload.get("model", "")), reclaimed=1)
                    self._spawn(self._send(verdict))
        finally:
            self._sweeping = False
