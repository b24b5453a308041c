"""worker.upstream without streaming: payloads, retries until the deadline, secrecy.

HTTP is replaced by httpx.MockTransport; sleeps are recorded (and advance a fake clock where
the deadline matters), so retrying "for 20 s" takes milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

# Make the repository root and this folder importable however pytest is invoked.
for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from upstream_fakes import (  # noqa: E402
    KEY,
    MESSAGES,
    chat,
    make,
    make_clocked,
    ok_body,
    scripted,
    status,
)

from producer._exceptions import (  # noqa: E402
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamTimeout,
)
from worker.upstream import Completion, RetryPolicy, parse_retry_after  # noqa: E402


@pytest.fixture
def policy() -> RetryPolicy:
    return RetryPolicy()


# -- success ------------------------------------------------------------------------------------


async def test_success_parses_text_and_usage_and_sends_payload() -> None:
    handler, seen = scripted(httpx.Response(200, json=ok_body("hi there")))
    upstream, sleeps = make(handler)
    async with upstream:
        result = await chat(upstream, temperature=0.5, max_tokens=7)
    assert result == Completion("hi there", 11, 3, "stop", "m-served")
    assert str(seen[0].url) == "http://upstream.test/v1/chat/completions"
    assert seen[0].method == "POST"
    assert json.loads(seen[0].content) == {
        "model": "m",
        "messages": MESSAGES,
        "temperature": 0.5,
        "max_tokens": 7,
    }
    assert sleeps.delays == []
    assert (upstream.calls, upstream.retries) == (1, 0)


async def test_max_tokens_omitted_when_not_given() -> None:
    handler, seen = scripted(httpx.Response(200, json=ok_body()))
    upstream, _ = make(handler)
    async with upstream:
        await chat(upstream)
    assert "max_tokens" not in json.loads(seen[0].content)


async def test_missing_or_garbled_usage_counts_zero_tokens() -> None:
    body = ok_body(usage={"prompt_tokens": "many", "completion_tokens": True})
    del body["model"]
    handler, _ = scripted(
        httpx.Response(200, json=body), httpx.Response(200, json={"choices": [body["choices"][0]]})
    )
    upstream, _ = make(handler)
    async with upstream:
        first = await chat(upstream)
        second = await chat(upstream)
    assert (first.prompt_tokens, first.completion_tokens, first.model) == (0, 0, "m")
    assert (second.prompt_tokens, second.completion_tokens) == (0, 0)
    assert upstream.retries == 0


async def test_auth_header_present_only_with_key() -> None:
    handler, seen = scripted(httpx.Response(200, json=ok_body()))
    with_key, _ = make(handler, api_key=KEY)
    without_key, _ = make(handler)
    async with with_key, without_key:
        await chat(with_key)
        await chat(without_key)
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"
    assert "authorization" not in seen[1].headers


# -- 429 ----------------------------------------------------------------------------------------


async def test_429_retry_after_seconds_then_success() -> None:
    handler, seen = scripted(
        status(429, headers={"Retry-After": "2"}), httpx.Response(200, json=ok_body())
    )
    upstream, sleeps = make(handler)
    async with upstream:
        result = await chat(upstream)
    assert result.text == "hello"
    assert sleeps.delays == [2.0]
    assert (len(seen), upstream.calls, upstream.retries) == (2, 2, 1)


async def test_429_retry_after_over_max_fails_without_waiting() -> None:
    handler, seen = scripted(status(429, headers={"Retry-After": "120"}))
    upstream, sleeps = make(handler)
    async with upstream:
        with pytest.raises(UpstreamRateLimited, match="120"):
            await chat(upstream)
    assert sleeps.delays == []
    assert len(seen) == 1


async def test_429_without_retry_after_uses_backoff_then_rate_limited(policy: RetryPolicy) -> None:
    handler, seen = scripted(status(429))
    upstream, sleeps = make(handler)
    async with upstream:
        with pytest.raises(UpstreamRateLimited, match="429 on 5 attempts over"):
            await chat(upstream)
    assert len(seen) == 5
    assert len(sleeps.delays) == 4
    for i, delay in enumerate(sleeps.delays):
        assert 0 <= delay <= min(policy.max_delay_s, policy.base_delay_s * 2**i)


def test_parse_retry_after_forms() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=7), usegmt=True)
    earlier = format_datetime(now - timedelta(seconds=7), usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"Retry-After": "1.5"})) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After": later}), now) == 7.0
    assert parse_retry_after(httpx.Headers({"Retry-After": earlier}), now) == 0.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({"Retry-After": "nan"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


async def test_429_retry_after_http_date_is_waited_for() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    handler, _ = scripted(
        status(429, headers={"Retry-After": when}), httpx.Response(200, json=ok_body())
    )
    upstream, sleeps = make(handler)
    async with upstream:
        await chat(upstream)
    assert len(sleeps.delays) == 1
    assert 3.0 <= sleeps.delays[0] <= 5.0


# -- 5xx / 4xx ----------------------------------------------------------------------------------


async def test_503_twice_then_success(policy: RetryPolicy) -> None:
    handler, seen = scripted(status(503), status(503), httpx.Response(200, json=ok_body()))
    upstream, sleeps = make(handler)
    async with upstream:
        result = await chat(upstream)
    assert result.text == "hello"
    assert len(seen) == 3
    assert len(sleeps.delays) == 2
    assert 0 <= sleeps.delays[0] <= policy.base_delay_s
    assert 0 <= sleeps.delays[1] <= policy.base_delay_s * 2
    assert upstream.retries == 2


async def test_503_forever_raises_status_error_with_attempts() -> None:
    handler, seen = scripted(status(503))
    upstream, sleeps = make(handler)
    async with upstream:
        with pytest.raises(UpstreamStatusError) as info:
            await chat(upstream)
    assert info.value.status_code == 503
    assert "503 on 5 attempts over" in str(info.value)
    assert "err 503" in str(info.value)
    assert len(seen) == 5
    assert len(sleeps.delays) == 4


@pytest.mark.parametrize("code", [500, 502, 504, 408, 599])
async def test_other_retryable_statuses(code: int) -> None:
    handler, seen = scripted(status(code), httpx.Response(200, json=ok_body()))
    upstream, sleeps = make(handler)
    async with upstream:
        await chat(upstream)
    assert len(seen) == 2
    assert len(sleeps.delays) == 1


@pytest.mark.parametrize("code", [400, 401, 403, 404, 413, 422])
async def test_client_errors_fail_immediately(code: int) -> None:
    handler, seen = scripted(status(code, error={"message": f"bad thing {code}"}))
    upstream, sleeps = make(handler)
    async with upstream:
        with pytest.raises(UpstreamStatusError) as info:
            await chat(upstream)
    # Only a refusal of this input is a rejection; 401/403/404 concern every request.
    assert isinstance(info.value, UpstreamRejected) == (code in (400, 413, 422))
    assert info.value.status_code == code
    assert str(code) in str(info.value)
    assert f"bad thing {code}" in str(info.value)
    assert len(seen) == 1
    assert sleeps.delays == []
    assert upstream.retries == 0


async def test_error_message_is_truncated() -> None:
    handler, _ = scripted(status(400, error={"message": "x" * 5000}))
    upstream, _ = make(handler)
    async with upstream:
        with pytest.raises(UpstreamStatusError) as info:
            await chat(upstream)
    assert len(str(info.value)) < 400


async def test_attempts_one_means_no_retry() -> None:
    handler, seen = scripted(status(500))
    upstream, sleeps = make(handler, retry=RetryPolicy(attempts=1))
    async with upstream:
        with pytest.raises(UpstreamStatusError, match=r"500 on 1 attempt over 0\.0 s:"):
            await chat(upstream)
    assert len(seen) == 1
    assert sleeps.delays == []


# -- malformed bodies ---------------------------------------------------------------------------


async def test_malformed_json_then_good() -> None:
    handler, seen = scripted(
        httpx.Response(200, content=b"<html>not json"), httpx.Response(200, json=ok_body())
    )
    upstream, sleeps = make(handler)
    async with upstream:
        result = await chat(upstream)
    assert result.text == "hello"
    assert len(seen) == 2
    assert len(sleeps.delays) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b"{}",
        b'{"choices": []}',
        b'{"choices": [{"message": {"content": null}}]}',
        b'{"choices": [{"message": "hi"}]}',
    ],
)
async def test_malformed_forever_raises_bad_response(body: bytes) -> None:
    handler, seen = scripted(httpx.Response(200, content=body))
    upstream, sleeps = make(handler)
    async with upstream:
        with pytest.raises(UpstreamBadResponse, match="on 5 attempts"):
            await chat(upstream)
    assert len(seen) == 5
    assert len(sleeps.delays) == 4


# -- transport errors and timeouts --------------------------------------------------------------


async def test_read_timeout_retried_then_upstream_timeout() -> None:
    handler, seen = scripted(httpx.ReadTimeout("slow"))
    upstream, sleeps = make(handler)
    async with upstream:
        with pytest.raises(UpstreamTimeout, match=r"timed out \(ReadTimeout\) on 5 attempts"):
            await chat(upstream)
    assert len(seen) == 5
    assert len(sleeps.delays) == 4


async def test_read_timeout_then_success() -> None:
    handler, _ = scripted(httpx.ReadTimeout("slow"), httpx.Response(200, json=ok_body()))
    upstream, sleeps = make(handler)
    async with upstream:
        assert (await chat(upstream)).text == "hello"
    assert len(sleeps.delays) == 1


async def test_connect_error_retried_then_upstream_error() -> None:
    handler, seen = scripted(httpx.ConnectError("refused"))
    upstream, _ = make(handler)
    async with upstream:
        with pytest.raises(UpstreamError, match="ConnectError") as info:
            await chat(upstream)
    assert "on 5 attempts" in str(info.value)
    assert len(seen) == 5


# -- deadlines ----------------------------------------------------------------------------------


async def test_deadline_already_past_makes_no_call() -> None:
    handler, seen = scripted(httpx.Response(200, json=ok_body()))
    upstream, _ = make(handler)
    async with upstream:
        with pytest.raises(UpstreamTimeout, match="deadline"):
            await chat(upstream, deadline=time.monotonic() - 1)
    assert seen == []
    assert upstream.calls == 0


async def test_deadline_shorter_than_retry_after_fails_fast() -> None:
    handler, seen = scripted(
        status(429, headers={"Retry-After": "10"}), httpx.Response(200, json=ok_body())
    )
    upstream, sleeps = make(handler)
    started = time.monotonic()
    async with upstream:
        with pytest.raises(UpstreamTimeout, match="deadline") as info:
            await chat(upstream, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - started < 0.5
    assert "upstream returned 429 on 1 attempt" in str(info.value)
    assert "err 429" in str(info.value)
    assert sleeps.delays == []
    assert len(seen) == 1


async def test_deadline_cuts_off_a_slow_try() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=ok_body())

    upstream, _ = make(slow)
    started = time.monotonic()
    async with upstream:
        with pytest.raises(UpstreamTimeout, match="deadline"):
            await chat(upstream, deadline=time.monotonic() + 0.1)
    assert time.monotonic() - started < 1.0


# -- secrecy ------------------------------------------------------------------------------------


def _leaky_cases() -> Iterator[httpx.Response | Exception]:
    echo = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
    yield httpx.Response(401, json=echo)
    yield httpx.Response(503, json=echo)
    yield httpx.Response(429, json=echo)
    yield httpx.Response(429, json=echo, headers={"Retry-After": "999"})
    yield httpx.Response(200, content=f"garbage {KEY}".encode())
    yield httpx.ReadTimeout(f"timed out {KEY}")
    yield httpx.ConnectError(f"refused {KEY}")
    yield httpx.UnsupportedProtocol(f"weird {KEY}")


@pytest.mark.parametrize("answer", list(_leaky_cases()))
async def test_api_key_never_in_exception_messages(answer: httpx.Response | Exception) -> None:
    handler, _ = scripted(answer)
    upstream, _ = make(handler, api_key=KEY)
    async with upstream:
        with pytest.raises(UpstreamError) as info:
            await chat(upstream)
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value)
    assert KEY not in repr(upstream)


async def test_api_key_never_in_logs_or_prompts_logged(caplog: pytest.LogCaptureFixture) -> None:
    handler, _ = scripted(status(503), status(429), httpx.Response(200, json=ok_body()))
    upstream, _ = make(handler, api_key=KEY)
    with caplog.at_level("DEBUG", logger="coalesce.upstream"):
        async with upstream:
            await chat(upstream)
    assert caplog.records, "retries should be logged"
    assert KEY not in caplog.text
    assert "private prompt" not in caplog.text
    assert "503" in caplog.text


# -- lifecycle ------------------------------------------------------------------------------------


async def test_aclose_closes_client() -> None:
    handler, _ = scripted(httpx.Response(200, json=ok_body()))
    upstream, _ = make(handler)
    async with upstream as same:
        assert same is upstream
    with pytest.raises(RuntimeError):
        await chat(upstream)


def test_retry_policy_delay_bounds() -> None:
    policy = RetryPolicy(base_delay_s=0.25, max_delay_s=8.0)
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(8.0, 0.25 * 2**attempt)
        delays = [policy.delay(attempt, rng) for _ in range(50)]
        assert all(0 <= d <= cap for d in delays)
    assert max(policy.delay(30, rng) for _ in range(200)) > 4.0
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


# -- retrying until the deadline ----------------------------------------------------------------


async def test_429_retried_until_the_deadline_not_a_count() -> None:
    handler, seen = scripted(status(429, error={"message": "slow down please"}))
    upstream, clock = make_clocked(handler, retry=RetryPolicy(max_delay_s=2.0))
    deadline = clock.now + 20.0
    async with upstream:
        with pytest.raises(UpstreamTimeout) as info:
            await chat(upstream, deadline=deadline)
    message = str(info.value)
    assert len(seen) > 10  # far more than the old fixed 5 tries
    assert f"upstream returned 429 on {len(seen)} attempts over" in message
    assert "slow down please" in message
    assert "deadline" in message
    assert clock.now < deadline  # no wait was started that would pass it
    assert sum(clock.delays) > 20.0 - 2.0  # ... but it kept trying until it nearly had to
    assert all(d <= 2.0 for d in clock.delays)
    assert upstream.retries == len(seen) - 1


async def test_retries_succeed_late_within_the_deadline() -> None:
    handler, seen = scripted(*[status(503)] * 12, httpx.Response(200, json=ok_body()))
    upstream, clock = make_clocked(handler, retry=RetryPolicy(max_delay_s=1.0))
    async with upstream:
        result = await chat(upstream, deadline=clock.now + 60.0)
    assert result.text == "hello"
    assert len(seen) == 13


async def test_attempts_still_cap_tries_when_a_deadline_is_given() -> None:
    handler, seen = scripted(status(429))
    upstream, clock = make_clocked(handler, retry=RetryPolicy(attempts=3))
    async with upstream:
        with pytest.raises(UpstreamRateLimited, match="429 on 3 attempts over"):
            await chat(upstream, deadline=clock.now + 600.0)
    assert len(seen) == 3


def test_retry_policy_tries_cap() -> None:
    assert RetryPolicy().max_tries(None) == 5
    assert RetryPolicy().max_tries(123.0) is None
    assert RetryPolicy(attempts=2).max_tries(123.0) == 2
    assert RetryPolicy(attempts=None).attempts is None


async def test_503_retry_after_is_honoured() -> None:
    handler, _ = scripted(
        status(503, headers={"retry-after-ms": "1500"}), httpx.Response(200, json=ok_body())
    )
    upstream, sleeps = make(handler)
    async with upstream:
        await chat(upstream)
    assert sleeps.delays == [1.5]


async def test_deadline_while_waiting_for_a_slot_says_so() -> None:
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json=ok_body())

    upstream, _ = make(handler, concurrency=1)
    async with upstream:
        first = asyncio.create_task(chat(upstream))
        await asyncio.sleep(0.01)
        with pytest.raises(UpstreamTimeout, match="waiting for a free upstream slot"):
            await chat(upstream, deadline=time.monotonic() + 0.05)
        release.set()
        await first
    assert upstream.in_flight == 0
    assert upstream.calls == 1


async def test_cached_tokens_are_read() -> None:
    usage = {
        "prompt_tokens": 50,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 32},
    }
    handler, _ = scripted(httpx.Response(200, json=ok_body(usage=usage)))
    upstream, _ = make(handler)
    async with upstream:
        result = await chat(upstream)
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (50, 5, 32)
