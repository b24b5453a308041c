"""Tests for worker.dev.fakellm's reply shapes: streams (in-process and over a real socket, with
the CLI's knobs) and the noisy batched layouts, which must hold every answer exactly."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest
from test_fakellm import (
    ENC,
    FILTERED,
    MODEL,
    QUESTIONS,
    SYSTEM,
    canonical,
    chat,
    content_of,
    expected,
    fake,
)

from worker.batching.prompt import build_batch_messages, build_single_messages, parse_answers
from worker.dev.fakellm import LAYOUTS, ONE_LINE_LAYOUTS, expected_answer, token_pieces
from worker.dev.procs import start_fake_llm

# --- streaming ----------------------------------------------------------------------------------


def sse_payloads(text: str) -> list[str]:
    """The data of each server-sent event, in order; every event is one `data:` line."""
    assert text.endswith("\n\n"), text[-80:]
    blocks = text[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), blocks
    return [block.removeprefix("data: ") for block in blocks]


def stream_chunks(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON chunks of a finished stream, checking it ends with exactly one [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    return [json.loads(payload) for payload in payloads[:-1]]


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_chunks_follow_openai_format(include_usage: bool) -> None:
    messages = build_batch_messages(QUESTIONS, system=SYSTEM)
    async with fake() as client:
        plain = (await chat(client, messages)).json()
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = stream_chunks(await chat(client, messages, stream=True, **options))
        stats = (await client.get("/stats")).json()
    assert streamed_text(chunks) == canonical(expected(QUESTIONS)) == content_of_body(plain)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {MODEL}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    body = [c for c in chunks if c["choices"]]
    assert all(c["choices"][0]["index"] == 0 for c in body)
    assert [c["choices"][0]["finish_reason"] for c in body] == [None] * (len(body) - 1) + ["stop"]
    assert body[-1]["choices"][0]["delta"] == {}
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert chunks[-1] is body[-1] and all("usage" not in c for c in chunks)
    assert stats["calls"] == 2 and stats["streamed_calls"] == 1 and stats["batched_calls"] == 2
    assert stats["completion_tokens"] == 2 * plain["usage"]["completion_tokens"]


def content_of_body(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


async def test_stream_sends_a_chunk_per_token_or_a_few_large_ones() -> None:
    messages = build_batch_messages(QUESTIONS, system=SYSTEM)
    async with fake(latency_per_token_ms=0.01) as per_token:
        slow = stream_chunks(await chat(per_token, messages, stream=True))
    async with fake() as instant:
        fast = stream_chunks(await chat(instant, messages, stream=True))
    tokens = len(ENC.encode(canonical(expected(QUESTIONS))))
    content = [c for c in slow if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == tokens > 100
    assert [c["choices"][0]["delta"]["content"] for c in content] == token_pieces(
        canonical(expected(QUESTIONS))
    )
    big = [c for c in fast if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert 1 < len(big) <= 4
    assert streamed_text(fast) == streamed_text(slow)


async def test_stream_max_tokens_truncates_with_finish_reason_length() -> None:
    full = expected_answer(MODEL, None, "long one")
    messages = build_single_messages("long one", system=None)
    async with fake(latency_per_token_ms=0.01) as client:
        response = await chat(
            client, messages, stream=True, max_tokens=3, stream_options={"include_usage": True}
        )
    chunks = stream_chunks(response)
    assert streamed_text(chunks) == ENC.decode(ENC.encode(full)[:3])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_token_pieces_keep_characters_whole() -> None:
    text = "naïve café — 日本語 😀 done"
    pieces = token_pieces(text)
    assert "".join(pieces) == text and len(pieces) == len(ENC.encode(text))
    for limit in range(1, len(pieces)):
        assert "".join(token_pieces(text, limit)) == ENC.decode(ENC.encode(text)[:limit])


async def test_stream_mode_ignore_answers_plain_json_and_reject_refuses() -> None:
    messages = build_single_messages("stream me", system=None)
    answer = expected_answer(MODEL, None, "stream me")
    async with fake(stream_mode="ignore") as client:
        ignored = await chat(client, messages, stream=True, stream_options={"include_usage": True})
        stats = (await client.get("/stats")).json()
        await client.post("/config", json={"stream_mode": "reject"})
        rejected = await chat(client, messages, stream=True)
        plain = await chat(client, messages)
        await client.post("/config", json={"stream_mode": "on"})
        streamed = await chat(client, messages, stream=True)
    assert ignored.headers["content-type"] == "application/json"
    assert ignored.json()["object"] == "chat.completion" and content_of(ignored) == answer
    assert stats["calls"] == 1 and stats["streamed_calls"] == 0
    assert rejected.status_code == 400
    assert rejected.json()["error"]["type"] == "invalid_request_error"
    assert rejected.json()["error"]["message"] == "stream is not supported"
    assert content_of(plain) == answer
    assert streamed_text(stream_chunks(streamed)) == answer


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": "yes"},
        {"stream_options": {"include_usage": True}},
        {"stream": True, "stream_options": 1},
    ],
)
async def test_bad_stream_parameters_give_400(extra: dict[str, Any]) -> None:
    async with fake() as client:
        response = await chat(client, build_single_messages("x", system=None), **extra)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_broken_streams_and_errors_when_streaming() -> None:
    kinds = set()
    async with fake(malformed_rate=1.0, seed=2, latency_per_token_ms=0.01) as client:
        for i in range(12):
            response = await chat(client, build_single_messages(f"q{i}", system=None), stream=True)
            payloads = sse_payloads(response.text)
            if payloads == ['{"oops":true}', "[DONE]"]:
                kinds.add("oops")
                continue
            assert "[DONE]" not in payloads
            chunks = [json.loads(p) for p in payloads]
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
            assert expected_answer(MODEL, None, f"q{i}").startswith(streamed_text(chunks))
            kinds.add("truncated")
        stats = (await client.get("/stats")).json()
        await client.post("/config", json={"malformed_rate": 0, "error_rate": 1})
        failed = await chat(client, build_single_messages("boom", system=None), stream=True)
    assert kinds == {"oops", "truncated"}
    assert stats["malformed"] == 12 and stats["calls"] == 0 and stats["in_flight"] == 0
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"


# --- reply layouts ------------------------------------------------------------------------------


def one_line_questions(count: int) -> list[str]:
    """Questions whose answers (under SYSTEM) are all one line, so every layout may be used."""
    candidates = (f"What should I know about topic {i}?" for i in range(1000))
    found = [q for q in candidates if "\n" not in expected_answer(MODEL, SYSTEM, q)]
    return found[:count]


def test_one_line_answers_cannot_be_misread() -> None:
    answers = [expected_answer(MODEL, None, f"probe {i}") for i in range(3000)]
    single = [a for a in answers if "\n" not in a]
    assert len(single) > 2000
    for answer in single:
        assert not set(answer) & set(':*"\\{}[]#`'), answer
        assert not re.search(r"\s\d", answer), answer
        assert re.fullmatch(r"ans-[0-9a-f]{10}( [A-Za-z]+,?)+\.", answer), answer


async def layout_samples(layout: str, questions: list[str], calls: int = 12) -> list[str]:
    async with fake(noise=1.0, layouts=layout, seed=11) as client:
        replies = [
            content_of(await chat(client, build_batch_messages(questions, system=SYSTEM)))
            for _ in range(calls)
        ]
        stats = (await client.get("/stats")).json()
    assert stats["layouts"] == {layout: calls}
    return replies


def check_layout(layout: str, reply: str, questions: list[str], answers: list[str]) -> None:
    """``reply`` is in ``layout`` and holds every answer exactly."""
    lines = reply.split("\n")
    if layout in ("inline", "bold_inline"):
        label = "**A{n}:** " if layout == "bold_inline" else "A{n}: "
        [row] = [line for line in lines if "ans-" in line]
        for n, answer in enumerate(answers, start=1):
            assert label.format(n=n) + answer in row, (layout, reply)
        assert (layout == "bold_inline") == ("**" in row)
    elif layout == "restated":
        for n, (question, answer) in enumerate(zip(questions, answers, strict=True), start=1):
            assert f"Q{n}: {question} A{n}: {answer}" in lines, reply
    else:
        assert layout == "json"
        body = reply[reply.index("{") : reply.rindex("}") + 1]
        assert json.loads(body) == {f"A{n}": a for n, a in enumerate(answers, start=1)}


@pytest.mark.parametrize("layout", ONE_LINE_LAYOUTS)
async def test_one_line_layouts_keep_every_answer_exactly(layout: str) -> None:
    questions = one_line_questions(5)
    replies = await layout_samples(layout, questions)
    for reply in replies:
        check_layout(layout, reply, questions, expected(questions))
    if layout == "json":
        assert any(reply.startswith("{") for reply in replies)
        assert any("```json\n{" in reply for reply in replies)
        assert any('\n  "A1": ' in reply for reply in replies)  # pretty-printed too


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_every_layout_round_trips_through_parse_answers(layout: str) -> None:
    """The worker's parser reads every layout the fake writes back to the right slots."""
    questions = one_line_questions(5)
    for reply in await layout_samples(layout, questions):
        assert parse_answers(reply, len(questions)) == expected(questions), reply


async def test_one_line_layouts_are_not_used_where_they_could_be_misread() -> None:
    candidates = [f"What should I know about topic {i}?" for i in range(1000)]
    multi = next(q for q in candidates if "\n" in expected_answer(MODEL, SYSTEM, q))
    labelish = next(
        q
        for q in (f"Is plan Q{i} better than plan A{i}?" for i in range(1000))
        if "\n" not in expected_answer(MODEL, SYSTEM, q)
    )
    one_line = one_line_questions(3)
    async with fake(noise=1.0, layouts=",".join(ONE_LINE_LAYOUTS), seed=4) as client:
        with_multi = [
            content_of(await chat(client, build_batch_messages([*one_line, multi], system=SYSTEM)))
            for _ in range(8)
        ]
        await client.post("/config", json={"layouts": "restated"})
        with_labelish = [
            content_of(
                await chat(client, build_batch_messages([labelish, *one_line], system=SYSTEM))
            )
            for _ in range(8)
        ]
    for reply in with_multi:  # a line layout: one answer per line, nothing inline or JSON
        assert "{" not in reply and "Q1: " not in reply
        assert sum("ans-" in line for line in reply.split("\n")) == 4, reply
    for reply in with_labelish:
        assert "Q1: " not in reply and all(a in reply for a in expected([labelish, *one_line]))


# --- a real socket: the CLI's knobs and the stream's timing -------------------------------------


def content_arrivals(response: httpx.Response, started: float) -> list[float]:
    """Seconds after ``started`` at which each content chunk of a live stream arrived."""
    arrivals = []
    for line in response.iter_lines():
        if line.startswith("data: {"):
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.monotonic() - started)
    return arrivals


def test_cli_knobs_and_stream_timing_over_a_real_socket() -> None:
    knobs: dict[str, float | str] = {
        "latency_ms": 100,
        "latency_per_token_ms": 5,
        "concurrency_limit": 1,
        "retry_after_ms": 30,
        "stream_mode": "on",
        "reject_word": "forbidden",
        "layouts": "json,inline",
    }
    proc = start_fake_llm(**knobs)
    body = {
        "model": MODEL,
        "stream": True,
        "messages": build_batch_messages(QUESTIONS, system=SYSTEM),
    }
    try:
        with httpx.Client(base_url=proc.url.removesuffix("/v1"), timeout=10) as client:
            config = client.get("/config").json()
            assert {name: config[name] for name in knobs} == knobs
            started = time.monotonic()
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                arrivals = content_arrivals(response, started)
            first, last = arrivals[0], arrivals[-1]
            assert len(arrivals) > 100 and first >= 0.09
            assert last - first >= 0.5 * (len(arrivals) - 1) * 0.005  # tokens spaced out
            assert first < last / 2  # the first token came well before the last
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                next(lines)  # the stream is under way: it holds the only slot
                busy = client.post("/v1/chat/completions", json={**body, "stream": False})
                lines.close()  # abandon it: the client hangs up mid-stream
            assert busy.status_code == 429 and busy.headers["retry-after-ms"] == "30"
            deadline = time.monotonic() + 5
            while client.get("/stats").json()["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.02)
            stats = client.get("/stats").json()
            assert stats["in_flight"] == 0 and stats["calls"] == 1  # freed, not run to the end
            banned = {**body, "messages": build_single_messages("Forbidden words", system=None)}
            assert client.post("/v1/chat/completions", json=banned).json() == FILTERED
            assert client.get("/stats").json()["in_flight"] == 0
    finally:
        proc.stop()
