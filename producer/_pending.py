"""The record of accepted requests that lets workers re-send one whose message was lost.

Kombu's Redis transport pops a message before it records it as unacknowledged, so a worker
killed in that instant loses the message. Every accepted request is therefore also written
here, before it is enqueued; workers' reaper (``worker/reaper.py``) re-sends any request
that has neither a result nor been settled after a bound.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

PENDING = "coalesce:pending"  # sorted set: task id -> time enqueued (or last re-sent)
PAYLOADS = "coalesce:pending:payloads"  # hash: task id -> the task's payload


def record(client: redis.Redis, task_id: str, payload: dict[str, Any]) -> None:
    record_many(client, [(task_id, payload)])


def record_many(client: redis.Redis, items: list[tuple[str, dict[str, Any]]]) -> None:
    """One round trip for a whole submission."""
    if not items:
        return
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.hset(PAYLOADS, mapping={task_id: json.dumps(payload) for task_id, payload in items})
    pipe.zadd(PENDING, {task_id: now for task_id, _ in items})
    pipe.execute()
