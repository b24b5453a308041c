"""The plain integration the benchmark compares against: one Celery task, one upstream call.

``celery -A worker.dev.baseline worker -Q coalesce-plain`` runs it. It is what an app without
coalesce would write (a task calling the OpenAI API directly), kept here only as a yardstick.
"""

from __future__ import annotations

from typing import Any

import httpx
from celery import Celery

from producer import get_settings
from producer._celeryconf import PLAIN_TASK_NAME, celery_config

from ..batching.prompt import build_single_messages

PLAIN_QUEUE = "coalesce-plain"

settings = get_settings()
app = Celery("coalesce-plain", set_as_current=False)
app.conf.update(celery_config(settings))
app.conf.update(
    task_default_queue=PLAIN_QUEUE,
    worker_pool="threads",
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    worker_send_task_events=True,
)

_http = httpx.Client(
    base_url=settings.upstream_url,
    timeout=settings.upstream_timeout_s,
    limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
)


@app.task(name=PLAIN_TASK_NAME)
def plain_ask(payload: dict[str, Any]) -> dict[str, Any]:
    body = {
        "model": payload["model"],
        "messages": build_single_messages(payload["prompt"], system=payload.get("system")),
        "temperature": payload.get("temperature", 0.0),
    }
    response = _http.post("/chat/completions", json=body)
    response.raise_for_status()
    data = response.json()
    return {"text": data["choices"][0]["message"]["content"], "usage": data.get("usage", {})}
