"""Histograms and status counts as integer fields of the shared stats hash.

Every worker process adds to one Redis hash (``worker/shared/stats.py``: ``<model>|<field>``,
HINCRBY, flushed once a second), so the figures of any number of workers add up there and the
exporter reads them at scrape time. A histogram is one field per bucket (an observation adds 1
to the first bucket whose bound holds it, not cumulative, so one HINCRBY per observation) plus
a ``sum`` field; the collector makes the buckets cumulative. Field names:

- ``h:batch_size:le_<bound>`` / ``h:batch_size:le_inf`` and ``h:batch_size:sum``;
- ``h:window_wait_s:le_<bound>`` ... and ``h:window_wait_s:sum_us`` (microseconds: integers);
- ``st:<status>``: upstream HTTP attempts by status code or error kind (bounded, see
  ``status_label``).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

HIST = "h:"
STATUS = "st:"
INF = "inf"


class Counts(Protocol):
    """What ``observe_*`` write to: ``worker.shared.stats.Stats`` (``add_soon``)."""

    def add_soon(self, model: str, **counts: int) -> None: ...


@dataclass(frozen=True)
class Histogram:
    """A histogram kept in the stats hash: its name, bucket bounds and how its sum is scaled."""

    name: str
    bounds: tuple[float, ...]
    sum_field: str = "sum"
    sum_scale: int = 1  # the sum field holds round(value * sum_scale)

    def bucket_field(self, value: float) -> str:
        index = bisect.bisect_left(self.bounds, value)
        bound = INF if index == len(self.bounds) else _fmt(self.bounds[index])
        return f"{HIST}{self.name}:le_{bound}"

    def fields(self, values: Sequence[float]) -> dict[str, int]:
        """The increments ``values`` add: one per bucket hit, and the sum."""
        out: dict[str, int] = {}
        for value in values:
            field = self.bucket_field(value)
            out[field] = out.get(field, 0) + 1
        if values:
            out[f"{HIST}{self.name}:{self.sum_field}"] = round(sum(values) * self.sum_scale)
        return out

    def decode(self, counts: Mapping[str, int]) -> tuple[list[tuple[str, float]], float] | None:
        """Cumulative ``(le, count)`` buckets (ending with ``+Inf``) and the sum; None if empty."""
        prefix = f"{HIST}{self.name}:le_"
        per_bucket = {
            name[len(prefix) :]: n for name, n in counts.items() if name.startswith(prefix)
        }
        if not any(per_bucket.values()):
            return None
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound in self.bounds:
            running += per_bucket.get(_fmt(bound), 0)
            buckets.append((repr(float(bound)), float(running)))  # "4.0", as Histogram
        running += per_bucket.get(INF, 0)
        buckets.append(("+Inf", float(running)))
        total = counts.get(f"{HIST}{self.name}:{self.sum_field}", 0) / self.sum_scale
        return buckets, total


def _fmt(bound: float) -> str:
    return f"{bound:g}"


BATCH_SIZE = Histogram("batch_size", (1, 2, 4, 8, 16, 32, 64, 128))
WINDOW_WAIT = Histogram(
    "window_wait_s",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    sum_field="sum_us",
    sum_scale=1_000_000,
)

# Statuses kept as they are; any other code is counted under its class ("4xx"), any other
# error kind under "error", so a misbehaving upstream cannot grow the label set.
KNOWN_CODES = frozenset(
    {200, 400, 401, 402, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 529}
)
ERROR_KINDS = frozenset(
    {"timeout", "network", "bad_response", "stream_broken", "deadline", "rate_limited", "error"}
)


def status_label(status: int | str) -> str:
    """The bounded label for an attempt's status: a known code, a code class, or an error kind."""
    if isinstance(status, int):
        if status in KNOWN_CODES:
            return str(status)
        return f"{status // 100}xx" if 100 <= status <= 599 else "error"
    return status if status in ERROR_KINDS else "error"


def status_class(label: str) -> str:
    """``2xx``/``4xx``/``5xx`` for HTTP statuses, ``error`` when no status came back."""
    return f"{label[0]}xx" if label[:1].isdigit() else "error"


def observe_batch(stats: Counts, model: str, size: int, waits_s: Sequence[float]) -> None:
    """One upstream call of ``size`` requests that waited ``waits_s`` seconds in the window.

    Call it once per upstream call from the sender (a single is size 1); ``waits_s`` holds one
    value per request the call carries (time from entering the window to being sent).
    """
    counts = BATCH_SIZE.fields([size])
    counts.update(WINDOW_WAIT.fields([max(0.0, w) for w in waits_s]))
    stats.add_soon(model, **counts)


def observe_status(stats: Counts, model: str, status: int | str) -> None:
    """One HTTP attempt upstream ended with ``status`` (a code, or an error kind).

    Fits ``Upstream(observer=...)``: ``functools.partial(observe_status, stats)``.
    """
    stats.add_soon(model, **{STATUS + status_label(status): 1})
