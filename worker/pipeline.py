"""One request's path through a worker: dedup claim, collector, settle, hand back an answer."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import redis

from producer import Answer, Request, RequestFailed, Settings, UpstreamTimeout, request_key

from .batching.collector import Collector
from .shared.dedup import Dedup
from .shared.stats import Stats
from .upstream import RetryPolicy, Upstream

log = logging.getLogger("coalesce.pipeline")

CLAIM_TTL_S = 15.0
CLAIM_REFRESH_S = 5.0


class Pipeline:
    """Everything a worker process shares between its task threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        self.dedup = Dedup(self.redis, answer_ttl_s=settings.dedup_ttl_s, claim_ttl_s=CLAIM_TTL_S)
        self.stats = Stats(self.redis)
        self.collector = Collector(settings, self._make_upstream, on_batch=self.stats.on_batch)

    def _make_upstream(self) -> Upstream:
        key = self.settings.upstream_api_key
        return Upstream(
            self.settings.upstream_url,
            api_key=key.get_secret_value() if key else None,
            timeout_s=self.settings.upstream_timeout_s,
            concurrency=self.settings.upstream_concurrency,
            retry=RetryPolicy(attempts=self.settings.upstream_retries + 1),
        )

    def answer(self, request: Request, task_id: str) -> Answer:
        """This request's answer; raises an UpstreamError or RequestFailed when there is none."""
        key = request_key(request)
        deadline = time.monotonic() + self.settings.request_timeout_s
        while True:
            claim = self.dedup.claim(key, task_id)
            if claim.answer is not None:
                return self._shared(request, claim.answer)
            if claim.role == "leader":
                return self._lead(request, key, task_id, deadline)
            outcome = self.dedup.wait(key, task_id, deadline)
            if outcome is None:
                continue  # the leader vanished; try to take over
            if outcome.answer is None:
                raise RequestFailed(f"an identical request in flight failed: {outcome.error}")
            return self._shared(request, outcome.answer)

    def _shared(self, request: Request, original: Answer) -> Answer:
        self.stats.add(request.model, dedup=1)
        # This request cost nothing extra: the tokens were billed to the original.
        return original.model_copy(
            update={"source": "dedup", "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        )

    def _lead(self, request: Request, key: str, task_id: str, deadline: float) -> Answer:
        future = self.collector.submit(request, key, deadline)
        try:
            answer = self._wait_refreshing(future, key, task_id, deadline)
        except BaseException as exc:
            self.dedup.fail(key, task_id, f"{type(exc).__name__}: {exc}")
            raise
        self.dedup.publish(key, task_id, answer)
        return answer

    def _wait_refreshing(
        self, future: concurrent.futures.Future[Answer], key: str, task_id: str, deadline: float
    ) -> Answer:
        """Wait for the collector while keeping our claim alive, so followers keep waiting."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                future.cancel()
                raise UpstreamTimeout(
                    f"no answer within {self.settings.request_timeout_s} s "
                    "(COALESCE_REQUEST_TIMEOUT_S)"
                )
            try:
                return future.result(timeout=min(remaining, CLAIM_REFRESH_S))
            except concurrent.futures.TimeoutError:
                self.dedup.refresh(key, task_id)


_pipeline: Pipeline | None = None
_lock = threading.Lock()


def get_pipeline(settings: Settings) -> Pipeline:
    """The process's pipeline, built on first use (after any fork)."""
    global _pipeline
    with _lock:
        if _pipeline is None:
            _pipeline = Pipeline(settings)
        return _pipeline


def current_pipeline() -> Pipeline | None:
    return _pipeline
