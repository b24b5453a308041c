"""Prometheus metrics: the stats-hash encoding, the upstream observer, and a real scrape."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from producer import load_settings
from producer._exceptions import UpstreamRejected, UpstreamTimeout
from tests.upstream_fakes import chat, make, ok_body, scripted, status
from worker.ledger import CallRecord, Ledger, RequestRecord
from worker.metrics import observe_batch, observe_status, start_exporter, status_label
from worker.metrics.collector import CoalesceCollector
from worker.metrics.encode import BATCH_SIZE, WINDOW_WAIT
from worker.metrics.exporter import scrape_client
from worker.shared.stats import Stats

MODEL = "gpt-4o-mini"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- encoding -------------------------------------------------------------------------------


class Recording:
    """A stand-in for ``Stats``: keeps what ``add_soon`` was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, int]]] = []

    def add_soon(self, model: str, **counts: int) -> None:
        self.calls.append((model, counts))


def test_batch_observation_is_one_bucket_per_value_plus_sums() -> None:
    stats = Recording()
    observe_batch(stats, MODEL, 5, [0.004, 0.03, 0.03, 20.0, -1.0])
    [(model, counts)] = stats.calls
    assert model == MODEL
    assert counts == {
        "h:batch_size:le_8": 1,
        "h:batch_size:sum": 5,
        "h:window_wait_s:le_0.005": 2,  # the negative wait counts as 0
        "h:window_wait_s:le_0.05": 2,
        "h:window_wait_s:le_inf": 1,
        "h:window_wait_s:sum_us": 20_064_000,
    }


def test_histogram_decodes_cumulative_buckets() -> None:
    fields = BATCH_SIZE.fields([1, 3, 4, 200])
    buckets, total = BATCH_SIZE.decode(fields) or ([], 0.0)
    assert dict(buckets) == {
        "1.0": 1.0,
        "2.0": 1.0,
        "4.0": 3.0,
        "8.0": 3.0,
        "16.0": 3.0,
        "32.0": 3.0,
        "64.0": 3.0,
        "128.0": 3.0,
        "+Inf": 4.0,
    }
    assert total == 208
    assert BATCH_SIZE.decode({}) is None
    assert WINDOW_WAIT.bucket_field(0.1) == "h:window_wait_s:le_0.1"  # bounds are inclusive


def test_status_labels_are_bounded() -> None:
    assert [status_label(s) for s in (200, 429, 503, 418, 299, 700, "timeout", "weird")] == [
        "200",
        "429",
        "503",
        "4xx",
        "2xx",
        "error",
        "timeout",
        "error",
    ]
    stats = Recording()
    observe_status(stats, MODEL, 503)
    assert stats.calls == [(MODEL, {"st:503": 1})]


# --- the upstream observer ------------------------------------------------------------------


def _observed() -> tuple[list[tuple[str, int | str]], Any]:
    seen: list[tuple[str, int | str]] = []
    return seen, lambda model, code: seen.append((model, code))


async def test_observer_sees_every_attempt() -> None:
    seen, observer = _observed()
    handler, _ = scripted(
        status(503), httpx.ConnectError("refused"), httpx.Response(200, json=ok_body())
    )
    upstream, _ = make(handler, observer=observer)
    async with upstream:
        await chat(upstream)
    assert seen == [("m", 503), ("m", "network"), ("m", 200)]


async def test_observer_sees_rejections_and_survives_its_own_failure() -> None:
    seen, observer = _observed()
    handler, _ = scripted(status(400))
    upstream, _ = make(handler, observer=observer)
    async with upstream:
        with pytest.raises(UpstreamRejected):
            await chat(upstream)
    assert seen == [("m", 400)]

    def broken(model: str, code: int | str) -> None:
        raise RuntimeError("metrics down")

    handler, _ = scripted(httpx.Response(200, json=ok_body()))
    upstream, _ = make(handler, observer=broken)
    async with upstream:
        assert (await chat(upstream)).text == "hello"


async def test_observer_sees_an_attempt_cut_by_the_deadline() -> None:
    seen, observer = _observed()

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(2)
        return httpx.Response(200, json=ok_body())

    upstream, _ = make(slow, observer=observer)
    async with upstream:
        with pytest.raises(UpstreamTimeout):
            await chat(upstream, deadline=time.monotonic() + 0.05)
    assert seen == [("m", "deadline")]


# --- a real scrape --------------------------------------------------------------------------


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def _two_workers_write(redis_url: str) -> None:
    """Two Stats writers, each with its own connection, as two worker processes would."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        conns = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
        one, two = (Stats(conn, loop) for conn in conns)
        for stats in (one, two):
            stats.add_soon(MODEL, batches=1, batched_items=4, fallbacks=1, singles=1)
            stats.add_soon(MODEL, dedup=2, cache_hits=1, cache_misses=2, semantic_hits=1)
            observe_batch(stats, MODEL, 4, [0.02, 0.02, 0.3, 0.3])
            for code in (200, 200, 503, "timeout"):
                observe_status(stats, MODEL, code)
        two.add_soon("other-model", passthrough=3)
        await asyncio.gather(one.flush(), two.flush())
        for conn in conns:
            await conn.aclose()

    asyncio.run(run())


def _fill_ledger(client: redis.Redis) -> None:
    ts = time.time() - 60
    call = CallRecord(ts, "acme", MODEL, "batch", 3000, 90, 1000, 0.0012, 0.7, 3, "ok")
    failed = CallRecord(ts, "acme", "unknown-x", "single", 0, 0, 0, None, 0.1, 1, "error:503")
    rows = [
        RequestRecord(
            ts, "acme", MODEL, "batched", {}, 1000, 30, 333, 0.0004, 0.0010, {"batching": 0.0006}
        )
        for _ in range(3)
    ]
    rows.append(
        RequestRecord(ts, "acme", MODEL, "cache", {}, 0, 0, 0, 0.0, 0.0010, {"cache": 0.0010})
    )
    Ledger(client).record([call, failed], rows)


def _scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_scrape_adds_up_two_workers_ledger_and_queue(redis_url: str, client: redis.Redis) -> None:
    _two_workers_write(redis_url)
    _fill_ledger(client)
    settings = load_settings(redis_url=redis_url)
    client.rpush(settings.queue, b"a", b"b", b"c")
    server, _ = start_exporter(settings, host="127.0.0.1", port=0)
    try:
        samples = _scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()

    assert _get(samples, "coalesce_redis_up") == 1
    requests = "coalesce_requests_total"
    assert _get(samples, requests, model=MODEL, source="batched") == 6  # 2 x (4 - 1 fallback)
    assert _get(samples, requests, model=MODEL, source="single") == 2
    assert _get(samples, requests, model=MODEL, source="dedup") == 4
    assert _get(samples, requests, model=MODEL, source="cache") == 2
    assert _get(samples, requests, model=MODEL, source="semantic") == 2
    assert _get(samples, requests, model="other-model", source="passthrough") == 3
    assert _get(samples, "coalesce_events_total", model=MODEL, event="fallbacks") == 2

    calls, errors = "coalesce_upstream_calls_total", "coalesce_upstream_errors_total"
    assert _get(samples, calls, model=MODEL, status="200", status_class="2xx") == 4
    assert _get(samples, calls, model=MODEL, status="503", status_class="5xx") == 2
    assert _get(samples, errors, model=MODEL, status="timeout", status_class="error") == 2
    assert (errors, frozenset({"model": MODEL, "status": "200", "status_class": "2xx"})) not in (
        samples
    )

    assert _get(samples, "coalesce_batch_size_bucket", model=MODEL, le="4.0") == 2
    assert _get(samples, "coalesce_batch_size_bucket", model=MODEL, le="2.0") == 0
    assert _get(samples, "coalesce_batch_size_count", model=MODEL) == 2
    assert _get(samples, "coalesce_batch_size_sum", model=MODEL) == 8
    wait = "coalesce_window_wait_seconds"
    assert _get(samples, f"{wait}_bucket", model=MODEL, le="0.025") == 4
    assert _get(samples, f"{wait}_bucket", model=MODEL, le="+Inf") == 8
    assert _get(samples, f"{wait}_sum", model=MODEL) == pytest.approx(1.28)

    # lookups = exact hits + exact misses + semantic hits = 2 + 4 + 2
    assert _get(samples, "coalesce_cache_lookups_total", model=MODEL) == 8
    assert _get(samples, "coalesce_cache_hit_ratio", model=MODEL) == pytest.approx(0.5)
    assert _get(samples, "coalesce_cache_hits_total", model=MODEL, cache="semantic") == 2

    assert _get(samples, "coalesce_spend_usd_total", model=MODEL) == pytest.approx(0.0012)
    assert _get(samples, "coalesce_baseline_usd_total", model=MODEL) == pytest.approx(0.004)
    assert _get(samples, "coalesce_saved_usd", model=MODEL, lever="batching") == pytest.approx(
        0.0018
    )
    assert _get(samples, "coalesce_tokens_total", model=MODEL, kind="prompt") == 3000
    assert _get(samples, "coalesce_tokens_total", model=MODEL, kind="cached") == 999
    assert _get(samples, "coalesce_upstream_spend_usd_total", model=MODEL) == pytest.approx(0.0012)
    assert _get(samples, "coalesce_unpriced_calls_total", model="unknown-x") == 1
    assert _get(samples, "coalesce_queue_depth", queue=settings.queue) == 3


def test_unreachable_redis_is_reported_not_raised() -> None:
    dead = scrape_client("redis://127.0.0.1:1/0")
    collector = CoalesceCollector(dead, queue="coalesce", ledger=Ledger(dead))
    families = list(collector.collect())
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [
        ("coalesce_redis_up", [0.0])
    ]


def test_partial_observer_fits_upstream() -> None:
    """``functools.partial(observe_status, stats)`` is what the lead passes as ``observer``."""
    stats = Recording()
    observer = functools.partial(observe_status, stats)
    observer(MODEL, "network")
    assert stats.calls == [(MODEL, {"st:network": 1})]
