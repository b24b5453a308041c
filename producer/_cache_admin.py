"""What an operator asks of the caches: how they do, and clearing them.

Used by ``coalesce cache stats|clear`` and by ``Client.cache_stats`` / ``clear_cache`` (and
their ``AsyncClient`` twins). Counters come from the workers' shared stats; entries are counted
with SCAN, so the figure is exact but the call is O(keys) on Redis: an operator's command.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import redis

from ._keys import DEDUP_PREFIX, EXACT_PREFIX, SEMANTIC_PREFIX, STATS_KEY, short_hash

SEMANTIC_LOG = "coalesce:cs:log"
COUNTERS = (
    "cache_hits",
    "cache_misses",
    "semantic_hits",
    "semantic_misses",
    "cache_saved_microusd",
)


@dataclass(frozen=True)
class CacheStats:
    """Entries now, and hits and misses since the stats were last reset (every tenant)."""

    exact_entries: int
    semantic_entries: int
    exact_hits: int
    exact_misses: int
    semantic_hits: int
    semantic_misses: int
    saved_usd: float
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def lookups(self) -> int:
        """Requests that read the caches (a semantic hit stops before the exact lookup)."""
        return self.exact_hits + self.exact_misses + self.semantic_hits

    @property
    def hit_rate(self) -> float:
        return (self.exact_hits + self.semantic_hits) / self.lookups if self.lookups else 0.0


def _match(prefix: str, tenant: str | None, namespace: str | None) -> str:
    if tenant is None and namespace is None:
        return f"{prefix}*"
    tenant_part = short_hash(tenant) if tenant is not None else "*"
    namespace_part = short_hash(namespace) if namespace is not None else "*"
    return f"{prefix}{tenant_part}.{namespace_part}.*"


def _count(client: redis.Redis, pattern: str) -> int:
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def read_cache_stats(
    client: redis.Redis, *, tenant: str | None = None, namespace: str | None = None
) -> CacheStats:
    """Entries (of one tenant or namespace if given) and the hit counters (all tenants)."""
    totals: Counter[str] = Counter()
    by_model: dict[str, dict[str, int]] = {}
    for raw_field, raw_value in client.hgetall(STATS_KEY).items():
        text = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        model, _, name = text.rpartition("|")
        if name in COUNTERS:
            totals[name] += int(raw_value)
            by_model.setdefault(model, dict.fromkeys(COUNTERS, 0))[name] = int(raw_value)
    return CacheStats(
        exact_entries=_count(client, _match(EXACT_PREFIX, tenant, namespace)),
        semantic_entries=_count(client, _match(SEMANTIC_PREFIX, tenant, namespace)),
        exact_hits=totals["cache_hits"],
        exact_misses=totals["cache_misses"],
        semantic_hits=totals["semantic_hits"],
        semantic_misses=totals["semantic_misses"],
        saved_usd=totals["cache_saved_microusd"] / 1_000_000,
        by_model=by_model,
    )


def clear_cache(
    client: redis.Redis, *, tenant: str | None = None, namespace: str | None = None
) -> int:
    """Delete cached answers (of one tenant and/or namespace); returns how many went.

    Clearing everything also drops dedup's short-lived answer records and the semantic log,
    so nothing cleared is served again; a filtered clear leaves those (they hold no tenant).
    """
    patterns = [_match(EXACT_PREFIX, tenant, namespace), _match(SEMANTIC_PREFIX, tenant, namespace)]
    everything = tenant is None and namespace is None
    if everything:
        patterns.append(f"{DEDUP_PREFIX}*:answer")
    removed = 0
    for pattern in patterns:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += int(client.unlink(*batch))
                batch = []
        if batch:
            removed += int(client.unlink(*batch))
    if everything:
        client.unlink(SEMANTIC_LOG)
    return removed
