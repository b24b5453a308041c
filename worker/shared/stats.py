"""Per-model counters kept in Redis, so every worker adds to one set of figures.

Counting must never fail or slow a request: updates are sent from the collector's loop in the
background, and a Redis error only costs the count (logged once per burst).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, defaultdict

import redis
import redis.asyncio as aioredis

from producer._keys import STATS_KEY

from .redisconn import TRANSIENT

log = logging.getLogger("coalesce.stats")

KEY = STATS_KEY
FIELDS = (
    "dedup",
    "batches",
    "batched_items",
    "fallbacks",
    "singles",
    "passthrough",
    "rejected",
    "stream_released",
    "stream_mismatches",
    "stream_voided",
    "reclaimed",
    "cache_hits",
    "cache_misses",
    "semantic_hits",
    "semantic_misses",
    "cache_saved_microusd",
)


class Stats:
    """Counts add up in memory and reach Redis once a second, in one pipeline, when any changed.

    ``add_soon`` may be called from any thread; an idle worker sends nothing.
    """

    FLUSH_S = 1.0

    def __init__(self, client: aioredis.Redis, loop: asyncio.AbstractEventLoop) -> None:
        self._redis = client
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._scheduled = False

    def add_soon(self, model: str, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                if value:
                    self._pending[f"{model}|{name}"] += value
            if self._scheduled or not self._pending:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._loop.call_later, self.FLUSH_S, self._spawn_flush)

    def _spawn_flush(self) -> None:
        task = self._loop.create_task(self.flush())
        task.add_done_callback(lambda _: None)

    async def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, Counter()
            self._scheduled = False
        if not pending:
            return
        pipe = self._redis.pipeline(transaction=False)
        for field_name, value in pending.items():
            pipe.hincrby(KEY, field_name, value)
        try:
            await pipe.execute()
        except TRANSIENT as exc:
            log.warning("stats not recorded: %s", type(exc).__name__)


def read_stats(client: redis.Redis) -> dict[str, dict[str, int]]:
    """``{model: {field: count}}`` with every field present."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    for raw_field, raw_value in client.hgetall(KEY).items():
        text = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        model, _, name = text.rpartition("|")
        out[model][name] = int(raw_value)
    return dict(out)


def reset_stats(client: redis.Redis) -> None:
    client.delete(KEY)


def fallback_share(counts: dict[str, int]) -> float:
    items = counts.get("batched_items", 0)
    return counts.get("fallbacks", 0) / items if items else 0.0
