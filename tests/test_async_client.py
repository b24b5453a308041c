"""AsyncClient against real parts: many waiting requests on one listener, outages, streams."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from celery import states
from conftest import fast_settings
from test_producer import ANSWER, BASE, MODEL, RestartableRedis, own_redis, store

from producer import (
    AsyncClient,
    BrokerUnavailable,
    Client,
    InvalidRequest,
    RequestFailed,
    RequestTimeout,
    UpstreamStatusError,
    load_settings,
)
from producer._client import classify, describe, send_request
from producer._relay import CHUNK_TTL_S, chunk_key, encode_chunk, encode_done
from worker.dev.fakellm import expected_answer
from worker.dev.procs import Proc

pytestmark = pytest.mark.integration

__all__ = ["own_redis"]  # the fixture, imported so these tests can restart their own Redis

SYSTEM = "You answer questions about parcels. Be brief."


def async_client(url: str, **overrides: object) -> AsyncClient:
    return AsyncClient(settings=load_settings(redis_url=url, **{**fast_settings(), **overrides}))


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[AsyncClient]:
    async with async_client(redis_url) as c:
        yield c


async def test_400_concurrent_requests_wait_on_few_threads(
    fake_llm: Callable[..., Proc],
    worker_env: Callable[..., dict[str, str]],
    workers: Callable[..., Proc],
    client: AsyncClient,
) -> None:
    fake = fake_llm(latency_ms=300)
    workers(worker_env(fake.url))
    prompts = [f"customer {n}: when does parcel {7000 + n} arrive?" for n in range(400)]
    tickets = await asyncio.gather(
        *(client.submit(p, model=MODEL, system=SYSTEM, tenant="t1") for p in prompts)
    )
    assert len({t.id for t in tickets}) == 400
    threads: list[int] = []

    async def sample() -> None:
        while True:
            threads.append(threading.active_count())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        answers = await asyncio.gather(*(t.get(timeout=60) for t in tickets))
    finally:
        sampler.cancel()
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer.text == expected_answer(MODEL, SYSTEM, prompt)
    assert {a.source for a in answers} <= {"batched", "single"}
    assert len(threads) > 5 and max(threads) < 64, max(threads)
    assert max(threads) <= 10  # the test's thread and 4 publishing ones: nothing per request


async def test_timeout_then_answer_then_failure(client: AsyncClient, redis_url: str) -> None:
    ticket = await client.submit(BASE["prompt"], model=MODEL)
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=rf"^no answer for request {ticket.id} within 0.3 s$"):
        await ticket.get(timeout=0.3)
    assert 0.28 <= time.monotonic() - started < 0.8
    assert not await ticket.ready()
    waiting = asyncio.create_task(ticket.get(timeout=5))
    await asyncio.sleep(0.2)
    await asyncio.to_thread(store, redis_url, ticket.id, ANSWER.model_dump(), states.SUCCESS)
    assert await waiting == ANSWER
    assert await ticket.ready() and await client.ticket(ticket.id).get(timeout=1) == ANSWER

    failed = await client.submit(BASE["prompt"], model=MODEL)
    error = UpstreamStatusError("upstream returned 500 after 5 attempts", 500)
    await asyncio.to_thread(store, redis_url, failed.id, error, states.FAILURE)
    with pytest.raises(RequestFailed) as info:
        await failed.get(timeout=5)  # stored before the wait began: read, not heard
    assert not isinstance(info.value, RequestTimeout)
    reason = "UpstreamStatusError: upstream returned 500 after 5 attempts"
    assert str(info.value) == f"request {failed.id} failed: {reason}"


async def test_get_rides_out_a_redis_restart(own_redis: RestartableRedis) -> None:
    async with async_client(own_redis.url) as client:
        tickets = [await client.submit(f"{BASE['prompt']} {n}", model=MODEL) for n in range(3)]
        waits = [asyncio.create_task(t.get(timeout=15)) for t in tickets]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_redis.stop)
        await asyncio.sleep(1.0)
        assert not any(w.done() for w in waits)
        await asyncio.to_thread(own_redis.start)
        # One stored straight away (found by the read after reconnecting), one once the listener
        # is subscribed again (heard at once); the third waits on while Redis is down again.
        await asyncio.to_thread(store, own_redis.url, tickets[0].id, ANSWER.model_dump(), "SUCCESS")
        await asyncio.sleep(1.2)
        written = time.monotonic()
        await asyncio.to_thread(store, own_redis.url, tickets[1].id, ANSWER.model_dump(), "SUCCESS")
        assert await asyncio.wait_for(waits[1], 2) == ANSWER
        assert time.monotonic() - written < 0.5
        assert await asyncio.wait_for(waits[0], 1) == ANSWER
        await asyncio.to_thread(own_redis.stop)
        with pytest.raises(RequestTimeout, match=r"within 1.0 s \(Redis at .* unavailable: Conn"):
            await client.ticket(tickets[2].id).get(timeout=1.0)
        with pytest.raises(BrokerUnavailable, match="Connection refused"):
            await tickets[2].ready()
        assert not waits[2].done()
        waits[2].cancel()


async def test_submit_gives_up_after_its_budget(own_redis: RestartableRedis) -> None:
    url = own_redis.url.replace("redis://", "redis://:hunter22@")
    own_redis.stop()
    async with async_client(url, submit_retry_s=0.5) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=r"unavailable for 0\.[5-9] s") as info:
            await client.submit("hello", model=MODEL)
        assert time.monotonic() - started < 1.5
        assert "hunter22" not in str(info.value)


def relay(url: str, task_id: str, items: list[str]) -> None:
    """What a worker relaying a stream does with each item: append to the list, publish it."""
    r = redis.Redis.from_url(url)
    for raw in items:
        pipe = r.pipeline()
        pipe.rpush(chunk_key(task_id), raw)
        pipe.expire(chunk_key(task_id), CHUNK_TTL_S)
        pipe.publish(chunk_key(task_id), raw)
        pipe.execute()
    r.close()


def chunk(n: int) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": f"{n}"}}],
    }


async def test_chunks_catch_up_then_follow_in_order(client: AsyncClient, redis_url: str) -> None:
    ticket = await client.submit(BASE["prompt"], model=MODEL)
    items = [encode_chunk(n, chunk(n)) for n in range(6)] + [encode_done(6)]
    relay(redis_url, ticket.id, items[:3])  # before the reader starts: caught up from the list
    seen: list[dict[str, Any]] = []
    seen_later: list[dict[str, Any]] = []

    async def read(into: list[dict[str, Any]]) -> None:
        async for c in ticket.chunks(timeout=10):
            into.append(c)

    reader = asyncio.create_task(read(seen))
    await asyncio.sleep(0.3)
    assert seen == [chunk(n) for n in range(3)]
    # A second reader of a channel already subscribed catches up at once, not at the next tick.
    second = asyncio.create_task(read(seen_later))
    await asyncio.sleep(0.3)
    assert seen_later == [chunk(n) for n in range(3)]
    for raw in items[3:]:
        relay(redis_url, ticket.id, [raw])
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(reader, second), 2)  # ends at the done marker
    assert seen == seen_later == [chunk(n) for n in range(6)]


async def test_chunks_of_a_request_without_a_stream_end_with_its_result(
    client: AsyncClient, redis_url: str
) -> None:
    ticket = await client.submit(BASE["prompt"], model=MODEL)
    reader = asyncio.create_task(_collect(ticket.chunks(timeout=10)))
    await asyncio.sleep(0.2)
    await asyncio.to_thread(store, redis_url, ticket.id, ANSWER.model_dump(), states.SUCCESS)
    assert await asyncio.wait_for(reader, 2) == []
    assert await ticket.get(timeout=1) == ANSWER
    with pytest.raises(RequestTimeout, match="no end of stream"):
        await _collect(client.ticket("never-sent").chunks(timeout=0.3))


async def _collect(chunks: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c async for c in chunks]


def conversation(last: str) -> list[dict[str, Any]]:
    """Two turns: not batchable, so it passes through as its own (streamed) call."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "my parcel 12 is late"},
        {"role": "assistant", "content": "Sorry to hear that."},
        {"role": "user", "content": last},
    ]


async def test_a_passthrough_stream_yields_its_chunks_in_order(
    fake_llm: Callable[..., Proc],
    worker_env: Callable[..., dict[str, str]],
    workers: Callable[..., Proc],
    client: AsyncClient,
    redis_url: str,
) -> None:
    fake = fake_llm(latency_per_token_ms=3)
    workers(worker_env(fake.url))
    last = "and when does parcel 99 arrive?"
    ticket = await client.chat(
        conversation(last), model=MODEL, stream=True, temperature=0.3, cache="sampled"
    )
    chunks = await asyncio.wait_for(_collect(ticket.chunks(timeout=30)), 30)
    answer = await ticket.get(timeout=5)
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )
    assert len(chunks) > 3 and text == answer.text == expected_answer(MODEL, SYSTEM, last)
    assert answer.source == "passthrough" and answer.finish_reason == "stop"
    stored = redis.Redis.from_url(redis_url).lrange(chunk_key(ticket.id), 0, -1)
    assert [c for c in map(_relay_chunk, stored) if c is not None] == chunks  # all, in order

    # An identical request later is a cache hit (opted in, as its temperature is above 0):
    # no stream of its own, the answer.
    again = await client.chat(
        conversation(last), model=MODEL, stream=True, temperature=0.3, cache="sampled"
    )
    assert await _collect(again.chunks(timeout=10)) == []
    hit = await again.get(timeout=5)
    assert hit.text == answer.text and hit.source == "cache"


def _relay_chunk(raw: bytes | str) -> dict[str, Any] | None:
    chunk: dict[str, Any] | None = json.loads(raw).get("chunk")
    return chunk


async def test_sync_client_chat_shares_the_core(
    fake_llm: Callable[..., Proc],
    worker_env: Callable[..., dict[str, str]],
    workers: Callable[..., Proc],
    redis_url: str,
) -> None:
    fake = fake_llm()
    workers(worker_env(fake.url))
    question = "where is parcel 5?"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    with Client(settings=load_settings(redis_url=redis_url, **fast_settings())) as sync:
        batched = await asyncio.to_thread(sync.chat, messages, model=MODEL, temperature=0)
        passthrough = await asyncio.to_thread(
            sync.chat, conversation(question), model=MODEL, tenant="t2"
        )
        answers = [await asyncio.to_thread(t.get, 30) for t in (batched, passthrough)]
        with pytest.raises(InvalidRequest, match=r"messages\[0\]\.role"):
            sync.chat([{"role": "robot", "content": "hi"}], model=MODEL)
    assert [a.text for a in answers] == [expected_answer(MODEL, SYSTEM, question)] * 2
    assert answers[0].source in ("batched", "single") and answers[1].source == "passthrough"


class _Recorder:
    """Stands in for a Celery app: records what ``send_request`` would publish."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append({"name": name, **options})


def test_published_tasks_show_sizes_not_text() -> None:
    app, settings = _Recorder(), load_settings()
    chat_payload = {"messages": [{"role": "user", "content": "PRIVATE"}] * 3, "model": MODEL}
    send_request(app, settings, chat_payload, task_id="t1")
    send_request(app, settings, {"prompt": "PRIVATE", "model": MODEL}, task_id="t2", resent=True)
    assert [s["argsrepr"] for s in app.sent] == [
        f"(<3 messages, model={MODEL}>)",
        f"(<7 chars, model={MODEL}>)",
    ]
    assert app.sent[1]["kwargs"] == {"resent": True} and app.sent[1]["task_id"] == "t2"


def test_an_asyncio_refused_connect_is_described_plainly() -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    try:
        raise redis.ConnectionError("Error connecting") from refused
    except redis.ConnectionError as exc:
        found = classify(exc)
    assert found is not None and found[0] is True
    assert describe(found[1], "redis://h:1/0") == "ConnectionError: Connection refused"


class SlowlyRefused(AsyncClient):
    """Each publish attempt hangs 0.4 s and fails, like a host that drops packets."""

    def _publish(self, task_id: str, payload: dict[str, Any]) -> object:
        time.sleep(0.4)
        raise redis.ConnectionError("Timeout connecting to server")


async def test_submits_queued_behind_slow_attempts_give_up_on_time(redis_url: str) -> None:
    async with SlowlyRefused(settings=load_settings(redis_url=redis_url, submit_retry_s=1.0)) as c:
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(c.submit(f"q{n}", model=MODEL) for n in range(32)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
    assert all(isinstance(o, BrokerUnavailable) for o in outcomes), outcomes
    # 32 submissions share 4 publishing threads; none waits for its turn past its budget.
    assert elapsed < 3.0, elapsed
