"""The task every request runs as: thin, so its logic is testable without Celery."""

from __future__ import annotations

from typing import Any

from celery import Task
from pydantic import ValidationError

from producer import Answer, InvalidRequest, Request
from producer._celeryconf import TASK_NAME

from .app import app, settings
from .pipeline import get_pipeline


def _stored_answer(task_id: str) -> dict[str, Any] | None:
    """The answer a previous delivery of this task already stored, if any."""
    meta = app.backend.get_task_meta(task_id)
    if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict):
        return dict(meta["result"])
    return None


@app.task(name=TASK_NAME, bind=True)
def ask(self: Task, payload: dict[str, Any], resent: bool = False) -> dict[str, Any]:
    # A redelivered or re-sent message (its worker died before acknowledging) may already be
    # answered: return that answer instead of asking again, so a request never gets two texts.
    if resent or (self.request.delivery_info or {}).get("redelivered"):
        stored = _stored_answer(self.request.id)
        if stored is not None:
            return stored
    try:
        request = Request.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid request payload: {exc.error_count()} error(s)") from None
    answer: Answer = get_pipeline(settings).answer(request, self.request.id)
    return answer.model_dump()
