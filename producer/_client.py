"""The client an app imports: validate, enqueue one Celery task per request, wait for its answer."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from pydantic import ValidationError

from . import _pending
from ._celeryconf import TASK_NAME, celery_config
from ._exceptions import InvalidRequest, RequestFailed, RequestTimeout
from ._models import Answer, Request
from ._settings import Settings, get_settings


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def build_request(settings: Settings, data: Request | Mapping[str, Any]) -> Request:
    """Validate one request against the model and the configured size limit."""
    try:
        request = data if isinstance(data, Request) else Request.model_validate(dict(data))
    except ValidationError as exc:
        raise InvalidRequest(_validation_message(exc)) from None
    if len(request.prompt) > settings.max_prompt_chars:
        raise InvalidRequest(
            f"invalid request: prompt is {len(request.prompt)} characters, over the limit of "
            f"{settings.max_prompt_chars} (COALESCE_MAX_PROMPT_CHARS)"
        )
    return request


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


@dataclass(frozen=True)
class Ticket:
    """A handle on one enqueued request; ``id`` is its Celery task id."""

    id: str
    _result: AsyncResult

    def ready(self) -> bool:
        return bool(self._result.ready())

    def get(self, timeout: float | None = None) -> Answer:
        """Block until the answer is stored; raise RequestFailed if the worker gave up."""
        try:
            value = self._result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeoutError:
            raise RequestTimeout(f"no answer for request {self.id} within {timeout} s") from None
        if self._result.state != "SUCCESS":
            raise RequestFailed(f"request {self.id} failed: {type(value).__name__}: {value}")
        return Answer.model_validate(value)


class Client:
    """Submit prompts to the coalesce queue. Thread-safe; one per process is enough."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if redis_url is not None:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        self._app = Celery("coalesce-producer", set_as_current=False)
        self._app.conf.update(celery_config(self.settings))
        self._redis = redis.Redis.from_url(self.settings.redis_url)

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
        """Enqueue one prompt; raises InvalidRequest (a ValueError) before enqueueing bad input."""
        fields = {
            "prompt": prompt,
            "model": model,
            "system": system,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "tenant": tenant,
        }
        return self._send([build_request(self.settings, fields)])[0]

    def submit_many(self, items: Iterable[Request | Mapping[str, Any]]) -> list[Ticket]:
        """Validate every item first, so one bad item enqueues nothing; then enqueue all."""
        requests = []
        for index, item in enumerate(items):
            try:
                requests.append(build_request(self.settings, item))
            except InvalidRequest as exc:
                raise InvalidRequest(f"item {index}: {exc}") from None
        return self._send(requests)

    def _send(self, requests: list[Request]) -> list[Ticket]:
        items = [(str(uuid.uuid4()), request.model_dump()) for request in requests]
        _pending.record_many(self._redis, items)  # before enqueueing: see _pending
        return [
            Ticket(task_id, send_request(self._app, self.settings, payload, task_id=task_id))
            for task_id, payload in items
        ]

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
