"""``coalesce bench pipeline``: this pipeline against one plain Celery task per request.

Both integrations run in the same invocation, against the same fake upstream and a private
Redis, one after the other, so their figures are comparable on a shared, noisy machine. Each
run has only its own integration's workers alive, so the Redis commands and worker CPU it
reports are that integration's alone.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import typer
from celery import Celery

from producer import load_settings
from producer._celeryconf import PLAIN_TASK_NAME, celery_config

from ...shared.stats import fallback_share, read_stats, reset_stats
from ..baseline import PLAIN_QUEUE
from ..workload import WorkItem, distinct_questions
from .common import Rig, fresh_tenant, ratio, table
from .load import warm_up
from .meters import Usage

MODELS = ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]
WARM_UP = 32


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
    usage: Usage

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def per_request(self, total: float) -> float:
        return total / self.requests


SCENARIOS = [
    Scenario("(a) zero upstream latency", 0.0, 0),
    Scenario("(b) 400 ms latency, 16 concurrent calls", 400.0, 16),
]


def _measure(rig: Rig, run: Callable[[], None], count: int) -> Result:
    rig.reset_stats()
    meter = rig.meter()
    meter.start()
    started = time.monotonic()
    run()
    seconds = time.monotonic() - started
    usage = meter.stop()
    return Result(count, seconds, rig.stats().calls, usage)


def _run_pipeline(rig: Rig, items: list[WorkItem], tenant: str) -> None:
    with rig.client() as client:
        tickets = client.submit_many(
            {"prompt": i.prompt, "model": i.model, "system": i.system, "tenant": tenant}
            for i in items
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


def _ours(rig: Rig, items: list[WorkItem], workers: int) -> tuple[Result, dict[str, float]]:
    """One run of this pipeline on a flushed Redis (nothing answered from an earlier run)."""
    rig.flush()
    rig.start_workers(workers, prefix="pipe")
    try:
        with rig.client() as client:
            warm_up(client, WARM_UP)
        reset_stats(rig.redis)
        run = functools.partial(_run_pipeline, rig, items, fresh_tenant("pipeline"))
        result = _measure(rig, run, len(items))
        return result, {m: fallback_share(c) for m, c in read_stats(rig.redis).items()}
    finally:
        rig.stop_workers()


def _plain(rig: Rig, items: list[WorkItem], workers: int, concurrency: int) -> Result:
    rig.start_workers(
        workers,
        prefix="plain",
        app="worker.dev.baseline",
        queues=PLAIN_QUEUE,
        concurrency=concurrency,
    )
    try:
        _run_plain(rig.redis_url, distinct_questions(WARM_UP, models=MODELS, seed=999))
        return _measure(rig, functools.partial(_run_plain, rig.redis_url, items), len(items))
    finally:
        rig.stop_workers()


def run_pipeline_bench(*, requests: int, workers: int, plain_concurrency: int = 16) -> None:
    """Both scenarios, each with this pipeline first and the plain integration second."""
    typer.echo(
        f"{requests} distinct requests per run, {len(MODELS)} models, {workers} worker "
        f"process(es) per integration; plain = one Celery task per request "
        f"(threads pool, concurrency {plain_concurrency}); {WARM_UP} warm-up requests "
        f"before each run are not counted\n"
    )
    with Rig(noise=0.2, drop=0.02, seed=3) as rig:
        for index, scenario in enumerate(SCENARIOS):
            items = distinct_questions(requests, models=MODELS, seed=100 + index)
            rig.configure(latency_ms=scenario.latency_ms, max_concurrency=scenario.max_concurrency)
            ours, shares = _ours(rig, items, workers)
            plain = _plain(rig, items, workers, plain_concurrency)
            _print(scenario, ours, plain, shares)
    typer.echo(
        "Redis cmd/req: INFO commandstats calls over the run (includes every redis.call a Lua "
        "script makes).\nCPU ms/req: user+sys from /proc/<pid>/stat over the run; worker = "
        "the integration's worker processes and their children, producer = this process.\n"
        "In (b) plain is bound by its calls (16 at a time x 400 ms, about 40/s); this "
        "pipeline by the same 16 calls carrying up to MAX_BATCH questions each (so at most "
        "16x) and by its worker's CPU, so (b)'s ratio moves with the host's speed: compare "
        "worker cpu/req across runs."
    )


def _row(name: str, result: Result) -> list[str]:
    usage = result.usage
    return [
        name,
        f"{result.rate:.1f}",
        str(result.calls),
        f"{result.seconds:.1f}",
        f"{result.per_request(usage.redis_commands):.1f}",
        *(
            f"{result.per_request(cpu_s) * 1000:.2f} ms"
            for cpu_s in (usage.worker_cpu_s, usage.redis_cpu_s, usage.producer_cpu_s)
        ),
    ]


def _print(scenario: Scenario, ours: Result, plain: Result, shares: dict[str, float]) -> None:
    typer.echo(scenario.name)
    header = [
        "",
        "req/s",
        "calls",
        "secs",
        "redis cmd/req",
        "worker cpu/req",
        "redis cpu/req",
        "producer cpu/req",
    ]
    table(header, [_row("coalesce", ours), _row("plain", plain)])
    typer.echo(
        f"  ratio: {ratio(ours.rate, plain.rate)} throughput, "
        f"{ours.calls / max(1, plain.calls):.3f}x calls, "
        f"{ratio(ours.usage.redis_commands, plain.usage.redis_commands)} Redis commands, "
        f"{ratio(ours.usage.worker_cpu_s, plain.usage.worker_cpu_s)} worker CPU"
    )
    for name, result in (("coalesce", ours), ("plain", plain)):
        top = ", ".join(
            f"{command} {result.per_request(calls):.1f}"
            for command, calls in result.usage.top_commands()
        )
        typer.echo(f"  top Redis commands per request, {name}: {top}")
    typer.echo(
        "  fell back to single calls: "
        + ", ".join(f"{model} {share:.1%}" for model, share in sorted(shares.items()))
        + "\n"
    )
