"""worker.upstream streaming: real SSE bodies through httpx.MockTransport, fallbacks, deadlines."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from producer._exceptions import (  # noqa: E402
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamStreamBroken,
    UpstreamTimeout,
)
from worker.upstream import Completion, RetryPolicy, Upstream  # noqa: E402

BASE = "http://upstream.test/v1"
KEY = "sk-SENTINEL-stream-do-not-leak"
MESSAGES = [{"role": "user", "content": "a private prompt"}]
SSE = {"content-type": "text/event-stream; charset=utf-8"}

Handler = Callable[[httpx.Request], Any]


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    """One ``data:`` event as OpenAI sends it."""
    delta: dict[str, Any] = {} if content is None else {"content": content}
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "m-served",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    body.update(extra)
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 4,
    "prompt_tokens_details": {"cached_tokens": 32},
}
USAGE_EVENT = b"data: " + json.dumps({"choices": [], "usage": USAGE, "model": "m-served"}).encode()
DONE = b"data: [DONE]\n\n"


def sse_body(*pieces: str, usage: bool = True, done: bool = True) -> list[bytes]:
    """A complete stream: a role chunk, one chunk per piece, finish, usage, [DONE]."""
    events = [chunk(None, role="assistant")]
    events += [chunk(p) for p in pieces]
    events.append(chunk(None, "stop"))
    if usage:
        events.append(USAGE_EVENT + b"\n\n")
    if done:
        events.append(DONE)
    return events


def streamed(
    events: Iterable[bytes], *, delay: float = 0.0, fail: Exception | None = None
) -> httpx.Response:
    """An SSE response whose body arrives event by event (and may then break)."""

    async def body() -> AsyncIterator[bytes]:
        for event in events:
            if delay:
                await asyncio.sleep(delay)
            yield event
        if fail is not None:
            raise fail

    return httpx.Response(200, headers=SSE, content=body())


def completion_body(text: str = "whole answer") -> dict[str, Any]:
    return {
        "model": "m-served",
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
    }


class Script:
    """Answers each request with the next factory's response; records the JSON payloads."""

    def __init__(self, *factories: Callable[[], httpx.Response]) -> None:
        self.factories = factories
        self.payloads: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.payloads.append(json.loads(request.content))
        index = min(len(self.payloads), len(self.factories)) - 1
        return self.factories[index]()


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


def make(handler: Handler, **kwargs: Any) -> tuple[Upstream, Sleeps]:
    sleeps = Sleeps()
    upstream = Upstream(
        BASE,
        transport=httpx.MockTransport(handler),
        rng=random.Random(3),
        sleep=sleeps,
        **kwargs,
    )
    return upstream, sleeps


async def stream(upstream: Upstream, deadline: float | None = None) -> tuple[Completion, list[str]]:
    pieces: list[str] = []
    result = await upstream.chat_stream(
        model="m", messages=MESSAGES, max_tokens=50, deadline=deadline, on_text=pieces.append
    )
    return result, pieces


# -- the happy path -----------------------------------------------------------------------------


async def test_stream_delivers_each_delta_and_the_full_completion() -> None:
    script = Script(lambda: streamed(sse_body("Hel", "lo, ", "world")))
    upstream, _ = make(script)
    async with upstream:
        result, pieces = await stream(upstream)
    assert pieces == ["Hel", "lo, ", "world"]
    assert result == Completion("Hello, world", 40, 4, "stop", "m-served", cached_tokens=32)
    payload = script.payloads[0]
    assert payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert (payload["model"], payload["max_tokens"]) == ("m", 50)
    assert upstream.streams is True
    assert upstream.calls == 1


async def test_events_split_anywhere_and_keepalives_are_read() -> None:
    raw = b": keep-alive\r\n\r\n" + b"".join(sse_body("one ", "two"))
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]  # cut mid-line, mid-JSON
    upstream, _ = make(Script(lambda: streamed(pieces)))
    async with upstream:
        result, delivered = await stream(upstream)
    assert result.text == "one two" and "".join(delivered) == "one two"


async def test_stream_without_usage_or_done_counts_zero_tokens() -> None:
    upstream, _ = make(Script(lambda: streamed(sse_body("hi", usage=False, done=False))))
    async with upstream:
        result, _ = await stream(upstream)
    assert (result.text, result.finish_reason) == ("hi", "stop")
    assert (result.prompt_tokens, result.completion_tokens, result.cached_tokens) == (0, 0, 0)
    assert result.model == "m-served"


async def test_stream_success_grows_the_limit_back() -> None:
    upstream, _ = make(Script(lambda: streamed(sse_body("x"))), concurrency=4)
    upstream._limit.limit = 2.0
    async with upstream:
        await stream(upstream)
    assert upstream.limit == 2.5


# -- failures before and after the first text ---------------------------------------------------


async def test_failures_before_any_text_are_retried() -> None:
    script = Script(
        lambda: httpx.Response(429, json={"error": {"message": "busy"}}),
        lambda: streamed([chunk(None, role="assistant")], fail=httpx.RemoteProtocolError("cut")),
        lambda: streamed([chunk(None, role="assistant")]),  # ended early, no text
        lambda: streamed([b'data: {"error": {"message": "overloaded"}}\n\n']),
        lambda: streamed(sse_body("fine")),
    )
    upstream, sleeps = make(script)
    async with upstream:
        result, pieces = await stream(upstream, deadline=time.monotonic() + 30)
    assert (result.text, pieces) == ("fine", ["fine"])
    assert len(script.payloads) == 5 and len(sleeps.delays) == 4
    assert all(p["stream"] is True for p in script.payloads)


@pytest.mark.parametrize(
    "tail",
    [
        {"fail": httpx.RemoteProtocolError("peer closed connection")},
        {"fail": httpx.ReadTimeout("slow")},
        {},  # the body just ends: no finish_reason, no [DONE]
        {"extra": b'data: {"error": {"message": "server_error", "code": "oops"}}\n\n'},
        {"extra": b"data: {not json\n\n"},
    ],
)
async def test_stream_broken_after_text_raises_with_partial_text(tail: dict[str, Any]) -> None:
    events = [chunk(None, role="assistant"), chunk("A1: the first "), chunk("answer")]
    if "extra" in tail:
        events.append(tail["extra"])
    script = Script(lambda: streamed(events, fail=tail.get("fail")))
    upstream, sleeps = make(script)
    async with upstream:
        with pytest.raises(UpstreamStreamBroken) as info:
            await stream(upstream, deadline=time.monotonic() + 30)
    assert info.value.partial_text == "A1: the first answer"
    assert "first answer" not in str(info.value)
    assert "20 characters" in str(info.value)
    assert len(script.payloads) == 1 and sleeps.delays == []  # not retried: text was out


async def test_malformed_stream_before_text_ends_as_bad_response() -> None:
    script = Script(lambda: streamed([b"data: [1, 2]\n\n"]))
    upstream, _ = make(script, retry=RetryPolicy(attempts=3))
    async with upstream:
        with pytest.raises(UpstreamBadResponse, match="on 3 attempts"):
            await stream(upstream)


async def test_on_text_errors_propagate_without_retry() -> None:
    script = Script(lambda: streamed(sse_body("a", "b")))
    upstream, _ = make(script)

    def explode(text: str) -> None:
        raise KeyError("caller bug")

    async with upstream:
        with pytest.raises(KeyError):
            await upstream.chat_stream(model="m", messages=MESSAGES, deadline=None, on_text=explode)
    assert len(script.payloads) == 1
    assert upstream.in_flight == 0


# -- deadlines ----------------------------------------------------------------------------------


async def test_trickling_stream_is_cut_by_the_deadline() -> None:
    endless = [chunk(None, role="assistant")] + [chunk("drip ") for _ in range(1000)]
    upstream, _ = make(Script(lambda: streamed(endless, delay=0.02)), timeout_s=30)
    started = time.monotonic()
    async with upstream:
        with pytest.raises(UpstreamStreamBroken, match="deadline") as info:
            await stream(upstream, deadline=started + 0.3)
    assert time.monotonic() - started < 0.6
    assert info.value.partial_text.startswith("drip drip ")


async def test_silent_stream_past_the_deadline_is_a_timeout() -> None:
    silent = [b": keep-alive\n\n"] * 1000
    upstream, _ = make(Script(lambda: streamed(silent, delay=0.02)))
    started = time.monotonic()
    async with upstream:
        with pytest.raises(UpstreamTimeout, match="deadline passed during attempt 1"):
            await stream(upstream, deadline=started + 0.2)
    assert time.monotonic() - started < 0.5


# -- servers that do not stream -----------------------------------------------------------------


async def test_server_ignoring_stream_is_read_as_json_and_remembered() -> None:
    script = Script(lambda: httpx.Response(200, json=completion_body("whole answer")))
    upstream, _ = make(script)
    async with upstream:
        first, pieces = await stream(upstream)
        assert upstream.streams is False
        second, again = await stream(upstream)
    assert (first.text, pieces) == ("whole answer", ["whole answer"])
    assert (second.text, again) == ("whole answer", ["whole answer"])
    assert script.payloads[0]["stream"] is True
    assert "stream" not in script.payloads[1]  # not asked again
    assert (first.prompt_tokens, first.completion_tokens) == (9, 2)


async def test_server_refusing_stream_is_asked_once_without_it_and_remembered() -> None:
    refused = {"error": {"message": "stream is not supported", "code": "unsupported"}}

    def handler(request: httpx.Request) -> httpx.Response:
        script.payloads.append(json.loads(request.content))
        if script.payloads[-1].get("stream"):
            return httpx.Response(400, json=refused)
        return httpx.Response(200, json=completion_body("plain"))

    script = Script()
    upstream, _ = make(handler)
    async with upstream:
        first, pieces = await stream(upstream)
        second, _ = await stream(upstream)
    assert (first.text, pieces, second.text) == ("plain", ["plain"], "plain")
    assert upstream.streams is False
    assert [p.get("stream", False) for p in script.payloads] == [True, False, False]


async def test_refused_both_ways_is_the_content_and_streaming_stays_on() -> None:
    body = {"error": {"message": "filtered", "code": "content_filter"}}
    script = Script(lambda: httpx.Response(400, json=body))
    upstream, _ = make(script)
    async with upstream:
        with pytest.raises(UpstreamRejected) as info:
            await stream(upstream)
    assert (info.value.status_code, info.value.code) == (400, "content_filter")
    assert len(script.payloads) == 2 and "stream" not in script.payloads[1]
    assert upstream.streams is True


async def test_once_streaming_worked_a_400_is_raised_at_once() -> None:
    body = {"error": {"message": "filtered", "code": "content_filter"}}
    script = Script(lambda: streamed(sse_body("ok")), lambda: httpx.Response(400, json=body))
    upstream, _ = make(script)
    async with upstream:
        await stream(upstream)
        with pytest.raises(UpstreamRejected, match="content_filter"):
            await stream(upstream)
    assert len(script.payloads) == 2


async def test_413_on_a_stream_is_not_retried_without_stream() -> None:
    script = Script(lambda: httpx.Response(413, json={"error": {"message": "too long"}}))
    upstream, _ = make(script)
    async with upstream:
        with pytest.raises(UpstreamRejected):
            await stream(upstream)
    assert len(script.payloads) == 1 and upstream.streams is True


async def test_api_key_not_in_stream_errors() -> None:
    leak = f'data: {{"error": {{"message": "bad key {KEY}"}}}}\n\n'.encode()
    script = Script(lambda: streamed([chunk("x"), leak]))
    upstream, _ = make(script, api_key=KEY)
    async with upstream:
        with pytest.raises(UpstreamStreamBroken) as info:
            await stream(upstream)
    assert KEY not in str(info.value) and KEY not in repr(info.value)


# -- the byte-level SSE parser -----------------------------------------------------------------


def _parse_in_pieces(body: bytes, cuts: Iterable[int]) -> list[tuple[str, str]]:
    from worker.upstream.responses import SseParser

    parser = SseParser()
    events: list[tuple[str, str]] = []
    start = 0
    for cut in [*sorted(cuts), len(body)]:
        events += parser.feed(body[start:cut])
        start = cut
    return events + parser.close()


SSE_BODY = (
    ": keep-alive\r\n\r\n"
    'data: {"a": "é"}\r\n\r\n'
    "event: error\ndata: line one\ndata: line two\n\n"
    "id: 7\rdata: cr only\r\r"
    "data: [DONE]"  # the last event without its blank line
).encode()
SSE_EVENTS = [
    ("message", '{"a": "é"}'),
    ("error", "line one\nline two"),
    ("message", "cr only"),
    ("message", "[DONE]"),
]


def test_sse_parser_reads_every_line_ending_in_one_piece() -> None:
    assert _parse_in_pieces(SSE_BODY, []) == SSE_EVENTS


def test_sse_parser_gives_the_same_events_however_the_body_is_cut() -> None:
    # Network reads split lines, CRLF pairs and multi-byte characters anywhere.
    rng = random.Random(5)
    for _ in range(300):
        cuts = rng.sample(range(1, len(SSE_BODY)), rng.randint(1, 12))
        assert _parse_in_pieces(SSE_BODY, cuts) == SSE_EVENTS, cuts
