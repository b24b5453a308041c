"""The task every request runs as: thin, so its logic is testable without Celery."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.states import READY_STATES

from producer import Answer
from producer._celeryconf import TASK_NAME
from producer._validate import validate_request

from .app import DAILY_REPORT_TASK, app, settings
from .pipeline import get_pipeline


def _already_final(task_id: str) -> bool:
    """Whether an earlier delivery of this task stored its result (answer or failure)."""
    return app.backend.get_task_meta(task_id).get("status") in READY_STATES


@app.task(name=TASK_NAME, bind=True)
def ask(self: Task, payload: Any, resent: bool = False) -> dict[str, Any]:
    # A redelivered or re-sent message (its worker died before acknowledging, or the reaper
    # found it lost) may already have a final result: never ask again or overwrite it.
    if (resent or (self.request.delivery_info or {}).get("redelivered")) and _already_final(
        self.request.id
    ):
        raise Ignore()
    # The same checks as the producer's, for payloads sent by any Celery client.
    request = validate_request(settings, payload)
    answer: Answer = get_pipeline(settings).answer(request, self.request.id)
    return answer.model_dump()


@app.task(name=DAILY_REPORT_TASK)
def daily_report() -> str:
    """Yesterday's (UTC) report to ``COALESCE_DAILY_REPORT_PATH`` and/or the webhook.

    Scheduled by Celery beat (``coalesce beat``) at 00:05 UTC when either is set.
    """
    import redis

    from .ledger.report import write_daily_report, yesterday

    day = yesterday()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        write_daily_report(
            client,
            day=day,
            path=settings.daily_report_path,
            webhook=settings.daily_report_webhook,
        )
    finally:
        client.close()
    return day.isoformat()
