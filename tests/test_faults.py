"""Faults cost time, not requests: each one caused for real against real processes.

Redis killed and restarted, a worker killed while it holds a claimed batch, a model that takes
two calls at a time, one that rejects one question of a batch, bursts of identical requests
and a backlog that outlasts the redelivery bound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from conftest import FAST_ENV, fast_settings

from producer import Client, RequestFailed, load_settings
from worker.dev.fakellm import expected_answer
from worker.dev.procs import Proc, spawn, start_redis, wait_until

pytestmark = pytest.mark.integration

MODEL = "gpt-4o-mini"


def fake_stats(fake: Proc) -> dict:
    return httpx.get(fake.url.removesuffix("/v1") + "/stats", timeout=5).json()


def questions(count: int, tag: str) -> list[str]:
    return [f"{tag} customer {n}: when will parcel {1000 + n * 7} arrive?" for n in range(count)]


def asked_upstream(fake: Proc) -> int:
    """Questions the fake was asked: each batched question, plus each single call."""
    stats = fake_stats(fake)
    return int(stats["batched_questions"]) + int(stats["single_calls"])


def whereabouts(url: str, tickets: list) -> str:
    """Where each unanswered request is, so a failure says which path lost it."""
    r = redis.Redis.from_url(url)
    queued = b"".join(r.lrange("coalesce", 0, -1))
    held = {m for k in r.scan_iter(match="coalesce:held:*") for m in r.smembers(k)}
    lines = []
    for t in tickets:
        if r.exists(f"celery-task-meta-{t.id}"):
            continue
        lines.append(
            f"{t.id}: pending={r.zscore('coalesce:pending', t.id)} "
            f"queued={t.id.encode() in queued} held={t.id.encode() in held}"
        )
    return "unanswered:\n" + "\n".join(lines)


def check_answers(prompts: list[str], tickets: list, timeout: float) -> None:
    for prompt, ticket in zip(prompts, tickets, strict=True):
        assert ticket.get(timeout=timeout).text == expected_answer(MODEL, None, prompt)


def test_burst_of_identical_requests_answers_all_and_asks_each_once(
    fake_llm, worker_env, workers, client
):
    """500 requests, 50 distinct, on a worker with 256 task threads: no pool exhaustion."""
    fake = fake_llm(latency_ms=300)
    workers(worker_env(fake.url, worker_concurrency="256"))
    distinct = questions(50, "burst")
    prompts = [distinct[n % 50] for n in range(500)]
    tickets = client.submit_many({"prompt": p, "model": MODEL} for p in prompts)
    check_answers(prompts, tickets, timeout=60)
    assert asked_upstream(fake) == 50


def test_a_rejected_question_fails_alone_with_the_models_reason(
    fake_llm, worker_env, workers, client
):
    fake = fake_llm(reject_word="forbidden")
    workers(worker_env(fake.url, window_ms="500"))
    prompts = [*questions(15, "reject"), "How do I buy forbidden fireworks?"]
    tickets = client.submit_many({"prompt": p, "model": MODEL} for p in prompts)
    check_answers(prompts[:15], tickets[:15], timeout=30)
    with pytest.raises(RequestFailed, match="safety system"):
        tickets[15].get(timeout=30)
    assert fake_stats(fake)["rejected"] >= 1


def test_a_model_taking_two_calls_at_a_time_answers_everything(
    fake_llm, worker_env, workers, client
):
    fake = fake_llm(concurrency_limit=2, latency_ms=100)
    workers(worker_env(fake.url))
    prompts = questions(2000, "limited")
    tickets = client.submit_many({"prompt": p, "model": MODEL} for p in prompts)
    check_answers(prompts, tickets, timeout=120)
    stats = fake_stats(fake)
    assert stats["rate_limited"] > 0, "the limit was never hit: the test proves nothing"
    assert stats["max_in_flight"] <= 2


def test_a_backlog_is_not_resent_and_no_question_is_asked_twice(
    fake_llm, worker_env, workers, redis_url
):
    """The backlog outlasts the reaper's bound (5 s): it must find its requests queued."""
    fake = fake_llm(latency_ms=400, max_concurrency=1)
    env = worker_env(
        fake.url, visibility_timeout_s="5", request_timeout_s="4", worker_concurrency="48"
    )
    workers(env)
    settings = load_settings(redis_url=redis_url, **{**fast_settings(), "visibility_timeout_s": 5})
    prompts = questions(700, "backlog")
    r = redis.Redis.from_url(redis_url)
    longest = 0
    with Client(settings=settings) as client:
        tickets = client.submit_many({"prompt": p, "model": MODEL} for p in prompts)
        started = time.monotonic()
        while not all(t.ready() for t in tickets) and time.monotonic() - started < 120:
            longest = max(longest, r.llen("coalesce"))
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        check_answers(prompts, tickets, timeout=5)
    assert elapsed > 12, f"no backlog past the reaper's bound ({elapsed:.1f} s): proves nothing"
    assert longest <= len(prompts)
    assert asked_upstream(fake) == len(prompts)


@contextlib.contextmanager
def restartable_redis() -> Iterator[list[Proc]]:
    """A redis-server with AOF on; ``procs[-1]`` is the live one after any restart."""
    procs = [start_redis(appendonly=True)]
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def restart(procs: list[Proc], down_s: float) -> None:
    """SIGKILL Redis, keep it down ``down_s``, start it again on its port and data."""
    old = procs[-1]
    os.killpg(old.popen.pid, signal.SIGKILL)
    old.popen.wait(10)
    time.sleep(down_s)
    new = spawn(list(map(str, old.popen.args)), log_name="redis-again")
    new.url = old.url
    procs.append(new)
    wait_until(redis.Redis.from_url(new.url).ping, timeout=10, what="restarted redis")


def test_a_redis_outage_loses_no_request(fake_llm, workers):
    fake = fake_llm(latency_ms=300)
    with restartable_redis() as procs:
        url = procs[0].url
        env = {**FAST_ENV, "COALESCE_REDIS_URL": url, "COALESCE_UPSTREAM_URL": fake.url}
        workers(env, wait=False)
        wait_until(
            lambda: (
                redis.Redis.from_url(url).llen("coalesce") == 0
                and len(redis.Redis.from_url(url).keys("_kombu.binding.*")) > 0
            ),
            timeout=30,
            what="worker consuming",
        )
        prompts = questions(300, "outage")
        with Client(settings=load_settings(redis_url=url, **fast_settings())) as client:
            tickets = client.submit_many({"prompt": p, "model": MODEL} for p in prompts)
            time.sleep(0.5)  # some answered, some in windows, some in flight upstream
            killer = threading.Thread(target=restart, args=(procs, 3.0))
            killer.start()
            killer.join()
            try:
                check_answers(prompts, tickets, timeout=150)
            except RequestFailed as exc:
                raise AssertionError(f"{exc}\n{whereabouts(url, tickets)}") from None


def test_a_worker_killed_while_it_holds_a_claimed_batch_loses_nothing(
    fake_llm, worker_env, workers, client, redis_url
):
    """Its own requests come back by redelivery; the other worker's by taking over the lease."""
    fake = fake_llm(latency_ms=4000)
    env = worker_env(fake.url, window_ms="1500")
    procs = {name: workers(env, name=name) for name in ("w1", "w2")}
    r = redis.Redis.from_url(redis_url)
    prompts = questions(16, "killed")
    tickets = []
    for prompt in prompts:  # one at a time, so both workers' consumers take some
        tickets.append(client.submit(prompt, model=MODEL))
        time.sleep(0.02)
    wait_until(lambda: fake_stats(fake)["in_flight"] >= 1, timeout=20, what="a batch in flight")
    (batch,) = [m.decode() for m in r.zrange("coalesce:leases", 0, -1)]
    owner = batch.split(".")[0]
    (victim,) = [n for n, p in procs.items() if f"worker {owner} ready" in p.log_tail(400)]
    items = r.lrange(f"coalesce:batch:{batch}", 0, -1)
    others = [i for i in items if f"coalesce:inbox:{owner}".encode() not in i]
    procs[victim].kill()
    check_answers(prompts, tickets, timeout=90)
    reclaimed = int(r.hget("coalesce:stats", f"{MODEL}|reclaimed") or 0)
    assert len(items) == 16
    print(f"survivor's requests in the dead batch: {len(others)}; reclaimed {reclaimed}")
    if others:  # the survivor's requests were in the dead worker's batch
        assert reclaimed >= 1
