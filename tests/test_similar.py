"""Similarity grouping: the split itself, the window's larger claim, and a real worker using it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from producer import Client, load_settings
from worker.batching.grouping import SizerPolicy
from worker.batching.similar import Grouper, split_by_similarity, split_in_order
from worker.batching.window import Item, Limits, Window
from worker.dev.fakellm import expected_answer
from worker.shared.dedup import Dedup


def clustered(labels: Sequence[int], *, dim: int = 32, spread: float = 0.3, seed: int = 0):
    """Unit vectors around one random centre per label."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(labels) + 1, dim))
    rows = np.array([centres[label] + spread * rng.normal(size=dim) for label in labels])
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def assert_partition(groups: list[list[int]], n: int) -> None:
    flat = [i for group in groups for i in group]
    assert sorted(flat) == list(range(n)), "every index exactly once"
    assert all(group == sorted(group) for group in groups), "arrival order inside a prompt"
    if n:
        assert groups[0][0] == 0, "the oldest request's prompt goes first"


# -- the split ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 400), st.integers(0, 300)), max_size=60),
    st.integers(1, 9),
    st.integers(100, 2_000),
    st.integers(50, 1_500),
    st.integers(0, 2**16),
)
def test_budgets_hold_and_every_index_lands_once(
    sizes: list[tuple[int, int]], max_items: int, max_tokens: int, max_answers: int, seed: int
) -> None:
    tokens = [t for t, _ in sizes]
    answers = [a for _, a in sizes]
    vectors = (
        clustered([i % 3 for i in range(len(sizes))], seed=seed) if sizes else np.zeros((0, 8))
    )
    for split in (
        split_by_similarity(
            vectors,
            tokens,
            max_items=max_items,
            max_tokens=max_tokens,
            answers=answers,
            max_answers=max_answers,
        ),
        split_in_order(
            tokens,
            max_items=max_items,
            max_tokens=max_tokens,
            answers=answers,
            max_answers=max_answers,
        ),
    ):
        assert_partition(split, len(sizes))
        for group in split:
            assert len(group) <= max_items
            if len(group) > 1:  # an item over a budget on its own is alone
                assert sum(tokens[i] for i in group) <= max_tokens
                assert sum(answers[i] for i in group) <= max_answers


def test_similar_questions_land_together_without_extra_calls() -> None:
    labels = [0, 1, 2, 0, 1, 2, 1, 0, 2, 2, 0, 1]  # three topics, interleaved as they arrived
    groups = split_by_similarity(clustered(labels), [20] * 12, max_items=4, max_tokens=1_000)
    assert len(groups) == 3  # as many calls as arrival order would need
    assert [sorted({labels[i] for i in g}) for g in groups] == [[0], [1], [2]]
    assert_partition(groups, 12)
    in_order = split_in_order([20] * 12, max_items=4, max_tokens=1_000)
    assert in_order == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_uneven_topics_fill_prompts_by_likeness() -> None:
    labels = [0] * 7 + [1] * 3  # arrival order mixes nothing, but one topic is larger
    groups = split_by_similarity(clustered(labels, seed=4), [10] * 10, max_items=8, max_tokens=500)
    assert groups == [list(range(7)), [7, 8, 9]]


def test_the_token_budget_can_force_more_prompts() -> None:
    labels = [0, 0, 0, 1, 1, 1]
    tokens = [300, 300, 300, 10, 10, 10]
    groups = split_by_similarity(clustered(labels), tokens, max_items=8, max_tokens=650)
    assert_partition(groups, 6)
    assert all(sum(tokens[i] for i in g) <= 650 or len(g) == 1 for g in groups)
    assert groups == [[0, 1], [2, 3, 4, 5]]  # the third long one has no room beside the others


def test_split_is_deterministic_and_handles_edges() -> None:
    vectors = clustered([i % 4 for i in range(40)], seed=9)
    tokens = [5 + i % 7 for i in range(40)]
    first = split_by_similarity(vectors, tokens, max_items=6, max_tokens=40)
    assert first == split_by_similarity(vectors.copy(), list(tokens), max_items=6, max_tokens=40)
    assert split_by_similarity(np.zeros((0, 4)), [], max_items=3, max_tokens=10) == []
    assert split_by_similarity(vectors[:1], [999], max_items=3, max_tokens=10) == [[0]]
    same = np.ones((5, 4), dtype=np.float32) / 2  # identical vectors: arrival order wins ties
    assert split_by_similarity(same, [1] * 5, max_items=2, max_tokens=10)[0][0] == 0
    with pytest.raises(ValueError):
        split_by_similarity(vectors, tokens[:3], max_items=3, max_tokens=10)
    with pytest.raises(ValueError):
        split_in_order(tokens, max_items=0, max_tokens=10)


# -- the grouper the sender uses ---------------------------------------------------------------


def make_item(prompt: str, tokens: int = 10) -> Item:
    payload = {"prompt": prompt, "model": "gpt-4o-mini"}
    return Item(secrets.token_hex(4), "inbox", secrets.token_hex(4), payload, tokens, 0, 0.0)


AXES = {"zebra": 0, "apple": 1}


class TopicEmbedder:
    """One axis per leading word (stable, unlike ``hash``): enough to tell two topics apart."""

    def __init__(self) -> None:
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls += 1
        out = np.zeros((len(texts), 8), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, AXES.get(text.split()[0], 7)] = 1.0
        return out


def grouping_settings():
    return load_settings(similarity_grouping=True, max_batch_tokens=1_000)


async def test_grouper_builds_one_embedder_and_skips_embedding_when_one_prompt_fits() -> None:
    embedder, built = TopicEmbedder(), []

    def factory(settings):
        built.append(1)
        return embedder

    grouper = Grouper(grouping_settings(), factory)
    items = [make_item(f"{'apple' if n % 2 else 'zebra'} question {n}") for n in range(8)]
    assert await grouper.split(items[:3], max_items=4, answer_estimate=50) == [items[:3]]
    assert embedder.calls == 0 and not built
    for _ in range(2):
        parts = await grouper.split(items, max_items=4, answer_estimate=50)
        assert [{p.request.prompt.split()[0] for p in part} for part in parts] == [
            {"zebra"},
            {"apple"},
        ]
    assert built == [1] and embedder.calls == 2


async def test_grouper_falls_back_to_arrival_order_on_any_embedding_error() -> None:
    items = [make_item(f"q{n}") for n in range(6)]

    def no_model(settings):
        raise RuntimeError("no model here")

    class Broken:
        def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
            raise TimeoutError("embeddings endpoint timed out")

    for factory in (no_model, lambda settings: Broken()):
        parts = await Grouper(grouping_settings(), factory).split(
            items, max_items=4, answer_estimate=50
        )
        assert parts == [items[:4], items[4:]]


# -- the window's larger claim (real redis-server) ----------------------------------------------

POLICY = SizerPolicy(max_batch=4)
LIMITS = Limits(window_ms=200, max_batch_tokens=1_000, max_answer_tokens=10_000)


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def leading_item(dedup: Dedup, n: int) -> Item:
    key, delivery = secrets.token_hex(8), f"task{n}:w:{secrets.token_hex(2)}"
    assert dedup.claim(key, delivery, "coalesce:inbox:test").role == "leader"
    payload = {"prompt": f"question {n}", "model": "gpt-4o-mini"}
    return Item(delivery, "coalesce:inbox:test", key, payload, 10, 0, time.time() + 30)


@pytest.mark.integration
async def test_window_claims_split_factor_times_the_limit(
    rclient: redis.Redis, redis_url: str
) -> None:
    aclient = aioredis.Redis.from_url(redis_url)
    try:
        off = Window(rclient, aclient, LIMITS, POLICY)
        on = Window(rclient, aclient, LIMITS, POLICY, split_factor=3)
        sample = leading_item(Dedup(rclient), 0)
        assert on.join_args(sample, "m", "b")[-1] == 3 and off.join_args(sample, "m", "b")[-1] == 1
        dedup = Dedup(rclient)
        verdicts = [on.join("g", leading_item(dedup, n), "gpt-4o-mini", f"b{n}") for n in range(12)]
        assert [v.action for v in verdicts] == ["wait"] * 11 + ["batch"]
        claim = verdicts[-1]
        assert len(claim.items) == 12 and claim.limit == 4 and claim.answer_estimate == 200
        assert off.join("h", leading_item(dedup, 20), "gpt-4o-mini", "c1").action == "wait"
        on.join("h", leading_item(dedup, 21), "gpt-4o-mini", "c2")
        flushed = await on.flush("h", "gpt-4o-mini", "c3", force=True)
        assert flushed.action == "batch" and len(flushed.items) == 2 and flushed.limit == 4
        for n in range(6):
            on.join("j", leading_item(dedup, 40 + n), "gpt-4o-mini", f"e{n}")
        whole = await on.flush("j", "gpt-4o-mini", "e9", force=True)
        assert len(whole.items) == 4 and whole.left == 2  # whole calls' worth; the rest waits
        plain = [
            off.join("k", leading_item(dedup, 30 + n), "gpt-4o-mini", f"d{n}") for n in range(4)
        ]
        assert [v.action for v in plain] == ["wait"] * 3 + ["batch"]
        assert len(plain[-1].items) == 4 and plain[-1].limit == 0  # off: today's claim and reply
    finally:
        await aclient.aclose()


# -- a real worker ------------------------------------------------------------------------------


def bike(n: int) -> str:
    return f"How often should I oil the bike chain and check bike brakes, rider {n}?"


def sums(n: int) -> str:
    return f"What is {n} plus {n + 7} in arithmetic, as a number?"


@pytest.mark.integration
def test_a_burst_of_two_topics_is_answered_in_one_topic_prompts(
    fake_llm, worker_env, workers, redis_url
) -> None:
    fake = fake_llm()
    env = worker_env(fake.url, similarity_grouping="1", max_batch="8", window_ms="1000")
    workers(env)
    prompts = [bike(n) if n % 2 else sums(n) for n in range(16)]  # interleaved topics
    fast = load_settings(redis_url=redis_url, max_batch=8, window_ms=1000)
    with Client(settings=fast) as client:
        tickets = client.submit_many({"prompt": p, "model": "gpt-4o-mini"} for p in prompts)
        answers = [t.get(timeout=30) for t in tickets]
    topics: dict[str, set[str]] = {}
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer.text == expected_answer("gpt-4o-mini", None, prompt)
        assert answer.source == "batched" and answer.batch_id
        topics.setdefault(answer.batch_id, set()).add(prompt.split()[0])
    assert len(topics) == 2, topics  # 16 requests, limit 8: two calls, as without grouping
    assert all(len(kinds) == 1 for kinds in topics.values()), topics
