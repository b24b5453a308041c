"""The parts every benchmark starts: a private Redis, the fake upstream, worker processes.

A :class:`Rig` keeps Redis and the fake for the whole invocation and swaps worker processes
between runs, so a baseline and its comparison share one machine state and one fake.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import redis
import typer

from producer import Client, load_settings

from ..procs import Proc, start_fake_llm, start_redis, start_worker, wait_for_workers
from .meters import Meter


@dataclass(frozen=True)
class FakeStats:
    """The fake upstream's ``GET /stats`` counters that the benchmarks print."""

    calls: int
    batched_calls: int
    batched_questions: int
    single_calls: int
    streamed_calls: int
    rate_limited: int
    max_in_flight: int
    batch_sizes: dict[int, int]

    @classmethod
    def parse(cls, data: dict[str, Any]) -> FakeStats:
        sizes = data.get("batch_sizes") or {}
        return cls(
            calls=int(data["calls"]),
            batched_calls=int(data["batched_calls"]),
            batched_questions=int(data["batched_questions"]),
            single_calls=int(data["single_calls"]),
            streamed_calls=int(data["streamed_calls"]),
            rate_limited=int(data["rate_limited"]),
            max_in_flight=int(data["max_in_flight"]),
            batch_sizes={int(size): int(count) for size, count in sizes.items()},
        )

    @property
    def mean_batch(self) -> float:
        """Questions per batched call, from the upstream's side (NaN with no batched call)."""
        return self.batched_questions / self.batched_calls if self.batched_calls else math.nan


class Rig:
    """A private redis-server and fake upstream for one invocation, plus the current workers."""

    def __init__(self, **fake_knobs: object) -> None:
        self._fake_knobs = fake_knobs
        self._procs = contextlib.ExitStack()
        self.workers: list[Proc] = []

    def __enter__(self) -> Rig:
        try:
            self.redis_proc = start_redis()
            self._procs.callback(self.redis_proc.stop)
            self.fake = start_fake_llm()
            self._procs.callback(self.fake.stop)
            self.configure(**self._fake_knobs)
            self.redis = redis.Redis.from_url(self.redis_proc.url)
            self._procs.callback(self.redis.close)
            self._procs.callback(self.stop_workers)
        except BaseException:
            self._procs.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._procs.close()

    @property
    def redis_url(self) -> str:
        return self.redis_proc.url

    @property
    def fake_base(self) -> str:
        return self.fake.url.removesuffix("/v1")

    def start_workers(
        self,
        count: int,
        *,
        prefix: str = "w",
        app: str = "worker.app",
        queues: str | None = None,
        concurrency: int | None = None,
    ) -> None:
        """Start ``count`` worker processes and wait until each answers a ping."""
        env = {"COALESCE_REDIS_URL": self.redis_url, "COALESCE_UPSTREAM_URL": self.fake.url}
        for index in range(count):
            self.workers.append(
                start_worker(
                    env,
                    name=f"{prefix}{index}",
                    app=app,
                    queues=queues,
                    concurrency=concurrency,
                    loglevel="WARNING",
                )
            )
        try:
            wait_for_workers(self.redis_url, len(self.workers), timeout=90)
        except TimeoutError as exc:
            tails = "\n".join(f"--- {w.log_path}\n{w.log_tail(20)}" for w in self.workers)
            raise TimeoutError(f"{exc}\n{tails}") from None

    def stop_workers(self) -> None:
        """Warm-shut every worker down (they finish what they hold) and forget them."""
        for proc in reversed(self.workers):
            proc.stop()
        self.workers.clear()

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self.workers]

    def flush(self) -> None:
        """Empty Redis between runs (no dedup hits, batch limits or stats carried over)."""
        if self.workers:
            raise RuntimeError("flush Redis only while no worker is running")
        self.redis.flushall()

    def configure(self, **knobs: object) -> None:
        """Change fake knobs live; a knob the fake does not know is an error, not a no-op."""
        response = httpx.post(self.fake_base + "/config", json=knobs, timeout=5)
        if response.status_code != 200:
            raise RuntimeError(f"fake upstream refused {knobs}: {response.text}")

    def reset_stats(self) -> None:
        httpx.post(self.fake_base + "/stats/reset", timeout=5).raise_for_status()

    def stats(self) -> FakeStats:
        response = httpx.get(self.fake_base + "/stats", timeout=5)
        response.raise_for_status()
        return FakeStats.parse(response.json())

    def meter(self) -> Meter:
        return Meter(self.redis, worker_pids=self.worker_pids, redis_pid=self.redis_proc.pid)

    def client(self) -> Client:
        return Client(settings=load_settings(redis_url=self.redis_url))


def fresh_tenant(label: str) -> str:
    """A tenant of its own per run, so no run is answered from another's dedup store."""
    return f"bench-{label}-{secrets.token_hex(3)}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: int = 2) -> None:
    """Print an aligned table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        typer.echo(" " * indent + "  ".join(cells).rstrip())


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}x" if old and not math.isnan(old) and not math.isnan(new) else "n/a"
