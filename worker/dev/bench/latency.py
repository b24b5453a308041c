"""``coalesce bench latency``: what streaming batched calls does to the time each caller waits.

A batched reply is written token by token; a worker that streams can hand ``A1`` to its caller
while ``A16`` is still being written. Run A lets the fake stream; run B has it ignore
``stream`` and send whole replies (the worker falls back). Same questions, same callers, fresh
worker processes for each run, since a worker remembers an upstream that does not stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import typer

from ..workload import WorkItem, distinct_questions
from .common import FakeStats, Rig, fresh_tenant, ms, ratio, table
from .load import Run, closed_loop, warm_up
from .meters import percentile

MODEL = "gpt-4o-mini"
MODES = ("on", "ignore")


@dataclass(frozen=True)
class StreamRun:
    mode: str
    run: Run
    stats: FakeStats

    @property
    def batched(self) -> list[float]:
        """Submit-to-answer seconds of the answers that came out of a batch."""
        return self.run.latencies("batched")


def _one(rig: Rig, mode: str, items: list[WorkItem], *, callers: int, workers: int) -> StreamRun:
    rig.flush()
    rig.configure(stream_mode=mode)
    rig.start_workers(workers)
    try:
        with rig.client() as client:
            warm_up(client)
            rig.reset_stats()
            run = closed_loop(client, items, callers=callers, tenant=fresh_tenant(f"stream-{mode}"))
        return StreamRun(mode, run, rig.stats())
    finally:
        rig.stop_workers()


def run_latency_bench(
    *, callers: int, requests: int, latency_ms: float, ms_per_token: float, workers: int = 1
) -> None:
    """Run A (stream on) then run B (stream ignored) on the same questions; print both."""
    items = distinct_questions(requests, models=[MODEL], seed=51)
    typer.echo(
        f"latency: {requests} distinct requests from {callers} closed-loop callers, "
        f"{workers} worker process(es); fake replies after {latency_ms:g} ms, then "
        f"{ms_per_token:g} ms per completion token\n"
    )
    with Rig(latency_ms=latency_ms, latency_per_token_ms=ms_per_token) as rig:
        runs = [_one(rig, mode, items, callers=callers, workers=workers) for mode in MODES]
    _print(runs)


def _print(runs: list[StreamRun]) -> None:
    header = ["stream_mode", "batched", "p50 ms", "p90 ms", "p99 ms", "req/s", "calls", "streamed"]
    rows = [
        [
            r.mode,
            f"{len(r.batched)}/{len(r.run.outcomes)}",
            ms(percentile(r.batched, 50)),
            ms(percentile(r.batched, 90)),
            ms(percentile(r.batched, 99)),
            f"{r.run.rate:.1f}",
            str(r.stats.calls),
            str(r.stats.streamed_calls),
        ]
        for r in runs
    ]
    table(header, rows)
    streamed, whole = runs[0], runs[-1]
    typer.echo(
        f"  p50 of batched answers, whole replies vs streamed: "
        f"{ratio(percentile(whole.batched, 50), percentile(streamed.batched, 50))}"
    )
    typer.echo("  latency = submit to Answer in the caller, answers with source 'batched' only")
    wrong = sum(r.run.wrong for r in runs)
    failed = sum(r.run.failed for r in runs)
    total = sum(len(r.run.outcomes) for r in runs)
    typer.echo(f"wrong answers: {wrong} (failed: {failed}) of {total}")
