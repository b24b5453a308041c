"""``coalesce api`` end to end, tried as a new user would: the official ``openai`` package
pointed at a real server process, with a real Redis, a real worker and the fake upstream.

One stack serves the whole module (starting it is most of the cost); tests that count upstream
calls reset the fake's counters first and use their own tenant-free questions.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import redis
from openai import AsyncOpenAI, OpenAI

from worker.dev.bench.api import Sampler, start_api
from worker.dev.fakellm.answers import expected_answer
from worker.dev.procs import Proc, start_fake_llm, start_worker, wait_for_workers

pytestmark = pytest.mark.integration

KEY = "sk-e2e-key-000000000001"
MODEL = "gpt-4o-mini"
SYSTEM = "You are the shop's support assistant."


@dataclass
class Stack:
    api: Proc
    fake: Proc

    @property
    def base(self) -> str:
        return self.api.url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(self.fake.url.removesuffix("/v1") + "/stats", timeout=5).json())

    def reset(self) -> None:
        httpx.post(self.fake.url.removesuffix("/v1") + "/stats/reset", timeout=5)


@pytest.fixture(scope="module")
def stack(redis_server: Proc) -> Iterator[Stack]:
    url = redis_server.url
    redis.Redis.from_url(url).flushall()
    fake = start_fake_llm(latency_ms=100)
    env = {
        "COALESCE_REDIS_URL": url,
        "COALESCE_UPSTREAM_URL": fake.url,
        "COALESCE_WINDOW_MS": "200",
        "COALESCE_REQUEST_TIMEOUT_S": "40",
        "COALESCE_VISIBILITY_TIMEOUT_S": "50",
        "COALESCE_WORKER_CONCURRENCY": "256",
    }
    worker = start_worker(env, name="api-e2e", loglevel="WARNING")
    api: Proc | None = None
    try:
        wait_for_workers(url, 1, timeout=30)
        api_env = {**env, "COALESCE_API_KEYS": f"{KEY}=tenant-e2e", "COALESCE_API_TIMEOUT_S": "60"}
        api = start_api(api_env)
        yield Stack(api, fake)
    finally:
        for proc in (api, worker, fake):
            if proc is not None:
                proc.stop()


def question(i: int) -> str:
    return f"Where is my order number {1000 + i}, and when will it arrive?"


def sync_client(stack: Stack, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=stack.api.url, api_key=key, max_retries=0, timeout=60)


async def test_120_concurrent_sdk_calls_answered_right_in_few_upstream_calls(stack: Stack) -> None:
    stack.reset()
    async with AsyncOpenAI(base_url=stack.api.url, api_key=KEY, max_retries=0) as client:

        async def ask(i: int) -> tuple[str, Any]:
            messages: Any = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question(i % 100)},  # 20 repeats: dedup
            ]
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages
            )
            return raw.headers.get("x-coalesce-source", ""), raw.parse()

        results = await asyncio.gather(*(ask(i) for i in range(120)))
    for i, (_, reply) in enumerate(results):
        assert reply.choices[0].message.content == expected_answer(MODEL, SYSTEM, question(i % 100))
        assert reply.usage is not None
    sources = {source for source, _ in results}
    assert "batched" in sources and sources <= {"batched", "dedup", "single"}
    calls = stack.stats()["calls"]
    assert 0 < calls < 60, calls


def test_stream_true_works_for_batched_and_passthrough(stack: Stack) -> None:
    client = sync_client(stack)
    plain: Any = [{"role": "user", "content": question(500)}]
    pieces = list(
        client.chat.completions.create(
            model=MODEL, messages=plain, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert text == expected_answer(MODEL, None, question(500))
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens > 0
    talk: Any = [
        {"role": "user", "content": "Hi, I need help."},
        {"role": "assistant", "content": "Of course. What happened?"},
        {"role": "user", "content": question(501)},
    ]
    stream = client.chat.completions.create(model=MODEL, messages=talk, stream=True)
    chunks = list(stream)
    assert len(chunks) > 3  # the upstream's own chunks, relayed
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_answer(MODEL, None, question(501))


def test_multi_turn_is_answered_from_its_last_turn(stack: Stack) -> None:
    talk: Any = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question(600)},
        {"role": "assistant", "content": "Let me check that for you."},
        {"role": "user", "content": question(601)},
    ]
    raw = sync_client(stack).chat.completions.with_raw_response.create(model=MODEL, messages=talk)
    reply = raw.parse()
    assert reply.choices[0].message.content == expected_answer(MODEL, SYSTEM, question(601))
    assert raw.headers["x-coalesce-source"] in ("passthrough", "dedup")


def test_cache_controls_over_http(stack: Stack) -> None:
    client = sync_client(stack)
    body: Any = [{"role": "user", "content": question(700)}]

    def source(**options: Any) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=body, temperature=0, **options
        )
        assert raw.parse().choices[0].message.content == expected_answer(MODEL, None, question(700))
        return str(raw.headers["x-coalesce-source"])

    assert source() in ("batched", "single")
    assert source() == "cache"
    assert source(extra_headers={"x-coalesce-cache": "no_cache"}) != "cache"
    assert source(extra_headers={"cache-control": "no-cache"}) != "cache"
    faq = {"coalesce": {"cache": {"namespace": "faq", "ttl": 600}}}
    assert source(extra_body=faq) != "cache"
    assert source(extra_body=faq) == "cache"
    assert source(extra_headers={"x-coalesce-cache-namespace": "faq"}) == "cache"
    sampled: Any = [{"role": "user", "content": question(701)}]
    for _ in range(2):  # temperature 1 (the default): never cached unless asked
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=sampled)
        assert raw.headers["x-coalesce-source"] != "cache"
    with pytest.raises(openai.BadRequestError, match="x-coalesce-cache"):
        client.chat.completions.create(
            model=MODEL, messages=body, extra_headers={"x-coalesce-cache": "forever"}
        )


def test_tools_return_the_models_tool_calls(stack: Stack) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "track_order",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
            },
        }
    ]
    messages: Any = [{"role": "user", "content": question(700)}]
    reply = sync_client(stack).chat.completions.create(model=MODEL, messages=messages, tools=tools)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.tool_calls[0].type == "function"
    call = choice.message.tool_calls[0].function
    assert call.name == "track_order"
    assert json.loads(call.arguments) == {"query": question(700)}


async def test_400_concurrent_calls_with_few_threads(stack: Stack) -> None:
    async with AsyncOpenAI(base_url=stack.api.url, api_key=KEY, max_retries=0) as client:

        async def ask(i: int) -> str:
            messages: Any = [{"role": "user", "content": question(2000 + i)}]
            reply = await client.chat.completions.create(model=MODEL, messages=messages)
            return reply.choices[0].message.content or ""

        with Sampler(stack.api.pid) as sampled:
            answers = await asyncio.gather(*(ask(i) for i in range(400)))
    for i, answer in enumerate(answers):
        assert answer == expected_answer(MODEL, None, question(2000 + i))
    assert 0 < sampled.max_threads < 64, sampled.max_threads


def test_plain_json_with_curl(stack: Stack) -> None:
    """The README's curl example, run with the real curl binary (headers included)."""
    curl = shutil.which("curl")
    assert curl, "curl is part of the machine's base system"
    body = {"model": MODEL, "messages": [{"role": "user", "content": question(800)}]}
    done = subprocess.run(
        [
            curl, "-sS", "-i", "--max-time", "60", stack.api.url + "/chat/completions",
            "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json",
            "-d", json.dumps(body),
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    head, _, payload = done.stdout.replace("\r\n", "\n").partition("\n\n")
    status, *header_lines = head.splitlines()
    headers = {line.split(":", 1)[0].lower() for line in header_lines}
    assert " 200" in status, done.stdout
    data = json.loads(payload)
    assert data["choices"][0]["message"]["content"] == expected_answer(MODEL, None, question(800))
    assert data["usage"]["total_tokens"] > 0
    assert {"x-request-id", "x-coalesce-source", "x-coalesce-batch-size"} <= headers
    assert "x-coalesce-cost-usd" in headers


def test_errors_wrong_key_big_body_and_malformed_body(stack: Stack) -> None:
    messages: Any = [{"role": "user", "content": "hello"}]
    with pytest.raises(openai.AuthenticationError):
        sync_client(stack, key="sk-wrong").chat.completions.create(model=MODEL, messages=messages)
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 6_000_000}]}
    reply = httpx.post(
        stack.api.url + "/chat/completions",
        json=big,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert reply.status_code == 413
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as caught:
        bad: Any = [{"role": "user", "content": "hi", "name": 5}]
        sync_client(stack).chat.completions.create(model=MODEL, messages=bad)
    assert caught.value.status_code == 400
    assert caught.value.body and "messages[0].name" in str(caught.value.body)


def test_models_and_readiness(stack: Stack) -> None:
    models = sync_client(stack).models.list()
    assert MODEL in [m.id for m in models.data]
    ready = httpx.get(stack.base + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["workers"] is True
