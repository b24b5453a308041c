"""The collector end to end in one process: its own loop thread, an in-memory fake upstream."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from producer import (
    Answer,
    Request,
    Settings,
    UpstreamStatusError,
    build_request,
    load_settings,
    request_key,
)
from worker.batching.collector import Collector
from worker.dev.fakellm import FakeConfig, create_app, expected_answer
from worker.pricing import cost_usd
from worker.tokens import count_tokens
from worker.upstream import RetryPolicy, Upstream

MODEL = "gpt-4o-mini"
SYSTEM = "You are the shop's support assistant."
TIMEOUT = 10.0


@dataclass
class Rig:
    """A collector wired to its own fake upstream app."""

    collector: Collector
    app: FastAPI
    settings: Settings

    def submit(self, request: Request) -> concurrent.futures.Future[Answer]:
        return self.collector.submit(request, request_key(request), time.monotonic() + TIMEOUT)

    def ask(self, requests: list[Request]) -> list[Answer]:
        """Submit all at once, then wait for every answer (in submission order)."""
        futures = [self.submit(r) for r in requests]
        return [f.result(TIMEOUT) for f in futures]

    def stats(self) -> dict[str, Any]:
        """The fake's billing counters, read through the same ASGI app over /stats."""

        async def get() -> dict[str, Any]:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
                response = await client.get("/stats")
                response.raise_for_status()
                result: dict[str, Any] = response.json()
                return result

        return asyncio.run(get())


MakeRig = Callable[..., Rig]


@pytest.fixture
def make_rig() -> Iterator[MakeRig]:
    rigs: list[Rig] = []

    def make(
        config: FakeConfig | None = None,
        *,
        retry: RetryPolicy | None = None,
        factory_delay_s: float = 0.0,
        **overrides: Any,
    ) -> Rig:
        app = create_app(config or FakeConfig())
        # A window long enough that a slow test thread never splits a group it submits at once.
        settings = load_settings(**{"window_ms": 250, "max_batch": 4, **overrides})

        def upstream() -> Upstream:
            # Called by the collector on its own loop thread.
            if factory_delay_s:
                time.sleep(factory_delay_s)
            transport = httpx.ASGITransport(app=app)
            return Upstream("http://fake/v1", transport=transport, retry=retry or RetryPolicy())

        rig = Rig(Collector(settings, upstream), app, settings)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.collector.close()


def question(i: int) -> str:
    return f"Where is my order number {1000 + i}? It was due last week."


def make_request(rig: Rig, prompt: str, **fields: Any) -> Request:
    return build_request(rig.settings, {"prompt": prompt, "model": MODEL, **fields})


def expected(request: Request) -> str:
    return expected_answer(request.model, request.system, request.prompt)


def by_batch(answers: list[Answer]) -> dict[str, list[Answer]]:
    groups: dict[str, list[Answer]] = {}
    for answer in answers:
        assert answer.batch_id is not None
        groups.setdefault(answer.batch_id, []).append(answer)
    return groups


def test_compatible_requests_are_batched_and_answered_correctly(make_rig: MakeRig) -> None:
    rig = make_rig()
    requests = [make_request(rig, question(i), system=SYSTEM) for i in range(8)]
    answers = rig.ask(requests)
    assert [a.text for a in answers] == [expected(r) for r in requests]
    assert len({a.text for a in answers}) == 8
    assert all(a.source == "batched" and a.model == MODEL for a in answers)
    assert all(2 <= a.batch_size <= 4 for a in answers)
    groups = by_batch(answers)
    for members in groups.values():
        assert all(a.batch_size == len(members) for a in members)
    stats = rig.stats()
    assert stats["calls"] == stats["batched_calls"] == len(groups) == 2
    assert stats["questions"] == 8


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("tenant", ("acme", "globex")),
        ("model", ("gpt-4o-mini", "fake-1")),
        ("system", (None, SYSTEM)),
        ("temperature", (0.0, 0.7)),
        ("max_tokens", (300, 400)),
    ],
)
def test_incompatible_requests_never_share_a_batch(
    make_rig: MakeRig, field: str, values: tuple[Any, Any]
) -> None:
    rig = make_rig()
    requests = [make_request(rig, question(i), **{field: values[i % 2]}) for i in range(8)]
    answers = rig.ask(requests)
    assert [a.text for a in answers] == [expected(r) for r in requests]
    assert all(a.source == "batched" for a in answers)  # otherwise the check below is vacuous
    batch_values: dict[str | None, set[Any]] = {}
    for request, answer in zip(requests, answers, strict=True):
        batch_values.setdefault(answer.batch_id, set()).add(getattr(request, field))
    assert all(len(seen) == 1 for seen in batch_values.values()), batch_values
    assert len(batch_values) == 2


def test_prompt_with_label_line_is_sent_alone(make_rig: MakeRig) -> None:
    rig = make_rig()
    unsafe = make_request(rig, "Summarise this reply for me:\nA2: x")
    requests = [make_request(rig, question(i)) for i in range(3)] + [unsafe]
    answers = rig.ask(requests)
    assert [a.text for a in answers] == [expected(r) for r in requests]
    assert answers[3].source == "single"
    assert answers[3].batch_id is None and answers[3].batch_size == 1
    assert all(a.source == "batched" and a.batch_size == 3 for a in answers[:3])
    assert rig.stats()["calls"] == 2


def test_dropped_answers_fall_back_to_singles_and_shrink_the_limit(make_rig: MakeRig) -> None:
    rig = make_rig(FakeConfig(drop=1.0, seed=7))
    answers: list[Answer] = []
    requests: list[Request] = []
    for round_ in range(6):
        # Pairs: each batched reply misses one of two answers, a fallback share of 0.5.
        pair = [make_request(rig, question(10 * round_ + i)) for i in range(2)]
        requests += pair
        answers += rig.ask(pair)
    assert [a.text for a in answers] == [expected(r) for r in requests]
    sources = [a.source for a in answers]
    assert "batched" in sources and "single" in sources
    assert rig.collector.sizer.limit(MODEL) < rig.settings.max_batch
    # Every token billed is charged to some answer, none twice.
    stats = rig.stats()
    assert stats["dropped"] >= 1
    assert sum(a.prompt_tokens for a in answers) == stats["prompt_tokens"]
    assert sum(a.completion_tokens for a in answers) == stats["completion_tokens"]


def test_upstream_errors_reach_every_future(make_rig: MakeRig) -> None:
    rig = make_rig(FakeConfig(error_rate=1.0), retry=RetryPolicy(attempts=1))
    batch = [make_request(rig, question(i)) for i in range(4)]
    single = make_request(rig, "Summarise this reply for me:\nA2: x")
    futures = [rig.submit(r) for r in [*batch, single]]
    for future in futures:
        with pytest.raises(UpstreamStatusError) as info:
            future.result(TIMEOUT)
        assert info.value.status_code == 500
    assert rig.stats()["errors"] == 2  # one batched call, one single call, no retries


def test_batch_tokens_and_cost_are_split_over_its_answers(make_rig: MakeRig) -> None:
    rig = make_rig()
    prompts = [question(i) + " Please explain." * i for i in range(4)]
    requests = [make_request(rig, p, system=SYSTEM) for p in prompts]
    answers = rig.ask(requests)
    assert len(by_batch(answers)) == 1
    stats = rig.stats()
    assert stats["calls"] == 1
    assert sum(a.prompt_tokens for a in answers) == stats["prompt_tokens"]
    assert sum(a.completion_tokens for a in answers) == stats["completion_tokens"]
    # The shared part (system, instructions, markers) is split evenly; each question pays its own.
    shares = [
        a.prompt_tokens - count_tokens(r.prompt) for a, r in zip(answers, requests, strict=True)
    ]
    assert max(shares) - min(shares) <= 1
    for answer in answers:
        assert answer.completion_tokens > 0
        prices = rig.settings.prices
        want = cost_usd(prices, MODEL, answer.prompt_tokens, answer.completion_tokens)
        assert answer.cost_usd == pytest.approx(want)
        assert answer.cost_usd > 0


def test_single_answer_carries_the_whole_call(make_rig: MakeRig) -> None:
    rig = make_rig()
    request = make_request(rig, "Summarise this reply for me:\nA2: x", model="gpt-4o")
    (answer,) = rig.ask([request])
    stats = rig.stats()
    assert answer.source == "single"
    assert answer.prompt_tokens == stats["prompt_tokens"]
    assert answer.completion_tokens == stats["completion_tokens"]
    want = cost_usd(rig.settings.prices, "gpt-4o", answer.prompt_tokens, answer.completion_tokens)
    assert answer.cost_usd == pytest.approx(want)


def test_lone_request_is_sent_when_its_window_closes(make_rig: MakeRig) -> None:
    rig = make_rig(window_ms=200)
    request = make_request(rig, question(1))
    started = time.monotonic()
    (answer,) = rig.ask([request])
    elapsed = time.monotonic() - started
    assert answer.text == expected(request) and answer.source == "single"
    assert 0.15 <= elapsed < 5


def test_max_batch_one_never_batches(make_rig: MakeRig) -> None:
    rig = make_rig(max_batch=1)
    # The sizer reads time.monotonic(), already past probe_after_s on any host up for more
    # than 30 s; shift it so the test does not depend on the host's uptime.
    rig.collector.sizer.clock = lambda: time.monotonic() + 3_600
    answers = rig.ask([make_request(rig, question(i)) for i in range(4)])
    assert [a.source for a in answers] == ["single"] * 4


def test_close_right_after_start_still_drains(make_rig: MakeRig) -> None:
    rig = make_rig(window_ms=5_000, factory_delay_s=0.3)
    future = rig.submit(make_request(rig, question(1)))
    try:
        rig.collector.close()
        assert future.done()
    finally:
        time.sleep(0.5)  # let the loop start, so this close() really drains and stops it
        rig.collector.close()
