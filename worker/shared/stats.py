"""Per-model counters kept in Redis, so every worker adds to one set of figures."""

from __future__ import annotations

from collections import defaultdict

import redis

KEY = "coalesce:stats"
FIELDS = ("dedup", "batches", "batched_items", "fallbacks")


class Stats:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def add(self, model: str, **counts: int) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for name, value in counts.items():
            if value:
                pipe.hincrby(KEY, f"{model}|{name}", value)
        pipe.execute()

    def on_batch(self, model: str, size: int, fallbacks: int) -> None:
        self.add(model, batches=1, batched_items=size, fallbacks=fallbacks)

    def read(self) -> dict[str, dict[str, int]]:
        """``{model: {field: count}}`` plus a derived ``fallback_share`` per model."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
        for raw_field, raw_value in self._redis.hgetall(KEY).items():
            text = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            model, _, name = text.rpartition("|")
            out[model][name] = int(raw_value)
        return dict(out)

    def reset(self) -> None:
        self._redis.delete(KEY)


def fallback_share(counts: dict[str, int]) -> float:
    items = counts.get("batched_items", 0)
    return counts.get("fallbacks", 0) / items if items else 0.0
