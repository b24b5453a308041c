"""One request's path through a worker: caches, dedup claim, shared window, inbox, answer.

Runs on a Celery task thread. The thread makes one Redis call on the way in (the exact cache,
the dedup claim and joining the window, in one script; a semantic cache candidate adds one
read before it) and then waits on a local future that the process's inbox resolves,
so a waiting request holds no Redis connection. Every Redis call retries within the request's
deadline, so a Redis restart of a few seconds costs time, not the request.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import producer
from producer import Answer, Request, RequestFailed, Settings, UpstreamTimeout, request_key

from .batching.collector import Collector
from .batching.entry import Entry
from .batching.grouping import group_key
from .batching.prompt import is_batch_safe
from .batching.sender import batching_pays, new_batch_id
from .batching.window import Item, Verdict
from .cache.caches import Caches
from .cache.policy import Plan
from .ledger.books import NOTHING, Books
from .ledger.budgets import BudgetKeeper
from .metrics.encode import observe_status
from .passthrough import Passthrough
from .shared.dedup import Dedup, Outcome
from .shared.inbox import Inbox, task_id_of
from .shared.redisconn import retry_sync, sync_client
from .shared.results import stored_by_settle
from .shared.settle import Settlement
from .tokens import count_tokens
from .upstream import RetryPolicy, Upstream

log = logging.getLogger("coalesce.pipeline")

CLAIM_TTL_S = 15.0
CHECK_EVERY_S = 5.0  # a waiting leader renews its claim; a follower checks its leader lives


class Pipeline:
    """Everything a worker process shares between its task threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Each task thread uses a connection only for a call at a time; size for all of them.
        self.redis = sync_client(
            settings.redis_url, max_connections=settings.worker_concurrency + 16
        )
        self.dedup = Dedup(self.redis, claim_ttl_s=CLAIM_TTL_S)
        self.inbox = Inbox(settings.redis_url)
        self.inbox.start()
        keeper = BudgetKeeper.from_settings(settings, self.redis)
        self.books = Books(settings, self.redis, budget=keeper.hook)
        self.collector = Collector(
            settings,
            self.redis,
            self._make_upstream,
            books=self.books,
            worker_id=self.inbox.worker_id,
            own_inbox=self.inbox.key,
            resolve=self.inbox.resolve,
            waiting=lambda: self.inbox.waiting,
        )
        self.entry = Entry(
            self.collector.window,
            self.collector.aredis,
            self.collector.loop,
            claim_ttl_ms=int(CLAIM_TTL_S * 1000),
        )
        self.passthrough = Passthrough(settings, self.collector)
        self.caches = Caches(settings, self.redis, self.collector.stats.add_soon)
        log.info("coalesce worker %s ready", self.inbox.worker_id)

    def _make_upstream(self) -> Upstream:
        key = self.settings.upstream_api_key
        return Upstream(
            self.settings.upstream_url,
            api_key=key.get_secret_value() if key else None,
            timeout_s=self.settings.upstream_timeout_s,
            concurrency=self.settings.upstream_concurrency,
            retry=RetryPolicy(attempts=None),
            # Every HTTP attempt's status, for the metrics (the stats exist once it is called).
            observer=lambda model, status: observe_status(self.collector.stats, model, status),
        )

    def answer(self, request: Request, task_id: str) -> Answer:
        """This request's answer; raises a CoalesceError saying why when there is none."""
        key = request_key(request)
        deadline = time.monotonic() + self.settings.request_timeout_s
        delivery, future = self.inbox.new_delivery(task_id)
        try:
            return self._answer(request, key, delivery, future, deadline)
        finally:
            self.inbox.forget(delivery)

    def _answer(
        self,
        request: Request,
        key: str,
        delivery: str,
        future: concurrent.futures.Future[Outcome],
        deadline: float,
    ) -> Answer:
        plan = self.caches.plan(request, key)
        hit, probe = self.caches.lookup(request, plan)
        answer = hit or self._asked(request, key, delivery, future, deadline, plan)
        if answer.source in ("dedup", "cache", "semantic"):
            # Hits cost nothing; the ledger still counts them, with the baseline they saved.
            self.books.answered(request, task_id_of(delivery), answer.source, NOTHING, answer.text)
        elif hit is None:
            self.caches.remember(plan, probe, answer)
        return answer

    def _asked(
        self,
        request: Request,
        key: str,
        delivery: str,
        future: concurrent.futures.Future[Outcome],
        deadline: float,
        plan: Plan,
    ) -> Answer:
        """The answer from the exact cache, dedup, or a call (the window, single, passthrough)."""
        item = self._item(request, key, delivery, deadline)
        group = group_key(request).id
        # A question with label-like lines could move answers between requests: it goes alone.
        # A conversation (passthrough) never joins a window: it is its own call.
        batchable = (
            not request.passthrough
            and self.settings.max_batch >= 2
            and is_batch_safe(request.prompt)
            and self._pays(request)
        )
        enqueued = False
        looked = True  # count the exact-cache miss once, not on every look again
        while True:
            entered = self.entry.enter(
                item,
                group,
                request.model,
                new_batch_id(self.inbox.worker_id),
                join=batchable and not enqueued,
                plan=plan,
                deadline=deadline,
            )
            if entered.answer is not None and entered.answer.answer is not None:
                if entered.role == "cache":
                    return self.caches.exact_hit(request, entered.answer.answer)
                return self._shared(request, entered.answer.answer)
            if looked:
                self.caches.exact_miss(request, plan)
                looked = False
            leader = entered.role == "leader"
            if leader and not enqueued:
                self._dispatch(item, group, request.model, entered.verdict)
                enqueued = True
            outcome = self._wait(future, key, delivery, leader, deadline)
            if outcome is None:
                continue  # lost the claim, or the leader vanished: look again
            if outcome.answer is None:
                raise _error(outcome, follower=not leader)
            if not leader:
                return self._shared(request, outcome.answer)
            if outcome.result_stored:
                stored_by_settle(task_id_of(delivery))
            return outcome.answer

    def _pays(self, request: Request) -> bool:
        """With COALESCE_BATCH_ONLY_IF_CHEAPER: batch only where a full batch costs less."""
        if not self.settings.batch_only_if_cheaper:
            return True
        price = self.books.prices.price(request.model)
        return batching_pays(request.system, price, self.settings.max_batch)

    def _item(self, request: Request, key: str, delivery: str, deadline: float) -> Item:
        return Item(
            delivery=delivery,
            inbox=self.inbox.key,
            key=key,
            payload=request.model_dump(),
            tokens=count_tokens(request.prompt),
            answer_tokens=request.max_tokens or 0,
            deadline=time.time() + (deadline - time.monotonic()),
        )

    def _dispatch(self, item: Item, group: str, model: str, verdict: Verdict | None) -> None:
        """Act on what the window decided for a request we lead."""
        if item.request.passthrough:
            self.passthrough.send(item)
        elif verdict is None or verdict.action == "single":
            self.collector.send_single(item)
        elif verdict.action == "batch":
            self.collector.send_claimed(verdict, group, model)
        elif verdict.action == "wait":
            self.collector.watch(group, model, verdict.delay_ms)

    def _wait(
        self,
        future: concurrent.futures.Future[Outcome],
        key: str,
        delivery: str,
        leader: bool,
        deadline: float,
    ) -> Outcome | None:
        """The outcome, or None when the claim situation changed and must be looked at again."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._give_up(key, delivery, leader)
            try:
                return future.result(timeout=min(remaining, CHECK_EVERY_S))
            except concurrent.futures.TimeoutError:
                pass
            if not leader:
                return None  # re-claim: still a follower, the answer, or the leader now
            held = retry_sync("claim refresh", lambda: self.dedup.refresh(key, delivery), deadline)
            if not held and not future.done():
                return None

    def _give_up(self, key: str, delivery: str, leader: bool) -> Outcome:
        reason = (
            f"no answer within {self.settings.request_timeout_s:g} s (COALESCE_REQUEST_TIMEOUT_S)"
        )
        outcome = Outcome(error=reason, kind="UpstreamTimeout")
        if leader:
            self.collector.fail([Settlement(key, delivery, self.inbox.key, outcome)])
        return outcome

    def _shared(self, request: Request, original: Answer) -> Answer:
        self.collector.stats.add_soon(request.model, dedup=1)
        # This request cost nothing extra: the tokens were billed to the original.
        return original.model_copy(
            update={
                "source": "dedup",
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "cost_usd": 0.0,
            }
        )


def _error(outcome: Outcome, *, follower: bool) -> Exception:
    """The exception a failed outcome stands for, from the documented tree."""
    message = outcome.error or "no answer"
    if follower:
        message = f"an identical request in flight failed: {message}"
    cls = getattr(producer, outcome.kind, None)
    if isinstance(cls, type) and issubclass(cls, producer.CoalesceError):
        try:
            return cls(message)
        except TypeError:
            pass
    return RequestFailed(message) if outcome.kind != "UpstreamTimeout" else UpstreamTimeout(message)


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
