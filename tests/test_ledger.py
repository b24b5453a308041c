"""The Redis ledger: record, query, breakdown, series, retention, levers, and exactness."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis

from producer._tags import check_tags
from worker.dev.fakellm import FakeConfig, create_app
from worker.ledger import (
    CallRecord,
    Ledger,
    PriceBook,
    RequestRecord,
    bounded_tags,
    levers_for,
    split_usd,
)
from worker.ledger.records import to_nano
from worker.ledger.store import DAY, HOUR, RAW_CALLS, RAW_REQUESTS

PRICES = PriceBook.load()
MINI = "gpt-4o-mini"
T0 = (time.time() // HOUR - 5) * HOUR + 60  # one minute into the hour, five hours ago


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def batch(
    ts: float,
    *,
    tenant: str = "acme",
    size: int = 3,
    cached: int = 0,
    tags: list[dict[str, str]] | None = None,
    fallback: int = 0,
) -> tuple[list[CallRecord], list[RequestRecord]]:
    """One batched call and its requests, apportioned the way the worker does."""
    prompt, completion = 1500 + 40 * size, 30 * size
    cost = PRICES.cost(MINI, prompt, completion, cached, ts)
    calls = [
        CallRecord(ts, tenant, MINI, "batch", prompt, completion, cached, cost, 0.8, size, "ok")
    ]
    weights = [1.0] * size
    shares = split_usd(cost, weights)
    prompts = [prompt // size + (i < prompt % size) for i in range(size)]
    completions = [completion // size] * size
    cached_shares = [cached // size + (i < cached % size) for i in range(size)]
    extra: list[float] = [0.0] * size
    if fallback:  # a fallback re-ask for the first request, billed to it
        re_cost = PRICES.cost(MINI, fallback, 30, 0, ts)
        assert re_cost is not None
        calls.append(
            CallRecord(ts, tenant, MINI, "fallback", fallback, 30, 0, re_cost, 0.4, 1, "ok")
        )
        extra[0] = re_cost
    requests = []
    price = PRICES.price(MINI, ts)
    for i in range(size):
        share = shares[i]
        billed = None if share is None else share + extra[i]
        baseline = PRICES.cost(MINI, 1500, 30, 0, ts)
        levers = levers_for(
            source="batched",
            baseline_usd=baseline,
            billed_usd=billed,
            cached_tokens=cached_shares[i],
            price=price,
        )
        tag = (tags or [{}] * size)[i]
        requests.append(
            RequestRecord(
                ts,
                tenant,
                MINI,
                "batched",
                tag,
                prompts[i],
                completions[i],
                cached_shares[i],
                billed,
                baseline,
                levers,
            )
        )
    return calls, requests


def hit(
    ts: float, source: str, *, tenant: str = "acme", tags: dict[str, str] | None = None
) -> RequestRecord:
    baseline = PRICES.cost(MINI, 1500, 30, 0, ts)
    levers = levers_for(source=source, baseline_usd=baseline, billed_usd=0.0)
    return RequestRecord(ts, tenant, MINI, source, tags or {}, 0, 0, 0, 0.0, baseline, levers)


def nano_sum(values: list[float | None]) -> int:
    return sum(to_nano(v) for v in values if v is not None)


# --- levers and splitting -------------------------------------------------------------------


def test_split_usd_adds_up_exactly() -> None:
    rng = random.Random(7)
    for _ in range(200):
        cost = rng.random() / 100
        weights = [rng.randint(1, 500) for _ in range(rng.randint(1, 20))]
        assert nano_sum(split_usd(cost, weights)) == to_nano(cost)
    assert split_usd(None, [1, 2]) == [None, None]


def test_levers_add_up_and_never_overlap() -> None:
    price = PRICES.price(MINI)
    rng = random.Random(3)
    for _ in range(300):
        source = rng.choice(["batched", "single", "passthrough", "dedup", "cache", "semantic"])
        baseline = rng.random() / 1000
        billed = 0.0 if source in ("dedup", "cache", "semantic") else rng.random() / 1000
        cached = rng.choice([0, 0, 1024, 1152, 3000])
        levers = levers_for(
            source=source,
            baseline_usd=baseline,
            billed_usd=billed,
            cached_tokens=cached,
            price=price,
        )
        assert nano_sum(list(levers.values())) == to_nano(baseline) - to_nano(billed)
        if source in ("dedup", "cache", "semantic"):
            assert set(levers) <= {source}
        elif source == "batched":
            assert set(levers) <= {"batching", "prompt_cache"}
        else:
            assert set(levers) <= {"other", "prompt_cache"}
    cached_only = levers_for(
        source="single",
        baseline_usd=0.001,
        billed_usd=0.001 - 1024 * 0.075e-6,
        cached_tokens=1024,
        price=price,
    )
    assert cached_only == {"prompt_cache": pytest.approx(1024 * 0.075e-6)}
    assert levers_for(source="batched", baseline_usd=None, billed_usd=0.1) == {}


def test_fallback_reasks_count_against_batching() -> None:
    _, requests = batch(T0, size=2, fallback=1600)
    assert requests[0].levers["batching"] < 0 < requests[1].levers["batching"]


def test_tags_are_bounded() -> None:
    many = {f"t{i}": "v" * 100 for i in range(12)}
    kept = bounded_tags({**many, "bad name!": "x"})
    assert len(kept) == 8 and all(len(v) == 64 for v in kept.values())
    with pytest.raises(ValueError, match="at most 8"):
        check_tags(many)
    with pytest.raises(ValueError, match="names are 1-32"):
        check_tags({"bad name": "x"})
    with pytest.raises(ValueError, match="64"):
        check_tags({"user": "x" * 65})
    assert check_tags({"feature": "support-reply", "user": "u42"}) == {
        "feature": "support-reply",
        "user": "u42",
    }


# --- the Redis ledger -----------------------------------------------------------------------


def test_record_query_and_breakdowns(client: redis.Redis) -> None:
    ledger = Ledger(client, raw_ttl_s=DAY, rollup_ttl_s=30 * DAY)
    tags = [{"feature": "support", "user": "u1"}, {"feature": "support"}, {"feature": "search"}]
    calls, requests = batch(T0, cached=1024, tags=tags)
    other_calls, other_requests = batch(T0 + HOUR, tenant="globex", size=2)
    hits = [hit(T0 + 10, "cache", tags={"feature": "support"}), hit(T0 + 20, "dedup")]
    unpriced_call = CallRecord(T0, "acme", "mystery-1", "single", 50, 5, 0, None, 0.2, 1, "ok")
    unpriced = RequestRecord(T0, "acme", "mystery-1", "single", {}, 50, 5, 0, None, None, {})
    error = CallRecord(T0, "acme", MINI, "batch", 0, 0, 0, 0.0, 30.0, 3, "error:500")
    ledger.record([*calls, unpriced_call, error], [*requests, *hits, unpriced])
    ledger.record(other_calls, other_requests)

    everything = [*requests, *hits, *other_requests]
    totals = ledger.query(since=T0 - HOUR, until=T0 + 3 * HOUR)
    assert totals.requests == len(everything) + 1 and totals.unpriced_requests == 1
    assert totals.billed_nano == nano_sum([r.billed_usd for r in everything])
    assert totals.baseline_nano == nano_sum([r.baseline_usd for r in everything])
    assert sum(totals.levers_nano.values()) == totals.baseline_nano - totals.billed_nano
    assert set(totals.levers) == {"batching", "prompt_cache", "cache", "dedup"}
    assert totals.upstream_calls == 4 and totals.unpriced_calls == 1 and totals.upstream_errors == 1
    assert totals.upstream_billed_nano == nano_sum([c.cost_usd for c in [*calls, *other_calls]])
    assert totals.upstream_billed_nano == totals.billed_nano  # every call's cost was shared out
    assert totals.cached_tokens == totals.upstream_cached_tokens == 1024
    assert totals.prompt_tokens == sum(r.prompt_tokens for r in [*everything, unpriced])
    assert totals.by_source == {"batched": 5, "cache": 1, "dedup": 1, "single": 1}
    assert 0 < totals.saved_pct < 100

    by_tenant = ledger.breakdown(since=T0 - HOUR, until=T0 + 3 * HOUR, by="tenant")
    assert set(by_tenant) == {"acme", "globex"}
    assert by_tenant["globex"].requests == 2 and by_tenant["globex"].upstream_calls == 1
    by_feature = ledger.breakdown(since=T0 - HOUR, until=T0 + 3 * HOUR, by="tag:feature")
    assert {k: v.requests for k, v in by_feature.items()} == {"support": 3, "search": 1}
    by_source = ledger.breakdown(since=T0 - HOUR, until=T0 + 3 * HOUR, by="source")
    assert by_source["cache"].billed_nano == 0 and by_source["cache"].levers_nano["cache"] > 0
    with pytest.raises(ValueError, match="tag:NAME"):
        ledger.breakdown(since=T0, by="colour")

    globex = ledger.query(since=T0 - HOUR, until=T0 + 3 * HOUR, tenant="globex")
    assert globex.billed_nano == by_tenant["globex"].billed_nano
    assert ledger.query(since=T0 - HOUR, tag=("user", "u1")).requests == 1
    first_hour = ledger.query(since=T0 - 60, until=T0 + 600)
    assert first_hour.requests == len(requests) + len(hits) + 1  # globex came an hour later


def test_two_filters_and_raw_rows(client: redis.Redis) -> None:
    """Raw rows (kept raw_ttl_s) answer queries on two dimensions and keep every call."""
    ledger = Ledger(client)
    now = time.time()
    calls, requests = batch(now - 30)
    other_calls, other_requests = batch(now - 20, tenant="globex")
    ledger.record([*calls, *other_calls], [*requests, *other_requests, hit(now - 10, "cache")])
    both = ledger.query(since=now - 60, tenant="acme", source="batched")
    assert both.requests == 3 and both.billed_nano == nano_sum([r.billed_usd for r in requests])
    assert both.upstream_calls == 0  # calls carry no source
    assert ledger.query(since=now - 60, tenant="acme", model=MINI).upstream_calls == 1
    assert ledger.query(since=now - 25, tenant="acme", model=MINI).upstream_calls == 0
    assert ledger.calls(since=now - 60) == [*calls, *other_calls]  # as recorded, ts included
    assert len(ledger.requests(since=now - 60)) == 7


def test_record_is_one_round_trip(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    real_send = redis.Connection.send_packed_command

    def spy(self: redis.Connection, command: Any, check_health: bool = True) -> None:
        sent.append("send")
        real_send(self, command, check_health)

    ledger = Ledger(client)
    ledger.record(*batch(T0))  # loads the script (EVALSHA, then EVAL once)
    monkeypatch.setattr(redis.Connection, "send_packed_command", spy)
    ledger.record(*batch(T0, size=16, tags=[{"feature": f"f{i}"} for i in range(16)]))
    assert sent == ["send"]


def test_series_fills_empty_buckets(client: redis.Redis) -> None:
    ledger = Ledger(client)
    ledger.record(*batch(T0))
    ledger.record(*batch(T0 + 2 * HOUR + 5))
    series = ledger.series(since=T0 - 60, until=T0 + 3 * HOUR - 120, bucket_s=HOUR)
    assert [start for start, _ in series] == [T0 - 60 + i * HOUR for i in range(3)]
    assert [t.requests for _, t in series] == [3, 0, 3]
    daily = ledger.series(since=T0 - 2 * DAY, until=T0 + 3 * HOUR, bucket_s=DAY)
    assert len(daily) in (3, 4) and sum(t.requests for _, t in daily) == 6
    now = time.time() // 60 * 60
    ledger.record(*batch(now - 170))
    minutes = ledger.series(since=now - 240, until=now, bucket_s=60)
    assert [t.requests for _, t in minutes] == [0, 3, 0, 0]  # sub-hour buckets: raw rows
    assert [t.upstream_calls for _, t in minutes] == [0, 1, 0, 0]


def test_retention_bounds(client: redis.Redis) -> None:
    ledger = Ledger(client, raw_ttl_s=1, rollup_ttl_s=2 * DAY, daily_ttl_s=30 * DAY)
    now = time.time()
    for _ in range(60):  # 180 request rows: more than one stream node (100 entries)
        ledger.record(*batch(now))
    time.sleep(1.1)
    ledger.record(*batch(time.time()))
    assert client.xlen(RAW_REQUESTS) < 100 and client.xlen(RAW_CALLS) <= 61
    hourly = [k for k in client.scan_iter("coalesce:ledger:h:*")]
    daily = [k for k in client.scan_iter("coalesce:ledger:d:*")]
    assert hourly and daily
    assert all(0 < client.ttl(k) <= 2 * DAY for k in hourly)
    assert all(2 * DAY < client.ttl(k) <= 30 * DAY for k in daily)
    # The rollups outlive the raw rows: totals still count every request.
    assert ledger.query(since=now - 60).requests == 61 * 3


async def test_exact_against_the_fake_upstream(client: redis.Redis) -> None:
    """Billed tokens and dollars equal the fake's /stats tokens x price table, to the cent."""
    policy = " ".join(f"Rule {i}: be kind, be exact, cite the policy section." for i in range(150))
    ledger = Ledger(client)
    calls: list[CallRecord] = []
    transport = httpx.ASGITransport(app=create_app(FakeConfig()))

    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as http:
        for i in range(40):
            model = MINI if i % 3 else "gpt-4o"
            messages = [
                {"role": "system", "content": policy},
                {"role": "user", "content": f"question number {i}"},
            ]
            body = (
                await http.post("/v1/chat/completions", json={"model": model, "messages": messages})
            ).json()
            usage = body["usage"]
            cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            pt, ct = usage["prompt_tokens"], usage["completion_tokens"]
            cost = PRICES.cost(model, pt, ct, cached)
            calls.append(
                CallRecord(time.time(), "t", model, "single", pt, ct, cached, cost, 0.01, 1, "ok")
            )
        stats: dict[str, Any] = (await http.get("/stats")).json()
    for start in range(0, len(calls), 7):
        ledger.record(calls[start : start + 7], [])
    totals = ledger.query(since=time.time() - 60)
    assert totals.upstream_prompt_tokens == stats["prompt_tokens"]
    assert totals.upstream_completion_tokens == stats["completion_tokens"]
    assert totals.upstream_cached_tokens == stats["cached_tokens"] > 0
    expected = Decimal(0)
    for model, tokens in stats["tokens_by_model"].items():
        price = PRICES.price(model)
        assert price is not None
        rates = [
            Decimal(str(r))
            for r in (price.input_per_m, price.cached_input_per_m, price.output_per_m)
        ]
        uncached = tokens["prompt_tokens"] - tokens["cached_tokens"]
        counts = (uncached, tokens["cached_tokens"], tokens["completion_tokens"])
        expected += sum((n * r for n, r in zip(counts, rates, strict=True)), Decimal(0)) / 10**6
    assert round(Decimal(totals.upstream_billed_nano) / 10**9, 2) == round(expected, 2)
    assert totals.upstream_billed_nano == int(expected * 10**9)  # here exact to the nano-dollar


def test_writer_drops_only_the_overflow_oldest_calls_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.ledger import writer as writer_module

    class Down:
        def record(self, calls: object, requests: object) -> None:
            raise redis.ConnectionError("down")

    monkeypatch.setattr(writer_module, "MAX_PENDING", 3)
    writer = writer_module.LedgerWriter(Down())  # type: ignore[arg-type]
    try:
        calls = [CallRecord(T0, "acme", MINI, "single", 9, 1, 0, 0.0, 0.1, 1, "ok")] * 2
        requests = [hit(T0, "cache")] * 3
        writer.add(calls=calls, requests=requests)
        with writer._lock:
            assert (len(writer._calls), len(writer._requests)) == (0, 3)
    finally:
        writer.stop()
