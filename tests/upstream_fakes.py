"""Upstream test fakes: scripted MockTransport handlers, recorded sleeps, a clock."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import httpx

from worker.upstream import Completion, Upstream

BASE = "http://upstream.test/v1/"
KEY = "sk-SENTINEL-0123456789-do-not-leak"
MESSAGES = [{"role": "user", "content": "a private prompt"}]

Handler = Callable[[httpx.Request], Any]


def ok_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "cmpl-1",
        "model": "m-served",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }
    body["choices"][0]["finish_reason"] = "stop"
    body.update(extra)
    return body


class Recorder:
    """A fake sleep that records delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def scripted(*responses: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    """A handler that answers with ``responses`` in order, repeating the last one forever."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = responses[min(len(seen) - 1, len(responses) - 1)]
        if isinstance(item, Exception):
            raise item
        return item

    return handler, seen


def make(
    handler: Handler, *, sleep: Recorder | None = None, **kwargs: Any
) -> tuple[Upstream, Recorder]:
    recorder = sleep or Recorder()
    upstream = Upstream(
        BASE,
        transport=httpx.MockTransport(handler),
        rng=random.Random(1234),
        sleep=recorder,
        **kwargs,
    )
    return upstream, recorder


def status(code: int, *, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.Response(code, json=body or {"error": {"message": f"err {code}"}}, headers=headers)


async def chat(upstream: Upstream, **kwargs: Any) -> Completion:
    return await upstream.chat(model="m", messages=MESSAGES, **kwargs)


class FakeClock:
    """A monotonic clock that only moves when the fake sleep is awaited."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.delays: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def make_clocked(handler: Handler, **kwargs: Any) -> tuple[Upstream, FakeClock]:
    clock = FakeClock()
    upstream = Upstream(
        BASE,
        transport=httpx.MockTransport(handler),
        rng=random.Random(99),
        sleep=clock.sleep,
        clock=clock,
        **kwargs,
    )
    return upstream, clock
