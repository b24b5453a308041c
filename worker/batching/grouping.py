"""Which requests may share a call, and how large a batch a model has earned."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from producer import Request


class GroupKey(NamedTuple):
    """Requests share a combined prompt only when all of these are equal.

    The tenant is part of it, so two tenants' questions never meet in one call.
    """

    tenant: str
    model: str
    system: str | None
    temperature: float
    max_tokens: int | None


def group_key(request: Request) -> GroupKey:
    return GroupKey(
        tenant=request.tenant or "",
        model=request.model,
        system=request.system or None,
        temperature=float(request.temperature),
        max_tokens=request.max_tokens,
    )


@dataclass
class _ModelHealth:
    limit: int
    fallback_rate: float = 0.0
    shrunk_at: float | None = None  # clock() at the last shrink; None if never shrunk


@dataclass
class BatchSizer:
    """A per-model batch limit that halves when replies often fail to parse.

    Every item that falls back is paid twice (its share of the batch, then a single call),
    so a model that mangles large batches is given smaller ones until it parses reliably.
    """

    max_batch: int
    shrink_above: float = 0.25
    grow_below: float = 0.05
    smoothing: float = 0.3
    probe_after_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _models: dict[str, _ModelHealth] = field(default_factory=dict)

    def _health(self, model: str) -> _ModelHealth:
        return self._models.setdefault(model, _ModelHealth(limit=self.max_batch))

    def limit(self, model: str) -> int:
        health = self._health(model)
        if (
            health.limit == 1
            and health.shrunk_at is not None  # record() shrank it; max_batch == 1 never probes
            and self.max_batch >= 2
            and self.clock() - health.shrunk_at >= self.probe_after_s
        ):
            health.limit = 2  # try batching again after a rest; record() decides what follows
            health.fallback_rate = self.shrink_above / 2
        return health.limit

    def record(self, model: str, size: int, fallbacks: int) -> None:
        if size < 2:
            return
        health = self._health(model)
        rate = fallbacks / size
        health.fallback_rate += self.smoothing * (rate - health.fallback_rate)
        if health.fallback_rate > self.shrink_above and health.limit > 1:
            health.limit = max(1, health.limit // 2)
            health.shrunk_at = self.clock()
            health.fallback_rate = self.shrink_above / 2
        elif health.fallback_rate < self.grow_below and health.limit < self.max_batch:
            health.limit += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            m: {"limit": h.limit, "fallback_rate": round(h.fallback_rate, 4)}
            for m, h in self._models.items()
        }
