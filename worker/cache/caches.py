"""The caches on a request's way in and out, as the pipeline uses them.

The exact cache is read inside the entry script (no extra round trip) and written by the
settle script (:mod:`worker.shared.settle`) from the leader's plan. The semantic cache is
probed here first, in memory; only when it has a candidate does one MGET read the candidate
entries and the exact entry together (an exact hit always wins). A cache that fails is a miss,
never a failed request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from producer import Answer, Request, Settings

from ..shared.dedup import Outcome
from ..shared.redisconn import TRANSIENT
from .policy import Plan, plan

if TYPE_CHECKING:
    from .semantic import Probe, SemanticCache

log = logging.getLogger("coalesce.cache")

Count = Callable[..., None]  # Stats.add_soon(model, **counts)
FRESH = ("batched", "single", "passthrough")  # answers that came from a call, so worth storing


def served(answer: Answer, source: str, similarity: float | None = None) -> Answer:
    """``answer`` as a cache hit: no call was made for it, so it costs nothing."""
    return answer.model_copy(
        update={
            "source": source,
            "similarity": similarity,
            "batch_id": None,
            "batch_size": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
            "cost_usd": 0.0,
        }
    )


def saved(answer: Answer) -> int:
    """What a hit saved, in micro-dollars (the stored answer's own share of its call)."""
    return round((answer.cost_usd or 0.0) * 1_000_000)


class Caches:
    def __init__(self, settings: Settings, client: redis.Redis, count: Count) -> None:
        self.settings = settings
        self._redis = client
        self._count = count
        self.semantic: SemanticCache | None = None
        if settings.semantic_cache:
            from .embed import make_embedder
            from .semantic import SemanticCache

            self.semantic = SemanticCache(
                settings.redis_url,
                make_embedder(settings),
                threshold=settings.semantic_threshold,
                max_entries=settings.semantic_max_entries,
            )
            self.semantic.start()

    def plan(self, request: Request, key: str) -> Plan:
        return plan(request, key, self.settings)

    def exact_hit(self, request: Request, answer: Answer) -> Answer:
        self._count(request.model, cache_hits=1, cache_saved_microusd=saved(answer))
        return served(answer, "cache")

    def exact_miss(self, request: Request, the_plan: Plan) -> None:
        if the_plan.read and the_plan.exact_key:
            self._count(request.model, cache_misses=1)

    def lookup(self, request: Request, the_plan: Plan) -> tuple[Answer | None, Probe | None]:
        """A semantic (or exact) hit, and the probe to store the answer under on a miss."""
        if self.semantic is None or not (the_plan.read and the_plan.scope):
            return None, None
        try:
            probe = self.semantic.probe(the_plan.scope, the_plan.text)
        except Exception as exc:  # an embedder or index fault is a miss
            log.warning("semantic lookup failed: %s", type(exc).__name__)
            return None, None
        if not probe.candidates:
            self._count(request.model, semantic_misses=1)
            return None, probe
        entries = [c.entry for c in probe.candidates]
        try:
            values: list[Any] = self._redis.mget([the_plan.exact_key, *entries])
        except TRANSIENT as exc:
            log.warning("semantic lookup failed: %s", type(exc).__name__)
            return None, probe
        if values[0] is not None:
            answer = Outcome.load(values[0]).answer
            if answer is not None:
                return self.exact_hit(request, answer), probe
        for candidate, value in zip(probe.candidates, values[1:], strict=True):
            if value is None:
                self.semantic.forget(candidate.entry)
                continue
            answer = Outcome.load(value).answer
            if answer is not None:
                self._count(request.model, semantic_hits=1, cache_saved_microusd=saved(answer))
                return served(answer, "semantic", round(candidate.similarity, 4)), probe
        self._count(request.model, semantic_misses=1)
        return None, probe

    def remember(self, the_plan: Plan, probe: Probe | None, answer: Answer) -> None:
        """Store a fresh answer in the semantic cache (the exact one is stored on settling)."""
        if self.semantic is None or not (the_plan.store and the_plan.scope):
            return
        if answer.source not in FRESH:
            return
        try:
            if probe is None:
                probe = self.semantic.probe(the_plan.scope, the_plan.text)
            record = Outcome(answer=answer).dump()
            self.semantic.store(the_plan.scope, probe, record, the_plan.ttl_s * 1000)
        except Exception as exc:  # not storing costs a future hit, never this answer
            log.warning("semantic store failed: %s", type(exc).__name__)

    def close(self) -> None:
        if self.semantic is not None:
            self.semantic.stop()
