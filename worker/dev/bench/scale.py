"""``coalesce bench scale``: does adding worker processes shrink batches or add throughput?

The same questions go to 1 worker process and then to N, in one invocation against one fake
upstream (400 ms per call, like a real API): first at a steady arrival rate, where batch size
is what matters, then as a burst from closed-loop callers, where throughput is.
"""

from __future__ import annotations

from dataclasses import dataclass

import typer

from ..workload import WorkItem, distinct_questions
from .common import FakeStats, Rig, fresh_tenant, ms, ratio, table
from .load import Run, closed_loop, paced, warm_up
from .meters import Usage, percentile

MODEL = "gpt-4o-mini"
LATENCY_MS = 400.0


@dataclass(frozen=True)
class Phase:
    """Everything measured with one number of worker processes."""

    workers: int
    steady: Run
    steady_stats: FakeStats
    burst: Run
    burst_stats: FakeStats
    burst_usage: Usage


def _questions(count: int, seed: int) -> list[WorkItem]:
    """Distinct questions of one group: one model and one system prompt."""
    return distinct_questions(count, models=[MODEL], seed=seed)


def _phase(
    rig: Rig,
    workers: int,
    steady: list[WorkItem],
    burst: list[WorkItem],
    *,
    rate: float,
    callers: int,
) -> Phase:
    """Fresh Redis and ``workers`` fresh worker processes; the steady run, then the burst."""
    rig.flush()
    rig.start_workers(workers)
    try:
        with rig.client() as client:
            warm_up(client)
            rig.reset_stats()
            steady_run = paced(client, steady, rate=rate, tenant=fresh_tenant("steady"))
            steady_stats = rig.stats()
            rig.reset_stats()
            meter = rig.meter()
            meter.start()
            burst_run = closed_loop(client, burst, callers=callers, tenant=fresh_tenant("burst"))
            usage = meter.stop()
            return Phase(workers, steady_run, steady_stats, burst_run, rig.stats(), usage)
    finally:
        rig.stop_workers()


def run_scale_bench(*, workers: int, rate: float, seconds: float, burst: int, callers: int) -> None:
    """1 worker process, then ``workers``; each gets the steady run and then the burst."""
    steady = _questions(max(1, round(rate * seconds)), seed=41)
    burst_items = _questions(burst, seed=42)
    counts = [1] if workers == 1 else [1, workers]
    typer.echo(
        f"scale: fake upstream {LATENCY_MS:.0f} ms per call; one tenant, model and system "
        f"prompt; distinct questions; 1 worker process, then {workers}\n"
    )
    with Rig(latency_ms=LATENCY_MS) as rig:
        phases = [_phase(rig, n, steady, burst_items, rate=rate, callers=callers) for n in counts]
    _print_steady(phases, rate, seconds, len(steady))
    _print_burst(phases, burst, callers)
    runs = [run for p in phases for run in (p.steady, p.burst)]
    total = sum(len(run.outcomes) for run in runs)
    typer.echo(
        f"wrong answers: {sum(r.wrong for r in runs)} (failed: {sum(r.failed for r in runs)}) "
        f"of {total}"
    )


def _print_steady(phases: list[Phase], rate: float, seconds: float, count: int) -> None:
    typer.echo(f"(i) steady arrival: {rate:g} req/s for {seconds:g} s ({count} requests)")
    header = [
        "workers",
        "sent/s",
        "batch/call",
        "batch/answer",
        "calls",
        "single",
        "p50 ms",
        "p90 ms",
    ]
    rows = []
    for p in phases:
        lat = p.steady.latencies()
        rows.append(
            [
                str(p.workers),
                f"{p.steady.submit_rate:.1f}",
                f"{p.steady_stats.mean_batch:.2f}",
                f"{p.steady.mean_answer_batch():.2f}",
                str(p.steady_stats.calls),
                str(p.steady_stats.single_calls),
                ms(percentile(lat, 50)),
                ms(percentile(lat, 90)),
            ]
        )
    table(header, rows)
    if len(phases) > 1:
        one, many = phases[0], phases[-1]
        typer.echo(
            f"  mean batch size, {many.workers} vs 1 worker processes: "
            f"{ratio(many.steady_stats.mean_batch, one.steady_stats.mean_batch)} per call "
            f"(fake's batched_questions / batched_calls), "
            f"{ratio(many.steady.mean_answer_batch(), one.steady.mean_answer_batch())} "
            f"per answer (mean Answer.batch_size)"
        )
    typer.echo(
        "  sent/s = submission rate achieved by the pacing loop; latency = submit to Answer\n"
    )


def _print_burst(phases: list[Phase], burst: int, callers: int) -> None:
    typer.echo(f"(ii) burst: {burst} requests from {callers} closed-loop callers")
    header = ["workers", "req/s", "calls", "batch/call", "p50 ms", "p99 ms", "worker cpu/req"]
    rows = []
    for p in phases:
        lat = p.burst.latencies()
        cpu_ms = p.burst_usage.worker_cpu_s * 1000 / max(1, len(p.burst.outcomes))
        rows.append(
            [
                str(p.workers),
                f"{p.burst.rate:.1f}",
                str(p.burst_stats.calls),
                f"{p.burst_stats.mean_batch:.2f}",
                ms(percentile(lat, 50)),
                ms(percentile(lat, 99)),
                f"{cpu_ms:.2f} ms",
            ]
        )
    table(header, rows)
    if len(phases) > 1:
        one, many = phases[0], phases[-1]
        typer.echo(
            f"  {many.workers} vs 1 worker processes: {ratio(many.burst.rate, one.burst.rate)} "
            f"throughput, {ratio(many.burst_stats.calls, one.burst_stats.calls)} upstream calls"
        )
    typer.echo("")
