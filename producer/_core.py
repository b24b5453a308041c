"""The one producer core behind ``Client`` and ``AsyncClient``: validate, record, publish, wait.

It runs on an event loop: ``AsyncClient`` uses the caller's, ``Client`` a private loop thread.
Celery's publishing is blocking, so each submission's publishes run on a small bounded thread
pool; waiting is one :class:`~producer._listener.Listener` (one pub/sub connection) for every
request the process waits on. Redis may restart under a running app: submitting retries
connection problems for ``COALESCE_SUBMIT_RETRY_S`` and then raises :class:`BrokerUnavailable`;
waiting rides it out until the caller's timeout. No raw redis or kombu exception reaches the app.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from celery import Celery, states
from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    ReadOnlyError,
    TryAgainError,
)
from redis.retry import Retry

from . import _pending
from ._budget import Budgets
from ._cache_admin import CacheStats, clear_cache, read_cache_stats
from ._celeryconf import TASK_NAME, celery_config, send_only_backend
from ._exceptions import (
    BrokerUnavailable,
    CoalesceError,
    InvalidRequest,
    RequestFailed,
    RequestTimeout,
)
from ._listener import Listener, Outcome
from ._models import Answer, CacheOption, Request
from ._settings import Settings
from ._validate import validate_request

log = logging.getLogger("coalesce.producer")

T = TypeVar("T")
Publish = Callable[[str, dict[str, Any]], object]

RETRY_FIRST_S = 0.05  # first pause after a failed submit step; doubles up to RETRY_CAP_S
RETRY_CAP_S = 1.0
CONNECT_TIMEOUT_S = 2.0  # an unreachable host must not eat the whole retry budget in connect()
PUBLISH_THREADS = 4  # Celery publishes block; a few threads keep up with one core's worth

# Celery's own reconnection, kept to one quick retry (a pooled connection gone stale across a
# restart); longer outages are retried here, bounded by the caller's budget, not Celery's 5 s.
_QUICK_RETRY: dict[str, float] = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.05,
    "interval_max": 0.05,
}
# Wrong credentials are connection errors to redis-py, but waiting does not fix them.
_FINAL = (AuthenticationError, AuthorizationError, redis.ResponseError)
# A replica promoted or a cluster re-sharding answers with these for a few seconds.
_BUSY = (ReadOnlyError, TryAgainError, ClusterDownError)
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, KombuOperationalError, OSError, *_BUSY)


def send_request(
    app: Celery,
    settings: Settings,
    payload: dict[str, Any],
    *,
    task_id: str,
    resent: bool = False,
) -> object:
    """Enqueue one request as a ``coalesce.ask`` task; the producer and the reaper both use it."""
    options: dict[str, Any] = {"queue": settings.queue, "task_id": task_id}
    if not settings.log_prompts:
        # What Flower and worker logs show instead of the prompt text.
        options["argsrepr"] = f"(<{_size(payload)}, model={payload.get('model')}>)"
        options["kwargsrepr"] = "{}"
    kwargs = {"resent": True} if resent else {}
    return app.send_task(TASK_NAME, args=[payload], kwargs=kwargs, **options)


def _size(payload: Mapping[str, Any]) -> str:
    messages = payload.get("messages")
    if isinstance(messages, list):
        return f"{len(messages)} messages"
    return f"{len(str(payload.get('prompt') or ''))} chars"


def make_app(settings: Settings) -> Celery:
    """A producer's Celery app: the workers' settings, with short connect and retry bounds."""
    app = Celery("coalesce-producer", set_as_current=False)
    conf = celery_config(settings)
    conf["result_backend"] = send_only_backend(settings.redis_url)
    conf["task_publish_retry_policy"] = _QUICK_RETRY
    conf["result_backend_transport_options"] = {
        **conf.get("result_backend_transport_options", {}),
        "retry_policy": {**_QUICK_RETRY, "timeout": 0.5},
    }
    conf["broker_transport_options"] = {
        **conf.get("broker_transport_options", {}),
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
    }
    conf["redis_socket_connect_timeout"] = CONNECT_TIMEOUT_S
    app.conf.update(conf)
    return app


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        # A lone userinfo may be taken as the password, so it is masked as well.
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = "&".join(
        f"{name}=***" if name.lower() == "password" else f"{name}{eq}{value}"
        for name, eq, value in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def classify(exc: BaseException) -> tuple[bool, BaseException] | None:
    """``(worth retrying, the Redis-level error)`` behind ``exc``, or None if Redis is not involved.

    Celery and kombu wrap connection failures (in RuntimeError, OperationalError), so the
    whole cause chain is searched. Wrong credentials and refused commands are not retried.
    """
    chain = cause_chain(exc)
    for error in chain:
        if isinstance(error, _FINAL) and not isinstance(error, _BUSY):
            return False, error
    transient = [error for error in chain if isinstance(error, _TRANSIENT)]
    if transient:
        return True, next((e for e in transient if isinstance(e, redis.RedisError)), transient[0])
    broker = [error for error in chain if isinstance(error, redis.RedisError | KombuError)]
    return (False, broker[0]) if broker else None


def describe(problem: BaseException, url: str) -> str:
    """``"ConnectionError: Connection refused"``: the error's type and its plainest reason."""
    detail = str(problem)
    for error in cause_chain(problem)[1:]:
        if isinstance(error, OSError) and (error.errno or error.strerror):
            # asyncio words a refused connect as "Connect call failed (host, port)".
            detail = os.strerror(error.errno) if error.errno else str(error.strerror)
            break
    text = f"{type(problem).__name__}: {detail}".strip()
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def outage_text(problem: BaseException, url: str) -> str:
    """``"Redis at redis://… unavailable: ConnectionError: …"`` for a wait's error message."""
    found = classify(problem)
    return (
        f"Redis at {redact_url(url)} unavailable: {describe(found[1] if found else problem, url)}"
    )


def cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first (Celery and kombu wrap Redis errors)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _secrets(url: str) -> list[str]:
    """Everything :func:`redact_url` masks, so messages can be scrubbed of it too."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    found = [userinfo.partition(":")[2] or userinfo]
    found += [
        value
        for name, _, value in (pair.partition("=") for pair in parts.query.split("&"))
        if name.lower() == "password"
    ]
    return [secret for secret in found if len(secret) >= 3]


class OutageBudget:
    """How long one submission may wait out a Redis outage, shared by all of its steps."""

    def __init__(self, settings: Settings) -> None:
        self.limit_s = settings.submit_retry_s
        self.url = settings.redis_url
        self._since: float | None = None
        self._pause = RETRY_FIRST_S

    async def run(self, step: Callable[[], Awaitable[T]], enqueued: tuple[str, ...] = ()) -> T:
        """``await step()``, retried on connection problems until the budget is spent."""
        while True:
            try:
                return await step()
            except Exception as exc:
                await self.failed(exc, enqueued)

    async def failed(self, exc: Exception, enqueued: tuple[str, ...] = ()) -> None:
        """Pause before the next try; re-raise ``exc`` if it is not Redis's, or give up."""
        found = classify(exc)
        if found is None:
            raise exc
        transient, problem = found
        now = time.monotonic()
        if self._since is None:
            self._since = now
            if transient and self.limit_s > 0:
                log.warning(
                    "Redis at %s unavailable (%s); retrying for up to %.1f s",
                    redact_url(self.url),
                    describe(problem, self.url),
                    self.limit_s,
                )
        waited = now - self._since
        where = f"Redis at {redact_url(self.url)}"
        reason = describe(problem, self.url)
        if not transient:
            raise BrokerUnavailable(f"{where} refused the request ({reason})", enqueued) from None
        if waited >= self.limit_s:
            raise BrokerUnavailable(
                f"{where} unavailable for {waited:.1f} s ({reason})", enqueued
            ) from None
        await asyncio.sleep(min(self._pause, self.limit_s - waited))
        self._pause = min(self._pause * 2, RETRY_CAP_S)


class _Breaker:
    """While Redis is failing, one publishing thread at a time tries it; other steps fail at
    once and retry after their pause. Without this, steps queued behind attempts that wait for
    a connect timeout would outlast their submissions' budgets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problem: Exception | None = None
        self._probing = False

    def enter(self) -> bool:
        """Whether this attempt is the probe; raises (caused by the problem) if it must wait."""
        with self._lock:
            if self._problem is None:
                return False
            if self._probing:
                raise RuntimeError("Redis unavailable (another attempt is trying it)") from (
                    self._problem
                )
            self._probing = True
            return True

    def leave(self, probe: bool, ok: bool, problem: BaseException | None) -> None:
        with self._lock:
            if probe:
                self._probing = False
            if ok:
                self._problem = None
            elif isinstance(problem, Exception) and classify(problem) is not None:
                self._problem = problem

    def attempt(self, step: Callable[[], T]) -> T:
        probe = self.enter()
        ok, problem = False, None
        try:
            result = step()
            ok = True
            return result
        except BaseException as exc:
            problem = exc
            raise
        finally:
            self.leave(probe, ok, problem)


class Core:
    """Everything both clients do; its coroutines run on one event loop at a time."""

    def __init__(self, settings: Settings, publish: Publish | None = None) -> None:
        self.settings = settings
        self.app = make_app(settings)
        self._publish = publish or self.publish_one
        # Pending records are written from the publishing threads, so a blocking client.
        self._redis = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
        )
        self._pool = ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="coalesce-publish")
        self._breaker = _Breaker()
        self._listener: Listener | None = None
        self._budgets = Budgets.from_settings(settings, self._redis)  # None without rules

    # --- validation (the same for both clients) ------------------------------------------------

    def prompt_request(self, prompt: str, **fields: Any) -> Request:
        """A prompt-form request; InvalidRequest (a ValueError) for bad input."""
        return validate_request(self.settings, {"prompt": prompt, **fields})

    def chat_request(
        self,
        messages: Any,
        model: str,
        tenant: str | None,
        params: Mapping[str, Any],
        cache: CacheOption = None,
        tags: Mapping[str, str] | None = None,
    ) -> Request:
        """An OpenAI-shaped chat request; every other body field is passed on as given."""
        fields = {**params, "messages": messages, "model": model, "tenant": tenant}
        if cache is not None:
            fields["cache"] = cache
        if tags is not None:
            fields["tags"] = tags
        return validate_request(self.settings, fields)

    def requests(self, items: Iterable[Request | Mapping[str, Any]]) -> list[Request]:
        """Validate every item first, so one bad item enqueues nothing."""
        requests = []
        for index, item in enumerate(items):
            try:
                requests.append(validate_request(self.settings, item))
            except InvalidRequest as exc:
                raise InvalidRequest(f"item {index}: {exc}") from None
        return requests

    # --- submitting ----------------------------------------------------------------------------

    async def send(self, requests: list[Request]) -> list[str]:
        """Record, then enqueue, each request under one task id it keeps across retries."""
        items = [(str(uuid.uuid4()), request.model_dump()) for request in requests]
        ids = [task_id for task_id, _ in items]
        budget = OutageBudget(self.settings)
        spend = self._budgets
        if spend is not None:  # spend held first: a request over a hard budget is never enqueued
            hold = functools.partial(spend.reserve_requests, list(zip(ids, requests, strict=True)))
            await budget.run(functools.partial(self._blocking, self._breaker.attempt, hold))
        # Recorded first, so the reaper can re-send a request whose message is lost (_pending).
        record = functools.partial(_pending.record_many, self._redis, items)
        sent = 0
        try:
            await budget.run(functools.partial(self._blocking, self._breaker.attempt, record))
            while sent < len(items):
                sent, problem = await self._blocking(self._publish_from, items, sent)
                if problem is not None:
                    await budget.failed(problem, tuple(ids[:sent]))
        except BrokerUnavailable:
            await self._blocking(self._forget_pending, ids[sent:])
            if spend is not None:
                await self._blocking(spend.release_quietly, ids[sent:], self._breaker.attempt)
            raise
        return ids

    def publish_one(self, task_id: str, payload: dict[str, Any]) -> object:
        return send_request(self.app, self.settings, payload, task_id=task_id)

    def _publish_from(
        self, items: list[tuple[str, dict[str, Any]]], start: int
    ) -> tuple[int, Exception | None]:
        """Publish ``items[start:]`` in order (one pool job); how far it got, and why it stopped."""
        for index in range(start, len(items)):
            try:
                self._breaker.attempt(functools.partial(self._publish, *items[index]))
            except Exception as exc:
                return index, exc
        return len(items), None

    def _forget_pending(self, task_ids: list[str]) -> None:
        """Best effort: the caller was told these were not enqueued, so the reaper must not
        send them later. If Redis is still away (or another thread is finding out) the records
        stay, and the reaper may."""
        if not task_ids:
            return
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrem(_pending.PENDING, *task_ids)
        pipe.hdel(_pending.PAYLOADS, *task_ids)
        with suppress(redis.RedisError, OSError, RuntimeError):
            self._breaker.attempt(pipe.execute)

    async def _blocking(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, *args)

    # --- the caches ----------------------------------------------------------------------------

    async def cache_stats(self, tenant: str | None, namespace: str | None) -> CacheStats:
        call = functools.partial(read_cache_stats, self._redis, tenant=tenant, namespace=namespace)
        return await OutageBudget(self.settings).run(lambda: self._blocking(call))

    async def clear_cache(self, tenant: str | None, namespace: str | None) -> int:
        call = functools.partial(clear_cache, self._redis, tenant=tenant, namespace=namespace)
        return await OutageBudget(self.settings).run(lambda: self._blocking(call))

    # --- waiting -------------------------------------------------------------------------------

    @property
    def listener(self) -> Listener:
        """The one listener of this core, made on first use on the running loop."""
        if self._listener is None:
            self._listener = Listener(self.settings.redis_url, self._decode)
        return self._listener

    def result_channel(self, task_id: str) -> str:
        """The key Celery stores the result at, and the channel it publishes it on."""
        key = self.app.backend.get_key_for_task(task_id)
        return key.decode() if isinstance(key, bytes) else str(key)

    async def wait(self, task_id: str, timeout: float | None) -> Answer:
        """The answer; RequestFailed if the worker gave up, RequestTimeout after ``timeout`` s."""
        listener = self.listener
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can lose a caller's cancellation.
            async with asyncio.timeout(timeout):
                state, value = await listener.result(self.result_channel(task_id))
        except TimeoutError:
            raise self._timed_out(f"no answer for request {task_id}", timeout) from None
        return finish(task_id, state, value)

    def _timed_out(self, what: str, timeout: float | None) -> RequestTimeout:
        """``what`` within ``timeout`` s, with the Redis outage that explains it, if any."""
        listener = self.listener
        problem = listener.problem
        outage = f" ({outage_text(problem, listener.url)})" if problem else ""
        return RequestTimeout(f"{what} within {timeout} s{outage}")

    async def wait_many(
        self, task_ids: Sequence[str], timeout: float | None, *, return_exceptions: bool
    ) -> list[Answer | CoalesceError]:
        """Every answer, in order, within one ``timeout`` for all of them.

        All waits start together, so the listener subscribes them in one command and reads
        any already stored in one MGET per 500, instead of a round trip or two per request.
        Without ``return_exceptions`` the first failure in order is raised once all are in.
        """
        try:
            async with asyncio.timeout(timeout):
                outcomes = await asyncio.gather(
                    *(self.wait(task_id, None) for task_id in task_ids), return_exceptions=True
                )
        except TimeoutError:
            what = f"not every answer of {len(task_ids)} requests"
            raise self._timed_out(what, timeout) from None
        results: list[Answer | CoalesceError] = []
        for outcome in outcomes:
            if isinstance(outcome, CoalesceError):
                if not return_exceptions:
                    raise outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome)
        return results

    async def ready(self, task_id: str) -> bool:
        """Whether a result is stored; BrokerUnavailable if Redis cannot be asked."""
        listener = self.listener
        try:
            raw = await listener.redis.get(self.result_channel(task_id))
        except Exception as exc:
            if classify(exc) is None:
                raise
            reason = outage_text(exc, listener.url)
            raise BrokerUnavailable(f"cannot check request {task_id}: {reason}") from None
        if raw is None:
            return False
        return self._decode(raw if isinstance(raw, bytes) else raw.encode()) is not None

    def _decode(self, raw: bytes) -> Outcome | None:
        """A stored result as ``(state, value)``, or None while it is not final."""
        try:
            meta = self.app.backend.decode_result(raw)
        except Exception as exc:  # a result no Celery would write: report, do not hang
            return states.FAILURE, RuntimeError(f"unreadable result ({type(exc).__name__})")
        status = meta.get("status")
        return (str(status), meta.get("result")) if status in states.READY_STATES else None

    async def aclose(self) -> None:
        if self._listener is not None:
            await self._listener.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.app.close()
        self._redis.close()


def finish(task_id: str, state: str, value: object) -> Answer:
    """A final result as the app sees it: the Answer, or RequestFailed with the worker's reason."""
    if state != states.SUCCESS:
        raise RequestFailed(f"request {task_id} failed: {type(value).__name__}: {value}")
    return Answer.model_validate(value)
