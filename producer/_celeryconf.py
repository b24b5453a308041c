"""Celery settings both sides must agree on (serialiser, queue, redelivery bound)."""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend

from ._settings import Settings

TASK_NAME = "coalesce.ask"
PLAIN_TASK_NAME = "coalesce.plain_ask"


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_extended": False,
        "result_expires": settings.result_expires_s,
        "task_default_queue": settings.queue,
        # Workers turn kombu's ack emulation off (worker/app.py) and the reaper re-sends lost
        # requests after the visibility timeout; kept here for any consumer that keeps it on.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        },
        # Storing a result rides out a Redis restart instead of losing the answer.
        "result_backend_transport_options": {
            "retry_policy": {
                "max_retries": 100,
                "interval_start": 0.1,
                "interval_step": 0.2,
                "interval_max": 1.0,
                "timeout": 30.0,
            }
        },
        "broker_connection_retry_on_startup": True,
        "task_send_sent_event": True,
    }


class SendOnlyResults(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend without its SUBSCRIBE on every send.

    Celery subscribes each sent task's result channel at send time so ``AsyncResult.get`` can
    wait on it. Clients here wait through their own listener (one connection for every
    request), so that second subscription per request was never read: a command per send and
    a socket filling with results nobody drains. ``AsyncResult.get`` still works: it
    subscribes when it starts waiting and reads the stored result.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


def send_only_backend(redis_url: str) -> str:
    """``result_backend`` for a process that sends requests but never waits in Celery."""
    return f"{__name__}:SendOnlyResults+{redis_url}"
