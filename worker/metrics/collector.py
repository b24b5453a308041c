"""The Prometheus collector: reads the shared Redis at scrape time, keeps no state.

Correct with any number of worker processes: every figure lives in Redis, where all workers
add to it (the stats hash, the ledger's rollups, the Celery queue), and nothing is counted in
the exporter's memory, so one exporter (or several, or a restarted one) shows the same totals.

Metrics (counters end in ``_total``; labels have bounded values):

- ``coalesce_requests_total{model,source}``: answered requests; source is ``batched``,
  ``single``, ``passthrough``, ``dedup``, ``cache`` or ``semantic`` (a batched request
  re-asked alone counts as ``single``);
- ``coalesce_events_total{model,event}``: other worker counters (batches, fallbacks,
  rejected, reclaimed, cache_misses, semantic_misses, stream_released, stream_mismatches);
- ``coalesce_upstream_calls_total{model,status,status_class}``: HTTP attempts upstream
  (retries included) by status code or error kind; ``coalesce_upstream_errors_total`` the
  same for every attempt that did not return 2xx;
- ``coalesce_batch_size{model}`` and ``coalesce_window_wait_seconds{model}``: histograms;
- ``coalesce_cache_hits_total{model,cache}`` (``exact``/``semantic``),
  ``coalesce_cache_lookups_total{model}``, ``coalesce_cache_hit_ratio{model}`` (gauge, since
  the stats were last reset), ``coalesce_cache_saved_usd_total{model}``;
- from the ledger (whole retention: its daily rollups, ``ledger_daily_ttl_s``):
  ``coalesce_spend_usd_total{model}`` and ``coalesce_baseline_usd_total{model}`` (priced
  requests, as ``coalesce report`` shows billed and baseline),
  ``coalesce_saved_usd{model,lever}`` (a gauge: a lever can go down),
  ``coalesce_tokens_total{model,kind}`` (kind ``prompt``/``completion``/``cached``, the
  requests' shares), ``coalesce_upstream_spend_usd_total{model}`` (the provider's bill,
  from the calls), ``coalesce_unpriced_calls_total{model}``;
- ``coalesce_queue_depth{queue}``: messages waiting in the Celery queue;
- ``coalesce_redis_up``: 0 when Redis could not be read (then nothing else is shown).

Counters drop only when their data does (``reset_stats``, ``cache clear``, rollups expiring),
which Prometheus treats as a counter reset.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from worker.ledger.store import Ledger, Totals
from worker.shared.stats import read_stats

from .encode import BATCH_SIZE, STATUS, WINDOW_WAIT, Histogram, status_class

log = logging.getLogger("coalesce.metrics")

NS = "coalesce"
# Request sources from the stats hash: source -> (field, field to subtract).
SOURCES: dict[str, tuple[str, str | None]] = {
    "batched": ("batched_items", "fallbacks"),
    "single": ("singles", None),
    "passthrough": ("passthrough", None),
    "dedup": ("dedup", None),
    "cache": ("cache_hits", None),
    "semantic": ("semantic_hits", None),
}
EVENTS = (
    "batches",
    "fallbacks",
    "rejected",
    "reclaimed",
    "cache_misses",
    "semantic_misses",
    "stream_released",
    "stream_mismatches",
)


@dataclass
class Snapshot:
    """Everything one scrape reads from Redis."""

    stats: dict[str, dict[str, int]]
    ledger: dict[str, Totals]
    queue_depth: int


class CoalesceCollector:
    """A custom collector (``registry.register(CoalesceCollector(...))``); no ``describe``.

    Each scrape costs a few round trips: one HGETALL (stats), one LLEN (queue), and one
    pipeline over the ledger's daily rollups (about one HGETALL per retained day).
    """

    def __init__(self, client: redis.Redis, *, queue: str, ledger: Ledger | None) -> None:
        self.client = client
        self.queue = queue
        self.ledger = ledger

    def read(self) -> Snapshot:
        stats = read_stats(self.client)
        by_model = self.ledger.breakdown(since=0, by="model") if self.ledger else {}
        depth = int(self.client.llen(self.queue))
        return Snapshot(stats, by_model, depth)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{NS}_redis_up", "1 when the exporter could read Redis.")
        try:
            snap = self.read()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: Redis not readable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _request_metrics(snap.stats)
        yield from _upstream_metrics(snap.stats)
        yield from _histograms(snap.stats)
        yield from _cache_metrics(snap.stats)
        yield from _ledger_metrics(snap.ledger)
        depth = GaugeMetricFamily(
            f"{NS}_queue_depth", "Requests waiting in the Celery queue.", labels=["queue"]
        )
        depth.add_metric([self.queue], snap.queue_depth)
        yield depth


def _request_metrics(stats: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        f"{NS}_requests", "Requests answered, by source.", labels=["model", "source"]
    )
    events = CounterMetricFamily(
        f"{NS}_events",
        "Other worker counters (batches, fallbacks, ...).",
        labels=["model", "event"],
    )
    for model, counts in sorted(stats.items()):
        for source, (field, minus) in SOURCES.items():
            value = counts.get(field, 0) - (counts.get(minus, 0) if minus else 0)
            requests.add_metric([model, source], max(0, value))
        for event in EVENTS:
            events.add_metric([model, event], counts.get(event, 0))
    yield requests
    yield events


def _upstream_metrics(stats: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    labels = ["model", "status", "status_class"]
    calls = CounterMetricFamily(
        f"{NS}_upstream_calls",
        "HTTP attempts upstream (retries included), by status code or error kind.",
        labels=labels,
    )
    errors = CounterMetricFamily(
        f"{NS}_upstream_errors", "HTTP attempts upstream that did not return 2xx.", labels=labels
    )
    for model, counts in sorted(stats.items()):
        for field, value in sorted(counts.items()):
            if not field.startswith(STATUS):
                continue
            status = field[len(STATUS) :]
            kind = status_class(status)
            calls.add_metric([model, status, kind], value)
            if kind != "2xx":
                errors.add_metric([model, status, kind], value)
    yield calls
    yield errors


def _histograms(stats: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    families: list[tuple[Histogram, str, str]] = [
        (BATCH_SIZE, "batch_size", "Requests per upstream call."),
        (WINDOW_WAIT, "window_wait_seconds", "Time a request waited in the batching window."),
    ]
    for hist, name, doc in families:
        family = HistogramMetricFamily(f"{NS}_{name}", doc, labels=["model"])
        for model, counts in sorted(stats.items()):
            decoded = hist.decode(counts)
            if decoded is not None:
                buckets, total = decoded
                family.add_metric([model], buckets, sum_value=total)
        yield family


def _cache_metrics(stats: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    hits = CounterMetricFamily(
        f"{NS}_cache_hits", "Requests answered from a cache.", labels=["model", "cache"]
    )
    lookups = CounterMetricFamily(
        f"{NS}_cache_lookups", "Requests that read the caches.", labels=["model"]
    )
    ratio = GaugeMetricFamily(
        f"{NS}_cache_hit_ratio",
        "Share of cache lookups answered from a cache (exact or semantic).",
        labels=["model"],
    )
    saved = CounterMetricFamily(
        f"{NS}_cache_saved_usd",
        "What the cache hits' answers cost when first asked.",
        labels=["model"],
    )
    for model, counts in sorted(stats.items()):
        exact, semantic = counts.get("cache_hits", 0), counts.get("semantic_hits", 0)
        # As ``coalesce cache stats``: a semantic hit stops before the exact lookup.
        total = exact + semantic + counts.get("cache_misses", 0)
        hits.add_metric([model, "exact"], exact)
        hits.add_metric([model, "semantic"], semantic)
        lookups.add_metric([model], total)
        if total:
            ratio.add_metric([model], (exact + semantic) / total)
        saved.add_metric([model], counts.get("cache_saved_microusd", 0) / 1_000_000)
    yield from (hits, lookups, ratio, saved)


def _ledger_metrics(by_model: Mapping[str, Totals]) -> Iterator[Metric]:
    def counter(name: str, doc: str, *extra: str) -> CounterMetricFamily:
        return CounterMetricFamily(f"{NS}_{name}", doc, labels=["model", *extra])

    spend = counter("spend_usd", "Billed USD of priced requests (their shares of calls).")
    baseline = counter("baseline_usd", "USD the requests would have cost sent alone, uncached.")
    # A gauge: a lever can be negative (fallback re-asks count against batching).
    saved = GaugeMetricFamily(
        f"{NS}_saved_usd",
        "USD saved, by lever (adds up to baseline - spend).",
        labels=["model", "lever"],
    )
    tokens = counter("tokens", "Tokens billed to requests (cached: prompt-cache reads).", "kind")
    upstream = counter("upstream_spend_usd", "USD the provider billed for the calls.")
    unpriced = counter("unpriced_calls", "Upstream calls with no known price.")
    for model, totals in sorted(by_model.items()):
        spend.add_metric([model], totals.billed_usd)
        baseline.add_metric([model], totals.baseline_usd)
        for lever, usd in totals.levers.items():
            saved.add_metric([model, lever], usd)
        tokens.add_metric([model, "prompt"], totals.prompt_tokens)
        tokens.add_metric([model, "completion"], totals.completion_tokens)
        tokens.add_metric([model, "cached"], totals.cached_tokens)
        upstream.add_metric([model], totals.upstream_billed_usd)
        unpriced.add_metric([model], totals.unpriced_calls)
    yield from (spend, baseline, saved, tokens, upstream, unpriced)
