"""The client an app imports: validate, enqueue one Celery task per request, wait for its answer.

Redis may restart under a running app. Submitting retries connection problems for
``COALESCE_SUBMIT_RETRY_S`` and then raises :class:`BrokerUnavailable`; waiting for an answer
keeps reading the result by task id until the caller's timeout. Neither lets a raw redis or
kombu exception reach the app.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
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
from ._celeryconf import TASK_NAME, celery_config
from ._exceptions import BrokerUnavailable, InvalidRequest, RequestFailed, RequestTimeout
from ._models import Answer, Request
from ._settings import Settings, get_settings
from ._validate import validate_request

log = logging.getLogger("coalesce.producer")

T = TypeVar("T")

build_request = validate_request  # its name before the worker shared it; kept for callers

RETRY_FIRST_S = 0.05  # first pause after a failed submit step; doubles up to RETRY_CAP_S
RETRY_CAP_S = 1.0
POLL_CAP_S = 0.5  # longest pause between result reads while Redis is away
WAIT_SLICE_S = 1.0  # a wait re-reads the result this often, so a lost subscription costs <= 1 s
CONNECT_TIMEOUT_S = 2.0  # an unreachable host must not eat the whole retry budget in connect()

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
) -> AsyncResult:
    """Enqueue one request as a ``coalesce.ask`` task; the producer and the reaper both use it."""
    options: dict[str, Any] = {"queue": settings.queue, "task_id": task_id}
    if not settings.log_prompts:
        # What Flower and worker logs show instead of the prompt text.
        options["argsrepr"] = f"(<{len(payload['prompt'])} chars, model={payload['model']}>)"
        options["kwargsrepr"] = "{}"
    kwargs = {"resent": True} if resent else {}
    return app.send_task(TASK_NAME, args=[payload], kwargs=kwargs, **options)


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
    chain = _chain(exc)
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
    for error in _chain(problem)[1:]:
        if isinstance(error, OSError) and error.strerror:
            detail = error.strerror
            break
    text = f"{type(problem).__name__}: {detail}".strip()
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def _chain(exc: BaseException) -> list[BaseException]:
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


class _OutageBudget:
    """How long one submission may wait out a Redis outage, shared by all of its steps."""

    def __init__(self, settings: Settings) -> None:
        self.limit_s = settings.submit_retry_s
        self.url = settings.redis_url
        self._since: float | None = None
        self._pause = RETRY_FIRST_S

    def run(self, step: Callable[[], T], enqueued: tuple[str, ...] = ()) -> T:
        """``step()``, retried on connection problems until the budget is spent."""
        while True:
            try:
                return step()
            except Exception as exc:
                found = classify(exc)
                if found is None:
                    raise
                self._pause_or_give_up(*found, enqueued)

    def _pause_or_give_up(
        self, transient: bool, problem: BaseException, enqueued: tuple[str, ...]
    ) -> None:
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
        time.sleep(min(self._pause, self.limit_s - waited))
        self._pause = min(self._pause * 2, RETRY_CAP_S)


@dataclass(frozen=True)
class Ticket:
    """A handle on one enqueued request; ``id`` is its Celery task id."""

    id: str
    _result: AsyncResult

    def ready(self) -> bool:
        """Whether a result is stored; BrokerUnavailable if Redis cannot be asked."""
        try:
            return bool(self._result.ready())
        except Exception as exc:
            self._raise_unless_redis(exc)
            raise BrokerUnavailable(
                f"cannot check request {self.id}: {self._outage(exc)}"
            ) from None

    def get(self, timeout: float | None = None) -> Answer:
        """The answer; RequestFailed if the worker gave up, RequestTimeout after ``timeout`` s.

        A Redis restart meanwhile is waited out: the result is read by task id until it
        appears or the timeout passes, so it may be stored while this producer is cut off.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        problem: BaseException | None = None
        pause = RETRY_FIRST_S
        while True:
            try:
                done = (
                    self._read_after_outage()
                    if problem is not None
                    else self._wait(_left(deadline))
                )
                problem, pause = None, RETRY_FIRST_S
            except Exception as exc:
                self._raise_unless_redis(exc)
                problem, done = exc, None
            if done is not None:
                return self._finish(*done)
            left = _left(deadline)
            if left is not None and left <= 0:
                outage = f" ({self._outage(problem)})" if problem else ""
                raise RequestTimeout(f"no answer for request {self.id} within {timeout} s{outage}")
            if problem is not None:
                time.sleep(pause if left is None else min(pause, left))
                pause = min(pause * 2, POLL_CAP_S)

    def _wait(self, left: float | None) -> tuple[str, object] | None:
        """Wait on the result subscription for at most one slice; None if nothing arrived."""
        # Celery reads a timeout of 0 as "forever", hence the floor.
        slice_s = WAIT_SLICE_S if left is None else max(0.01, min(left, WAIT_SLICE_S))
        try:
            value = self._result.get(timeout=slice_s, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeoutError:
            return None
        return str(self._result.state), value

    def _read_after_outage(self) -> tuple[str, object] | None:
        """Read the stored result directly; if none yet, subscribe afresh for the next wait."""
        meta = self._result.backend.get_task_meta(self.id, cache=False)
        if meta.get("status") in states.READY_STATES:
            return str(meta["status"]), meta.get("result")
        # Celery may have dropped its subscription while Redis was away.
        consumer = getattr(self._result.backend, "result_consumer", None)
        if consumer is not None:
            consumer.cancel_for(self.id)
            consumer.consume_from(self.id)
        return None

    def _finish(self, state: str, value: object) -> Answer:
        if state != states.SUCCESS:
            raise RequestFailed(f"request {self.id} failed: {type(value).__name__}: {value}")
        return Answer.model_validate(value)

    @staticmethod
    def _raise_unless_redis(exc: Exception) -> None:
        if classify(exc) is None:
            raise exc

    def _outage(self, exc: BaseException) -> str:
        url = str(self._result.app.conf.broker_url or "")
        found = classify(exc)
        problem = found[1] if found else exc
        return f"Redis at {redact_url(url)} unavailable: {describe(problem, url)}"


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class Client:
    """Submit prompts to the coalesce queue. Thread-safe; one per process is enough."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if redis_url is not None:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        self._app = Celery("coalesce-producer", set_as_current=False)
        conf = celery_config(self.settings)
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
        self._app.conf.update(conf)
        self._redis = redis.Redis.from_url(
            self.settings.redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),
        )

    def submit(
        self,
        prompt: str,
        *,
        model: str,
        system: str | None = None,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        tenant: str | None = None,
    ) -> Ticket:
        """Enqueue one prompt; InvalidRequest (a ValueError) for bad input, before enqueueing.

        BrokerUnavailable if Redis stays unreachable for ``COALESCE_SUBMIT_RETRY_S``.
        """
        fields = {
            "prompt": prompt,
            "model": model,
            "system": system,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "tenant": tenant,
        }
        return self._send([validate_request(self.settings, fields)])[0]

    def submit_many(self, items: Iterable[Request | Mapping[str, Any]]) -> list[Ticket]:
        """Validate every item first, so one bad item enqueues nothing; then enqueue all."""
        requests = []
        for index, item in enumerate(items):
            try:
                requests.append(validate_request(self.settings, item))
            except InvalidRequest as exc:
                raise InvalidRequest(f"item {index}: {exc}") from None
        return self._send(requests)

    def _send(self, requests: list[Request]) -> list[Ticket]:
        """Record, then enqueue, each request under one task id it keeps across retries."""
        items = [(str(uuid.uuid4()), request.model_dump()) for request in requests]
        budget = _OutageBudget(self.settings)
        budget.run(functools.partial(_pending.record_many, self._redis, items))  # see _pending
        tickets: list[Ticket] = []
        try:
            for task_id, payload in items:
                enqueued = tuple(ticket.id for ticket in tickets)
                result = budget.run(functools.partial(self._publish, task_id, payload), enqueued)
                tickets.append(Ticket(task_id, result))
        except BrokerUnavailable:
            self._forget_pending([task_id for task_id, _ in items[len(tickets) :]])
            raise
        return tickets

    def _forget_pending(self, task_ids: list[str]) -> None:
        """Best effort: the caller was told these were not enqueued, so the reaper must not
        send them later. If Redis is still away the records stay, and the reaper may."""
        with suppress(redis.RedisError, OSError):
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(_pending.PENDING, *task_ids)
            pipe.hdel(_pending.PAYLOADS, *task_ids)
            pipe.execute()

    def _publish(self, task_id: str, payload: dict[str, Any]) -> AsyncResult:
        return send_request(self._app, self.settings, payload, task_id=task_id)

    def ticket(self, task_id: str) -> Ticket:
        """A handle on a request submitted earlier (for example by another process)."""
        return Ticket(task_id, self._app.AsyncResult(task_id))

    def close(self) -> None:
        self._app.close()
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
