"""worker.shared.dedup.Dedup on a real redis-server: leaders, followers, hand-over, timeouts."""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from collections.abc import Iterator

import pytest
import redis

from producer import Answer
from worker.shared.dedup import Dedup, Outcome

pytestmark = pytest.mark.integration

ANSWER = Answer(
    text="ans-0123456789 The parcel left the depot this morning.",
    source="batched",
    model="gpt-4o-mini",
    batch_id="b1",
    batch_size=4,
    prompt_tokens=40,
    completion_tokens=12,
    cost_usd=0.0000132,
)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def dedup(client: redis.Redis) -> Dedup:
    return Dedup(client, answer_ttl_s=60)


@pytest.fixture
def key() -> str:
    return secrets.token_hex(16)


def wait_in_thread(
    pool: concurrent.futures.ThreadPoolExecutor, dedup: Dedup, key: str, task_id: str, within: float
) -> concurrent.futures.Future[Outcome | None]:
    return pool.submit(dedup.wait, key, task_id, time.monotonic() + within)


def wait_for_waiters(client: redis.Redis, key: str, count: int, timeout: float = 5.0) -> None:
    """Until ``count`` followers have registered, so a settle after this reaches all of them."""
    stop = time.monotonic() + timeout
    while client.scard(f"coalesce:dd:{key}:waiters") < count:
        assert time.monotonic() < stop, "followers never registered"
        time.sleep(0.01)


def test_first_claim_leads_and_others_follow(dedup: Dedup, key: str) -> None:
    assert dedup.claim(key, "t1").role == "leader"
    second = dedup.claim(key, "t2")
    assert second.role == "follower" and second.answer is None
    assert dedup.claim(key, "t3").role == "follower"


def test_redelivered_leader_takes_over_its_own_claim(dedup: Dedup, key: str) -> None:
    assert dedup.claim(key, "t1").role == "leader"
    assert dedup.claim(key, "t1").role == "leader"
    assert dedup.claim(key, "t2").role == "follower"


def test_keys_are_independent(dedup: Dedup, key: str) -> None:
    assert dedup.claim(key, "t1").role == "leader"
    assert dedup.claim(key + "x", "t2").role == "leader"


def test_published_answer_is_returned_to_later_claims(dedup: Dedup, key: str) -> None:
    assert dedup.claim(key, "t1").role == "leader"
    dedup.publish(key, "t1", ANSWER)
    for task_id in ("t2", "t1"):  # a new request, and a redelivered copy of the leader
        claim = dedup.claim(key, task_id)
        assert claim.role == "answer"
        assert claim.answer == ANSWER


def test_published_answer_expires_after_its_ttl(client: redis.Redis, key: str) -> None:
    dedup = Dedup(client, answer_ttl_s=0.3)
    assert dedup.claim(key, "t1").role == "leader"
    dedup.publish(key, "t1", ANSWER)
    assert dedup.claim(key, "t2").role == "answer"
    time.sleep(0.5)
    assert dedup.claim(key, "t2").role == "leader"


def test_waiting_followers_get_the_published_answer(
    dedup: Dedup, client: redis.Redis, key: str
) -> None:
    assert dedup.claim(key, "leader").role == "leader"
    followers = [f"f{i}" for i in range(4)]
    assert all(dedup.claim(key, f).role == "follower" for f in followers)
    with concurrent.futures.ThreadPoolExecutor(len(followers)) as pool:
        waits = [wait_in_thread(pool, dedup, key, f, 10) for f in followers]
        wait_for_waiters(client, key, len(followers))
        published = time.monotonic()
        dedup.publish(key, "leader", ANSWER)
        outcomes = [w.result(10) for w in waits]
        woke_after = time.monotonic() - published
    assert outcomes == [Outcome(answer=ANSWER)] * len(followers)
    assert woke_after < 1.0  # pushed to them, not found by polling


def test_follower_arriving_after_publish_gets_the_answer(dedup: Dedup, key: str) -> None:
    assert dedup.claim(key, "leader").role == "leader"
    assert dedup.claim(key, "late").role == "follower"
    dedup.publish(key, "leader", ANSWER)  # settles before the follower starts waiting
    started = time.monotonic()
    assert dedup.wait(key, "late", time.monotonic() + 10) == Outcome(answer=ANSWER)
    assert time.monotonic() - started < 1.0


def test_failure_reaches_followers_and_is_not_kept(
    dedup: Dedup, client: redis.Redis, key: str
) -> None:
    assert dedup.claim(key, "leader").role == "leader"
    assert dedup.claim(key, "f1").role == "follower"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = wait_in_thread(pool, dedup, key, "f1", 10)
        wait_for_waiters(client, key, 1)
        dedup.fail(key, "leader", "UpstreamStatusError: upstream returned 500 after 5 attempts")
        outcome = waiting.result(10)
    assert outcome is not None
    assert outcome.answer is None
    assert outcome.error is not None and "upstream returned 500" in outcome.error
    retry = dedup.claim(key, "t9")
    assert retry.role == "leader" and retry.answer is None


def test_vanished_leader_lets_a_follower_take_over(client: redis.Redis, key: str) -> None:
    dedup = Dedup(client, answer_ttl_s=60, claim_ttl_s=0.3)
    assert dedup.claim(key, "leader").role == "leader"
    assert dedup.claim(key, "f1").role == "follower"
    started = time.monotonic()
    outcome = dedup.wait(key, "f1", time.monotonic() + 10)  # the leader never refreshes
    assert outcome is None
    assert time.monotonic() - started < 3.0
    assert dedup.claim(key, "f1").role == "leader"


def test_refresh_keeps_a_claim_alive(client: redis.Redis, key: str) -> None:
    dedup = Dedup(client, answer_ttl_s=60, claim_ttl_s=0.3)
    assert dedup.claim(key, "leader").role == "leader"
    stop = time.monotonic() + 1.0
    while time.monotonic() < stop:
        assert dedup.refresh(key, "leader")
        time.sleep(0.1)
    assert dedup.claim(key, "other").role == "follower"
    assert not dedup.refresh(key, "other")  # only the holder may extend it
    time.sleep(0.5)  # no more refreshes: it lapses
    assert not dedup.refresh(key, "leader")
    assert dedup.claim(key, "other").role == "leader"


def test_wait_times_out_at_its_deadline(dedup: Dedup, key: str) -> None:
    assert dedup.claim(key, "leader").role == "leader"
    assert dedup.claim(key, "f1").role == "follower"
    started = time.monotonic()
    outcome = dedup.wait(key, "f1", started + 0.5)
    elapsed = time.monotonic() - started
    assert outcome is not None
    assert outcome.answer is None and outcome.error is not None and "timed out" in outcome.error
    assert 0.4 <= elapsed < 1.5


def test_follower_of_a_long_running_leader_still_gets_its_failure(
    client: redis.Redis, key: str
) -> None:
    dedup = Dedup(client, answer_ttl_s=60, claim_ttl_s=0.3)
    assert dedup.claim(key, "leader").role == "leader"
    assert dedup.claim(key, "f1").role == "follower"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = wait_in_thread(pool, dedup, key, "f1", 10)
        wait_for_waiters(client, key, 1)
        stop = time.monotonic() + 1.6  # longer than 4 x claim_ttl, with the claim kept alive
        while time.monotonic() < stop:
            assert dedup.refresh(key, "leader")
            time.sleep(0.1)
        dedup.fail(key, "leader", "UpstreamStatusError: upstream returned 500 after 5 attempts")
        outcome = waiting.result(10)
    assert outcome is not None and outcome.error is not None
