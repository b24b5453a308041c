"""What the provider refuses or cannot take: rejections (400/413/422) and adaptive concurrency."""

from __future__ import annotations

import asyncio
import pickle
import random
import sys
import time
from pathlib import Path

import httpx
import pytest

for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from upstream_fakes import BASE, chat, make, ok_body, scripted, status  # noqa: E402

from producer._exceptions import (  # noqa: E402
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from worker.upstream import AdaptiveLimit, RetryPolicy, Upstream  # noqa: E402

# -- rejections ---------------------------------------------------------------------------------


async def test_content_filter_400_is_a_rejection_with_its_code() -> None:
    error = {"message": "The response was filtered", "code": "content_filter", "type": None}
    handler, seen = scripted(httpx.Response(400, json={"error": error}))
    upstream, _ = make(handler)
    async with upstream:
        with pytest.raises(UpstreamRejected) as info:
            await chat(upstream)
    assert (info.value.status_code, info.value.code) == (400, "content_filter")
    assert "The response was filtered" in str(info.value)
    assert "content_filter" in str(info.value)
    assert len(seen) == 1


async def test_context_length_rejection_and_missing_code() -> None:
    error = {"message": "maximum context length is 8192", "code": "context_length_exceeded"}
    handler, _ = scripted(httpx.Response(413, json={"error": error}), status(422))
    upstream, _ = make(handler)
    async with upstream:
        with pytest.raises(UpstreamRejected) as first:
            await chat(upstream)
        with pytest.raises(UpstreamRejected) as second:
            await chat(upstream)
    assert (first.value.status_code, first.value.code) == (413, "context_length_exceeded")
    assert (second.value.status_code, second.value.code) == (422, None)


async def test_401_is_not_a_rejection() -> None:
    handler, _ = scripted(status(401, error={"message": "bad key", "code": "invalid_api_key"}))
    upstream, _ = make(handler)
    async with upstream:
        with pytest.raises(UpstreamStatusError) as info:
            await chat(upstream)
    assert not isinstance(info.value, UpstreamRejected)
    assert info.value.status_code == 401


@pytest.mark.parametrize(
    "exc",
    [
        UpstreamRejected("rejected (400 content_filter): no", 400, "content_filter"),
        UpstreamRejected("rejected (422): no", 422, None),
        UpstreamStatusError("upstream returned 401: no", 401),
        UpstreamStreamBroken("stream broke after 5 characters", "hello"),
        UpstreamTimeout("deadline"),
        UpstreamRateLimited("429"),
        UpstreamBadResponse("bad"),
    ],
)
def test_exceptions_pickle_with_their_attributes(exc: UpstreamError) -> None:
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc)
    assert str(again) == str(exc)
    assert vars(again) == vars(exc)


def test_stream_broken_keeps_partial_text_out_of_the_message() -> None:
    exc = UpstreamStreamBroken("upstream stream broke after 6 characters", "secret")
    assert "secret" not in str(exc) and "secret" not in repr(exc)
    assert exc.partial_text == "secret"


# -- adaptive concurrency -----------------------------------------------------------------------


async def test_concurrency_bounds_calls_in_flight() -> None:
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            in_flight -= 1
        return httpx.Response(200, json=ok_body())

    upstream, _ = make(handler, concurrency=2)
    async with upstream:
        results = await asyncio.gather(*(chat(upstream) for _ in range(6)))
    assert len(results) == 6
    assert peak == 2
    assert upstream.calls == 6


async def test_limit_halves_once_per_round_and_grows_back() -> None:
    limit = AdaptiveLimit(16)
    tickets = [await limit.acquire() for _ in range(8)]
    for ticket in tickets:  # a burst of 429s from calls already in flight counts once
        limit.release(ticket, "overloaded")
    assert limit.limit == 8.0
    ticket = await limit.acquire()  # started after the decrease: may halve again
    limit.release(ticket, "overloaded")
    assert limit.limit == 4.0
    for _ in range(4):  # one round of successes adds about one
        limit.release(await limit.acquire(), "ok")
    assert 4.9 < limit.limit < 5.0
    for _ in range(500):
        limit.release(await limit.acquire(), "ok")
    assert limit.limit == 16.0
    for _ in range(10):
        limit.release(await limit.acquire(), "overloaded")
    assert limit.limit == 1.0 and limit.slots == 1


async def test_limit_hands_slots_over_in_order_and_survives_cancellation() -> None:
    limit = AdaptiveLimit(1)
    held = await limit.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        ticket = await limit.acquire()
        order.append(name)
        limit.release(ticket, "neutral")

    waiters = [asyncio.create_task(take(n)) for n in "abc"]
    await asyncio.sleep(0)
    waiters[1].cancel()
    limit.release(held, "neutral")
    await asyncio.gather(*waiters, return_exceptions=True)
    assert order == ["a", "c"]
    assert limit.in_flight == 0


async def test_provider_that_takes_two_calls_ends_up_with_about_two() -> None:
    """16 allowed, but the provider answers 429 above 2 in flight: AIMD must find the 2."""
    in_flight = 0
    arrivals: list[int] = []  # calls in flight at the provider as each one arrives
    rejected = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, rejected
        in_flight += 1
        arrivals.append(in_flight)
        try:
            if in_flight > 2:
                rejected += 1
                return status(429)
            await asyncio.sleep(0.01)
            return httpx.Response(200, json=ok_body())
        finally:
            in_flight -= 1

    upstream = Upstream(
        BASE,
        transport=httpx.MockTransport(handler),
        concurrency=16,
        rng=random.Random(5),
        retry=RetryPolicy(base_delay_s=0.005, max_delay_s=0.05),
    )
    deadline = time.monotonic() + 20.0
    async with upstream:
        results = await asyncio.gather(*(chat(upstream, deadline=deadline) for _ in range(80)))
    assert len(results) == 80  # every call succeeded within its deadline
    assert time.monotonic() < deadline
    later = arrivals[len(arrivals) // 2 :]
    assert max(later) <= 4, later
    assert sum(later) / len(later) < 3.0
    assert rejected < 40  # without the limit, 16 callers hammering a 2-slot provider: hundreds
    assert 1.0 <= upstream.limit <= 6.0  # far below the 16 it started at
