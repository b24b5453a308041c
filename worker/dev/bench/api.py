"""``coalesce bench api``: what the HTTP front door adds to AsyncClient, and what it holds.

One invocation, one private Redis, the fake upstream and real worker processes. The same
distinct questions go through ``AsyncClient`` directly (the baseline) and through
``coalesce api`` with the official ``openai`` package's ``AsyncOpenAI`` (another tenant, so
neither run is answered from the other's dedup store):

- (i) a burst: every request at once, which measures throughput;
- (ii) closed-loop callers, which measures what one request pays for the HTTP hop;
- (iii) many requests held waiting at once (the fake answers slowly), sampling the API
  process's threads and RSS while they wait.

"Added latency" is the difference of matching percentiles of the API run and the direct run.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from producer import load_settings
from producer._async_client import AsyncClient

from ..procs import Proc, free_port, spawn, wait_serving
from ..workload import WorkItem, distinct_questions
from .common import Rig, ms, table
from .meters import percentile

MODEL = "gpt-4o-mini"
API_KEY = "sk-bench-" + "0" * 24


def start_api(env: Mapping[str, str], *, port: int | None = None, workers: int = 1) -> Proc:
    """``coalesce api`` in a child process; ``url`` is its OpenAI base URL (…/v1)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "worker.cli", "api", "--port", str(port)]
    argv += ["--workers", str(workers), "--log-level", "warning"]
    proc = spawn(argv, env=env, log_name="api")
    base = f"http://127.0.0.1:{port}"
    proc.url = base + "/v1"
    return wait_serving(proc, base + "/healthz", what="coalesce api", timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_status(pid: int) -> tuple[int, int]:
    """(threads, RSS in kB) of a process, from /proc."""
    threads = rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return threads, rss


@dataclass
class Sampler:
    """Samples a process's threads and RSS every ``every_s`` on its own thread, keeping peaks."""

    pid: int
    every_s: float = 0.02
    max_threads: int = 0
    max_rss_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        try:
            threads, rss = process_status(self.pid)
        except (OSError, ValueError):
            return
        self.max_threads = max(self.max_threads, threads)
        self.max_rss_kb = max(self.max_rss_kb, rss)


async def _timed(
    calls: list[Callable[[], Awaitable[str]]], callers: int | None
) -> tuple[list[float], list[str], float]:
    """Run the calls, all at once or from ``callers`` closed-loop callers; (seconds per call,
    answers, wall seconds)."""
    gate = asyncio.Semaphore(callers or len(calls))

    async def one(call: Callable[[], Awaitable[str]]) -> tuple[float, str]:
        async with gate:
            started = time.perf_counter()
            text = await call()
            return time.perf_counter() - started, text

    started = time.perf_counter()
    results = await asyncio.gather(*(one(call) for call in calls))
    wall = time.perf_counter() - started
    return [r[0] for r in results], [r[1] for r in results], wall


def _messages(item: WorkItem) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": item.system or ""},
        {"role": "user", "content": item.prompt},
    ]


@dataclass
class Run:
    path: str
    latencies: list[float]
    answers: list[str]
    wall: float
    cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall


async def _direct(redis_url: str, items: list[WorkItem], callers: int | None) -> Run:
    tenant = f"direct-{secrets.token_hex(3)}"
    async with AsyncClient(settings=load_settings(redis_url=redis_url)) as client:

        def call(item: WorkItem) -> Callable[[], Awaitable[str]]:
            async def run() -> str:
                ticket = await client.chat(_messages(item), model=item.model, tenant=tenant)
                return (await ticket.get(timeout=120)).text

            return run

        return Run("AsyncClient", *await _timed([call(item) for item in items], callers))


async def _via_api(api: Proc, items: list[WorkItem], callers: int | None) -> Run:
    from openai import AsyncOpenAI

    # The SDK's own pool allows 1,000 connections: as many requests at once as that.
    async with AsyncOpenAI(base_url=api.url, api_key=API_KEY, max_retries=0, timeout=120) as client:

        def call(item: WorkItem) -> Callable[[], Awaitable[str]]:
            async def run() -> str:
                messages: Any = _messages(item)
                reply = await client.chat.completions.create(model=item.model, messages=messages)
                return reply.choices[0].message.content or ""

            return run

        return Run("api", *await _timed([call(item) for item in items], callers))


def _measured(api: Proc, items: list[WorkItem], callers: int | None) -> tuple[Run, Sampler]:
    """An API run with the API process's CPU, threads and RSS sampled throughout."""
    cpu = cpu_seconds(api.pid)
    with Sampler(api.pid) as sampled:
        run = asyncio.run(_via_api(api, items, callers))
    run.cpu_s = cpu_seconds(api.pid) - cpu
    return run, sampled


def _api_env(rig: Rig, tenant: str) -> dict[str, str]:
    return {
        "COALESCE_REDIS_URL": rig.redis_url,
        "COALESCE_UPSTREAM_URL": rig.fake.url,
        "COALESCE_API_KEYS": f"{API_KEY}={tenant}",
        "COALESCE_API_MAX_IN_FLIGHT": "5000",
        "COALESCE_API_TIMEOUT_S": "120",
    }


def run_api_bench(*, requests: int, callers: int, waiting: int, workers: int) -> None:
    """(i) a burst, (ii) closed-loop callers, (iii) requests held waiting; print each."""
    typer.echo(
        f"api: {workers} worker process(es), fake upstream; the same distinct questions go "
        "through AsyncClient directly and through coalesce api with AsyncOpenAI\n"
    )
    with Rig() as rig:
        rig.start_workers(workers)
        api = start_api(_api_env(rig, f"bench-api-{secrets.token_hex(3)}"))
        try:
            asyncio.run(_via_api(api, distinct_questions(16, models=[MODEL], seed=62), None))
            for title, seed, concurrency in (
                (f"(i) burst: {requests} requests at once", 61, None),
                (f"(ii) {callers} closed-loop callers, {requests} requests", 64, callers),
            ):
                items = distinct_questions(requests, models=[MODEL], seed=seed)
                direct = asyncio.run(_direct(rig.redis_url, items, concurrency))
                via, sampled = _measured(api, items, concurrency)
                typer.echo(title)
                _print_runs(direct, via, sampled)
                _check(items, via.answers)
            rig.configure(latency_ms=3000)
            _print_waiting(asyncio.run(_hold(api, waiting)))
        finally:
            api.stop()


def _print_runs(direct: Run, via: Run, sampled: Sampler) -> None:
    rows = [
        [run.path, f"{run.rate:.1f}", ms(percentile(run.latencies, 50)),
         ms(percentile(run.latencies, 99)), f"{run.wall:.2f}"]
        for run in (direct, via)
    ]  # fmt: skip
    table(["path", "req/s", "p50 ms", "p99 ms", "secs"], rows)
    added50 = percentile(via.latencies, 50) - percentile(direct.latencies, 50)
    added99 = percentile(via.latencies, 99) - percentile(direct.latencies, 99)
    typer.echo(
        f"  added by the API: p50 {ms(added50)} ms, p99 {ms(added99)} ms; API process: "
        f"{via.cpu_s / len(via.latencies) * 1000:.2f} ms CPU per request, peak "
        f"{sampled.max_threads} threads, {sampled.max_rss_kb / 1024:.0f} MB RSS"
    )


def _check(items: list[WorkItem], answers: list[str]) -> None:
    from worker.dev.fakellm.answers import expected_answer

    wrong = sum(
        answer != expected_answer(item.model, item.system, item.prompt)
        for item, answer in zip(items, answers, strict=True)
    )
    typer.echo(f"  wrong answers through the API: {wrong} of {len(items)}\n")


@dataclass(frozen=True)
class Held:
    count: int
    idle: tuple[int, int]
    peak: Sampler
    answered: int
    seconds: float


async def _hold(api: Proc, count: int) -> Held:
    """``count`` requests sent at once while the fake takes 3 s per call; peaks while waiting."""
    items = distinct_questions(count, models=[MODEL], seed=63)
    idle = process_status(api.pid)
    started = time.perf_counter()
    with Sampler(api.pid, every_s=0.05) as peak:
        run = await _via_api(api, items, None)
    return Held(count, idle, peak, len(run.answers), time.perf_counter() - started)


def _print_waiting(held: Held) -> None:
    typer.echo(f"(iii) {held.count} requests waiting at once (the fake answers after 3 s)")
    table(
        ["waiting", "answered", "secs", "threads idle", "threads peak", "RSS idle MB", "RSS peak"],
        [
            [
                str(held.count),
                str(held.answered),
                f"{held.seconds:.1f}",
                str(held.idle[0]),
                str(held.peak.max_threads),
                f"{held.idle[1] / 1024:.0f}",
                f"{held.peak.max_rss_kb / 1024:.0f}",
            ]
        ],
    )
