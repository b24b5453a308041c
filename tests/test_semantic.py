"""The shared semantic cache on a real redis-server: two instances, guards, expiry, outages."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from worker.cache.embed import HashingEmbedder
from worker.cache.semantic import LOG_KEY, Probe, SemanticCache
from worker.dev.procs import Proc, start_redis

SCOPE = "a1b2.c3d4.e5f6"
QUESTION = "How do I cancel order 732201349959?"
REPHRASED = "how can I cancel my order 732201349959"


@pytest.fixture
def make_cache() -> Iterator[Callable[..., SemanticCache]]:
    started: list[SemanticCache] = []

    def make(url: str, *, threshold: float = 0.5, max_entries: int = 1000) -> SemanticCache:
        cache = SemanticCache(url, HashingEmbedder(), threshold=threshold, max_entries=max_entries)
        cache.start()
        assert cache.wait_ready(5)
        started.append(cache)
        return cache

    yield make
    for cache in started:
        cache.stop()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_store_then_probe_in_one_instance(
    redis_url: str, make_cache: Callable[..., SemanticCache]
) -> None:
    cache = make_cache(redis_url)
    probe = cache.probe(SCOPE, QUESTION)
    assert probe.candidates == ()
    cache.store(SCOPE, probe, '{"answer": "done"}', 60_000)
    assert len(cache) == 1
    hit = cache.probe(SCOPE, REPHRASED)
    assert len(hit.candidates) == 1
    entry = hit.candidates[0].entry
    assert entry.startswith(f"coalesce:cs:e:{SCOPE}:")
    assert 0.5 <= hit.candidates[0].similarity <= 1.0
    client = redis.Redis.from_url(redis_url)
    assert client.get(entry) == b'{"answer": "done"}'
    assert 0 < client.pttl(entry) <= 60_000
    # The log carries the vector and hashes, never the question.
    log_entries: Any = client.xrange(LOG_KEY)
    ((_, fields),) = log_entries
    assert b"732201349959" not in b"".join(fields.values())
    assert b"cancel" not in b"".join(fields.values())
    # Another scope sees nothing; the same text stored twice is one entry.
    assert cache.probe("other.scope.x", QUESTION).candidates == ()
    cache.store(SCOPE, cache.probe(SCOPE, QUESTION), '{"answer": "again"}', 60_000)
    assert len(cache) == 1
    client.close()


def test_guards_turn_away_close_neighbours(
    redis_url: str, make_cache: Callable[..., SemanticCache]
) -> None:
    cache = make_cache(redis_url, threshold=0.3)
    cache.store(SCOPE, cache.probe(SCOPE, "cancel order 732201349959"), "r1", 60_000)
    cache.store(
        SCOPE, cache.probe(SCOPE, "I paid $160 for this order, refund please"), "r2", 60_000
    )
    other_order = cache.probe(SCOPE, "cancel order 113542617735902")
    assert other_order.candidates == () and "numbers" in other_order.blocked
    other_amount = cache.probe(SCOPE, "I paid $299 for this order, refund please")
    assert other_amount.candidates == () and "amounts" in other_amount.blocked
    negated = cache.probe(SCOPE, "do not cancel order 732201349959")
    assert negated.candidates == () and "negation" in negated.blocked


def test_two_instances_share_entries(
    redis_url: str, make_cache: Callable[..., SemanticCache]
) -> None:
    first = make_cache(redis_url)
    first.store(SCOPE, first.probe(SCOPE, "What is the capital of France?"), "paris", 60_000)
    second = make_cache(redis_url)  # loads the log at start
    assert len(second) == 1
    assert second.probe(SCOPE, "what is the capital of france").candidates
    # An entry stored by one instance reaches the other through its follower.
    second.store(SCOPE, second.probe(SCOPE, QUESTION), "cancelled", 60_000)
    assert eventually(lambda: bool(first.probe(SCOPE, REPHRASED).candidates))
    entry = first.probe(SCOPE, REPHRASED).candidates[0].entry
    first.forget(entry)  # the caller found it gone in Redis
    assert first.probe(SCOPE, REPHRASED).candidates == ()


def test_expired_entries_are_not_offered(
    redis_url: str, make_cache: Callable[..., SemanticCache]
) -> None:
    cache = make_cache(redis_url)
    cache.store(SCOPE, cache.probe(SCOPE, QUESTION), "soon gone", 100)
    assert cache.probe(SCOPE, REPHRASED).candidates
    time.sleep(0.15)
    assert cache.probe(SCOPE, REPHRASED).candidates == ()
    assert make_cache(redis_url).probe(SCOPE, REPHRASED).candidates == ()  # not loaded either


def test_other_embedders_entries_are_ignored(
    redis_url: str, make_cache: Callable[..., SemanticCache]
) -> None:
    cache = make_cache(redis_url)
    cache.store(SCOPE, cache.probe(SCOPE, QUESTION), "x", 60_000)
    narrow = SemanticCache(redis_url, HashingEmbedder(dim=64), threshold=0.5, max_entries=10)
    narrow.start()
    try:
        assert narrow.wait_ready(5)
        assert len(narrow) == 0
    finally:
        narrow.stop()


def test_bad_scope_and_ttl_are_refused(
    redis_url: str, make_cache: Callable[..., SemanticCache]
) -> None:
    cache = make_cache(redis_url)
    probe = cache.probe(SCOPE, QUESTION)
    for scope in ("", "a:b", "a b"):
        with pytest.raises(ValueError):
            cache.store(scope, probe, "x", 1000)
    with pytest.raises(ValueError):
        cache.store(SCOPE, probe, "x", 0)


def test_redis_outage_is_a_miss_and_the_follower_recovers(
    make_cache: Callable[..., SemanticCache],
) -> None:
    proc: Proc = start_redis()
    port = int(proc.url.rsplit(":", 1)[1].split("/")[0])
    try:
        cache = make_cache(proc.url)
        cache.store(SCOPE, cache.probe(SCOPE, QUESTION), "kept locally", 60_000)
        proc.kill()
        # Probing never touches Redis; storing raises a RedisError for the caller to count.
        assert cache.probe(SCOPE, REPHRASED).candidates
        with pytest.raises(redis.RedisError):
            cache.store(SCOPE, cache.probe(SCOPE, "another question"), "lost", 60_000)
        proc = start_redis(port)
        writer = SemanticCache(proc.url, HashingEmbedder(), threshold=0.5, max_entries=10)
        writer.store(SCOPE, writer.probe(SCOPE, "what is the capital of France"), "paris", 60_000)
        writer.stop()
        # The follower reconnects (with backoff) and sees entries stored after the restart.
        assert eventually(
            lambda: bool(cache.probe(SCOPE, "What is the capital of France?").candidates),
            timeout=10,
        )
    finally:
        proc.stop()


def test_probe_is_a_value(redis_url: str, make_cache: Callable[..., SemanticCache]) -> None:
    cache = make_cache(redis_url)
    probe = cache.probe(SCOPE, QUESTION)
    assert isinstance(probe, Probe) and probe.vector.shape == (cache.embedder.dim,)
