"""Counting what a run cost: latency percentiles, Redis commands and CPU time per process tree.

Everything is read from outside the measured processes (``INFO commandstats`` on the private
Redis, ``/proc/<pid>/stat`` for the workers), so the figures include what the code under test
cannot see about itself: Celery's own Redis traffic, library CPU, threads it did not start.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

_TICKS_PER_S = float(os.sysconf("SC_CLK_TCK"))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def redis_command_counts(client: redis.Redis) -> dict[str, int]:
    """Calls per command name since Redis started; each call a Lua script makes counts too."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(entry["calls"])
        for name, entry in stats.items()
        if isinstance(entry, dict)
    }


def redis_commands(client: redis.Redis) -> int:
    """Commands Redis has run since start; calls made inside Lua scripts count one each."""
    return sum(redis_command_counts(client).values())


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from the state field on (the name may hold spaces or parens)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone between listing and reading
        return None
    return text[text.rindex(")") + 2 :].split()


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process we can see."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    return parents


def _tree(roots: Iterable[int]) -> set[int]:
    parents = _parents()
    members = {pid for pid in roots if pid in parents}
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in members} - members
        members |= children
        grew = bool(children)
    return members


def tree_cpu_s(roots: Iterable[int]) -> float:
    """User+sys CPU seconds of ``roots`` and all their descendants, live or already reaped.

    A reaped child's time sits in its parent's cutime/cstime and a live one's in its own
    utime/stime, so summing all four over the live tree counts every process exactly once.
    """
    ticks = 0
    for pid in _tree(roots):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / _TICKS_PER_S


def own_cpu_s() -> float:
    """User+sys CPU seconds of this (producer) process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Usage:
    """What one measured stretch cost, in totals; divide by requests for per-request figures."""

    redis_commands: int
    worker_cpu_s: float
    redis_cpu_s: float
    producer_cpu_s: float
    commands_by_name: dict[str, int]

    def top_commands(self, count: int = 5) -> list[tuple[str, int]]:
        return sorted(self.commands_by_name.items(), key=lambda item: -item[1])[:count]


@dataclass(frozen=True)
class _Reading:
    commands: dict[str, int]
    worker_cpu_s: float
    redis_cpu_s: float
    producer_cpu_s: float


class Meter:
    """Snapshots before and after a run; ``stop()`` gives the difference."""

    def __init__(self, client: redis.Redis, *, worker_pids: list[int], redis_pid: int) -> None:
        self._client = client
        self._worker_pids = worker_pids
        self._redis_pid = redis_pid
        self._start: _Reading | None = None

    def _read(self) -> _Reading:
        return _Reading(
            redis_command_counts(self._client),
            tree_cpu_s(self._worker_pids),
            tree_cpu_s([self._redis_pid]),
            own_cpu_s(),
        )

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> Usage:
        if self._start is None:
            raise RuntimeError("Meter.stop() before start()")
        end, start = self._read(), self._start
        by_name = {
            name: calls - start.commands.get(name, 0)
            for name, calls in end.commands.items()
            if calls > start.commands.get(name, 0)
        }
        # the INFO that took the first snapshot shows up in the second one
        by_name["info"] = by_name.get("info", 1) - 1
        by_name = {name: calls for name, calls in by_name.items() if calls > 0}
        return Usage(
            redis_commands=sum(by_name.values()),
            worker_cpu_s=end.worker_cpu_s - start.worker_cpu_s,
            redis_cpu_s=end.redis_cpu_s - start.redis_cpu_s,
            producer_cpu_s=end.producer_cpu_s - start.producer_cpu_s,
            commands_by_name=by_name,
        )
