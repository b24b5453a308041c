"""The ledger through real processes: what the workers record equals what the fake upstream
billed, to the cent, with provider-cached tokens at their own rate, and shares add up."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from producer import Client
from worker.dev.fakellm import expected_answer
from worker.ledger import Ledger, PriceBook

pytestmark = pytest.mark.integration

MODELS = ["gpt-4o-mini", "gpt-4o"]
# A long shared system prompt, so the fake's prompt cache (prefixes of 1,024+ tokens) applies.
POLICY = "You are the support assistant of a bicycle shop. " + " ".join(
    f"Policy {n}: returns within {n + 10} days need a receipt and the original box."
    for n in range(90)
)


def fake_stats(fake) -> dict:
    return httpx.get(fake.url.removesuffix("/v1") + "/stats", timeout=5).json()


def settled_totals(ledger: Ledger, requests: int, calls: int):
    """The ledger's totals once every row reached it (the writers flush twice a second)."""
    deadline = time.monotonic() + 15
    while True:
        totals = ledger.query(since=time.time() - 3600)
        done = totals.requests >= requests and totals.upstream_calls >= calls
        if done or time.monotonic() > deadline:
            return totals
        time.sleep(0.25)


def test_ledger_equals_the_providers_bill(fake_llm, worker_env, workers, client: Client, redis_url):
    fake = fake_llm(noise=0.2, drop=0.1, seed=3)
    workers(worker_env(fake.url, window_ms=100))
    jobs = [
        {"prompt": f"Customer {n}: can I return a helmet after {n} days?", "model": MODELS[n % 2],
         "system": POLICY, "tags": {"feature": "returns" if n % 3 else "faq"}}
        for n in range(48)
    ]  # fmt: skip
    tickets = client.submit_many(jobs)
    answers = [t.get(timeout=60) for t in tickets]
    talk = [
        {"role": "system", "content": POLICY},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Where is my order 1234?"},
    ]
    answers.append(client.chat(talk, model="gpt-4o-mini", temperature=0).get(timeout=60))
    answers.append(client.submit(**jobs[0]).get(timeout=60))  # a cache hit, billed nothing
    for job, answer in zip(jobs, answers, strict=False):
        assert answer.text == expected_answer(job["model"], POLICY, job["prompt"])
    assert answers[-1].source == "cache" and answers[-1].cost_usd == 0

    stats = fake_stats(fake)
    ledger = Ledger(redis.Redis.from_url(redis_url))
    totals = settled_totals(ledger, len(answers), stats["calls"])
    assert totals.upstream_calls == stats["calls"]
    assert totals.upstream_prompt_tokens == stats["prompt_tokens"]
    assert totals.upstream_completion_tokens == stats["completion_tokens"]
    assert totals.upstream_cached_tokens == stats["cached_tokens"] > 0

    prices = PriceBook.load()
    bill = 0.0
    for model, used in stats["tokens_by_model"].items():
        price = prices.price(model)
        assert price is not None and price.cached_input_per_m < price.input_per_m
        fresh = used["prompt_tokens"] - used["cached_tokens"]
        bill += (
            fresh * price.input_per_m
            + used["cached_tokens"] * price.cached_input_per_m
            + used["completion_tokens"] * price.output_per_m
        ) / 1e6
    assert round(totals.upstream_billed_usd, 2) == round(bill, 2)
    assert totals.upstream_billed_usd == pytest.approx(bill, abs=1e-8)

    # Every request is counted once, its shares add up to the calls, and savings to the gap.
    assert totals.requests == len(answers) and totals.unpriced_requests == 0
    assert totals.billed_nano == totals.upstream_billed_nano
    assert totals.prompt_tokens == totals.upstream_prompt_tokens
    assert sum(totals.levers_nano.values()) == totals.baseline_nano - totals.billed_nano
    assert totals.levers.get("cache", 0) > 0 and totals.levers.get("prompt_cache", 0) > 0
    by_tag = ledger.breakdown(since=time.time() - 3600, by="tag:feature")
    assert set(by_tag) == {"returns", "faq"}
    assert sum(t.requests for t in by_tag.values()) == len(jobs) + 1


def test_daily_report_is_scheduled_and_written(tmp_path, redis_url):
    import json
    import os
    import subprocess
    import sys
    from datetime import UTC, datetime

    from worker.ledger import CallRecord, RequestRecord
    from worker.ledger.report import write_daily_report

    env = {**os.environ, "COALESCE_REDIS_URL": redis_url,
           "COALESCE_DAILY_REPORT_PATH": str(tmp_path / "report-{date}.json")}  # fmt: skip
    code = "from worker.app import app; print(app.conf.beat_schedule['daily-report']['task'])"
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert shown.stdout.strip() == "coalesce.daily_report", shown.stderr[-2000:]

    client = redis.Redis.from_url(redis_url)
    now = time.time()
    Ledger(client).record(
        [CallRecord(now, "acme", "gpt-4o-mini", "batch", 1000, 200, 0, 0.00027, 0.4, 4, "ok")],
        [RequestRecord(now, "acme", "gpt-4o-mini", "batched", {}, 250, 50, 0, 0.0000675, 0.0002)],
    )
    today = datetime.now(UTC).date()
    write_daily_report(client, day=today, path=str(tmp_path / "report-{date}.json"), webhook=None)
    data = json.loads((tmp_path / f"report-{today.isoformat()}.json").read_text())
    assert data["requests"] == 1 and data["upstream_calls"] == 1 and "levers" in data


def test_metrics_scraped_from_a_running_worker(fake_llm, worker_env, workers, client, redis_url):
    from prometheus_client.parser import text_string_to_metric_families

    from producer import load_settings
    from worker.metrics import start_exporter

    fake = fake_llm(seed=4)
    workers(worker_env(fake.url, window_ms=100))
    jobs = [
        {"prompt": f"How do I fit a bell, rider {n}?", "model": "gpt-4o-mini"} for n in range(20)
    ]
    for ticket in client.submit_many(jobs):
        ticket.get(timeout=60)
    client.submit(**jobs[0]).get(timeout=60)  # a cache hit
    stats = fake_stats(fake)
    ledger = Ledger(redis.Redis.from_url(redis_url))
    totals = settled_totals(ledger, len(jobs) + 1, stats["calls"])
    time.sleep(1.5)  # the workers send their counters once a second

    server, _ = start_exporter(load_settings(redis_url=redis_url), port=0)
    try:
        text = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).text
    finally:
        server.shutdown()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + str(sorted(sample.labels.items()))
            samples[key] = sample.value

    def total(name: str, **labels: str) -> float:
        wanted = {(k, v) for k, v in labels.items()}
        return sum(
            value
            for key, value in samples.items()
            if key.split("[")[0] == name and all(str(pair) in key for pair in wanted)
        )

    assert total("coalesce_upstream_calls_total", status="200") == stats["calls"]
    assert total("coalesce_batch_size_count") == stats["calls"]
    assert total("coalesce_window_wait_seconds_count") == len(jobs)
    assert total("coalesce_requests_total") == len(jobs) + 1
    assert total("coalesce_cache_hits_total", cache="exact") == 1
    assert total("coalesce_spend_usd_total") == pytest.approx(totals.billed_usd, abs=1e-9)
    assert total("coalesce_queue_depth") == 0 and total("coalesce_redis_up") == 1


def test_batching_only_where_it_pays(fake_llm, worker_env, workers, client, redis_url):
    from worker.batching.sender import batching_pays

    price = PriceBook.load().price("gpt-4o-mini")
    assert not batching_pays(None, price, 16)  # the instructions outweigh what a batch saves
    assert not batching_pays("Answer in one sentence.", price, 16)
    assert batching_pays(POLICY, price, 4) and batching_pays(None, None, 16)

    fake = fake_llm()
    workers(worker_env(fake.url, window_ms=200, batch_only_if_cheaper="true"))
    short = [{"prompt": f"What is {n} times 7?", "model": "gpt-4o-mini"} for n in range(8)]
    long = [{**job, "system": POLICY} for job in short]
    answers = [t.get(timeout=60) for t in client.submit_many(short + long)]
    assert {a.source for a in answers[:8]} == {"single"}
    assert {a.source for a in answers[8:]} <= {"batched"} and fake_stats(fake)["calls"] < 16
