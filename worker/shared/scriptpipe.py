"""One script, called from many task threads, sent from the collector's loop in pipelines.

A task thread that makes its own Redis call pays for the socket round trip and, on a busy
worker, several hand-overs of the interpreter lock: measured here, about 300 µs of CPU per
call with hundreds of threads, against 50 µs for waking on a future. So threads hand their call
to the loop, which sends every call that arrived since its last send in one pipeline (one
write and one read for all of them) and resolves each thread's future with its own reply.
Connection problems are retried with the shared backoff until each call's deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from .redisconn import TRANSIENT, Backoff, RedisUnavailable

Arg = str | int | float


@dataclass
class _Call:
    keys: Sequence[str]
    args: Sequence[Arg]
    deadline: float  # monotonic
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


class ScriptPipe:
    """Thread-safe :meth:`call`; the sending runs on ``loop``, with the async ``client``."""

    def __init__(
        self, client: aioredis.Redis, loop: asyncio.AbstractEventLoop, script: str, what: str
    ) -> None:
        self._client = client
        self._loop = loop
        # Registered like every other script here; its sha is what the pipeline calls.
        self._script = client.register_script(script)
        self._what = what
        self._pending: list[_Call] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, keys: Sequence[str], args: Sequence[Arg], deadline: float) -> Any:
        """The script's reply; raises RedisUnavailable when Redis stays away past ``deadline``."""
        pending = _Call(keys, args, deadline)
        with self._lock:
            self._pending.append(pending)
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            self._loop.call_soon_threadsafe(self._start)
        # The loop settles every call by its deadline; the margin covers a slow last attempt.
        wait = max(0.0, deadline - time.monotonic()) + 5.0
        try:
            return pending.future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            raise RedisUnavailable(f"no reply from Redis during {self._what}") from None

    # -- on the loop -------------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            calls, self._pending, self._scheduled = self._pending, [], False
        task = self._loop.create_task(self._send(calls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, calls: list[_Call]) -> None:
        backoff = Backoff(self._what, max(c.deadline for c in calls))
        while calls:
            try:
                replies = await self._run(calls)
            except TRANSIENT as exc:
                calls = self._past_deadline(calls, backoff, exc)
                if calls:
                    await asyncio.sleep(backoff.next_wait(exc))
                continue
            except Exception as exc:  # a bug, not Redis being away: every caller hears it
                for c in calls:
                    c.future.set_exception(exc)
                return
            for c, reply in zip(calls, replies, strict=True):
                if isinstance(reply, Exception):
                    c.future.set_exception(reply)
                else:
                    c.future.set_result(reply)
            return

    @staticmethod
    def _past_deadline(calls: list[_Call], backoff: Backoff, exc: BaseException) -> list[_Call]:
        """Fail the calls whose deadline leaves no room for another try; keep the rest."""
        soon = time.monotonic() + backoff.delay_cap()
        keep = []
        for c in calls:
            if c.deadline <= soon:
                c.future.set_exception(backoff.unavailable(exc))
            else:
                keep.append(c)
        return keep

    async def _run(self, calls: list[_Call]) -> list[Any]:
        """One pipeline for all; the script is loaded (once) if Redis does not know it."""
        replies = await self._pipeline(calls)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self._client.script_load(self._script.script)
            redo = [n for n, r in enumerate(replies) if isinstance(r, NoScriptError)]
            for n, reply in zip(redo, await self._pipeline([calls[n] for n in redo]), strict=True):
                replies[n] = reply
        return replies

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for c in calls:
                pipe.evalsha(self._script.sha, len(c.keys), *c.keys, *c.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
