"""``coalesce bench pipeline``: this pipeline against one plain Celery task per request.

Both integrations run in the same invocation, against the same fake upstream and a private
Redis, one after the other, so their figures are comparable on a shared, noisy machine.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import redis
import typer
from celery import Celery

from producer import Client, load_settings
from producer._celeryconf import PLAIN_TASK_NAME, celery_config

from ..shared.stats import Stats, fallback_share
from .baseline import PLAIN_QUEUE
from .procs import Proc, start_fake_llm, start_redis, start_worker, wait_for_workers
from .workload import WorkItem, distinct_questions

MODELS = ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]


@dataclass(frozen=True)
class Scenario:
    name: str
    latency_ms: float
    max_concurrency: int


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    calls: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


SCENARIOS = [
    Scenario("(a) zero upstream latency", 0.0, 0),
    Scenario("(b) 400 ms latency, 16 concurrent calls", 400.0, 16),
]


def _fake_stats(fake: Proc) -> dict[str, int]:
    return dict(httpx.get(fake.url.removesuffix("/v1") + "/stats", timeout=5).json())


def _configure(fake: Proc, scenario: Scenario) -> None:
    base = fake.url.removesuffix("/v1")
    body = {"latency_ms": scenario.latency_ms, "max_concurrency": scenario.max_concurrency}
    httpx.post(base + "/config", json=body, timeout=5).raise_for_status()
    httpx.post(base + "/stats/reset", timeout=5).raise_for_status()


def _timed(fake: Proc, run: Callable[[], None], count: int) -> Result:
    started = time.monotonic()
    run()
    seconds = time.monotonic() - started
    return Result(count, seconds, _fake_stats(fake)["calls"])


def _run_pipeline(redis_url: str, items: list[WorkItem]) -> None:
    with Client(settings=load_settings(redis_url=redis_url)) as client:
        tickets = client.submit_many(
            {"prompt": i.prompt, "model": i.model, "system": i.system} for i in items
        )
        for ticket in tickets:
            ticket.get(timeout=300)


def _run_plain(redis_url: str, items: list[WorkItem]) -> None:
    app = Celery("bench-plain", set_as_current=False)
    app.conf.update(celery_config(load_settings(redis_url=redis_url)))
    results = [
        app.send_task(
            PLAIN_TASK_NAME,
            args=[{"prompt": i.prompt, "model": i.model, "system": i.system}],
            queue=PLAIN_QUEUE,
        )
        for i in items
    ]
    for result in results:
        result.get(timeout=300)
    app.close()


def _start_plain_workers(env: dict[str, str], count: int, concurrency: int) -> list[Proc]:
    return [
        start_worker(
            env,
            name=f"plain{n}",
            app="worker.dev.baseline",
            queues=PLAIN_QUEUE,
            concurrency=concurrency,
            loglevel="WARNING",
        )
        for n in range(count)
    ]


def run_pipeline_bench(*, requests: int, workers: int, plain_concurrency: int = 16) -> None:
    procs: list[Proc] = []
    try:
        redis_proc = start_redis()
        procs.append(redis_proc)
        fake = start_fake_llm(noise=0.2, drop=0.02, seed=3)
        procs.append(fake)
        env = {"COALESCE_REDIS_URL": redis_proc.url, "COALESCE_UPSTREAM_URL": fake.url}
        procs += [start_worker(env, name=f"pipe{n}", loglevel="WARNING") for n in range(workers)]
        procs += _start_plain_workers(env, workers, plain_concurrency)
        wait_for_workers(redis_proc.url, 2 * workers, timeout=60)
        stats = Stats(redis.Redis.from_url(redis_proc.url))
        typer.echo(
            f"{requests} distinct requests per run, {len(MODELS)} models, {workers} worker "
            f"process(es) per integration; plain = one Celery task per request "
            f"(threads pool, concurrency {plain_concurrency})\n"
        )
        for index, scenario in enumerate(SCENARIOS):
            items = distinct_questions(requests, models=MODELS, seed=100 + index)
            _configure(fake, scenario)
            stats.reset()
            ours = _timed(fake, functools.partial(_run_pipeline, redis_proc.url, items), requests)
            shares = {m: fallback_share(c) for m, c in stats.read().items()}
            _configure(fake, scenario)
            plain = _timed(fake, functools.partial(_run_plain, redis_proc.url, items), requests)
            _print(scenario, ours, plain, shares)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _print(scenario: Scenario, ours: Result, plain: Result, shares: dict[str, float]) -> None:
    typer.echo(scenario.name)
    for name, result in (("coalesce", ours), ("plain", plain)):
        typer.echo(
            f"  {name:8s}  {result.rate:8.1f} req/s  {result.calls:6d} upstream calls  "
            f"({result.seconds:.1f} s)"
        )
    typer.echo(
        f"  ratio     {ours.rate / plain.rate:8.2f}x throughput, "
        f"{ours.calls / max(1, plain.calls):.3f}x calls"
    )
    typer.echo(
        "  fell back to single calls: "
        + ", ".join(f"{model} {share:.1%}" for model, share in sorted(shares.items()))
        + "\n"
    )
