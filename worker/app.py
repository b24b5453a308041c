"""The Celery app: ``celery -A worker.app worker`` (or ``coalesce worker``) runs a worker.

Each request is its own task, so Flower, events and the result backend see every request;
the batching happens behind the task, in the process's collector. The pool is a thread pool
because a task mostly waits for its batch: one slot per request in flight.
"""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery, signals
from celery.app import trace
from celery.schedules import crontab

from producer import get_settings
from producer._celeryconf import celery_config

settings = get_settings()
settings.check_worker()

app = Celery("coalesce", include=["worker.tasks"])
app.conf.update(celery_config(settings))
# One script per stored result, and a final result is never overwritten (shared/results.py).
app.conf.result_backend = f"worker.shared.results:FinalResults+{settings.redis_url}"
app.conf.update(
    worker_pool="threads",
    worker_concurrency=settings.worker_concurrency,
    # One message per slot: a reserved message's visibility clock runs while it waits.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Kombu's ack emulation records every message in Redis on receipt and again on ack: two
    # transactions on the one thread that takes in every message, which capped a worker's
    # intake. Lost messages are found by the reaper instead (``shared/reaper.py``): every
    # request is recorded before it is enqueued, and each running one names its live worker.
    broker_transport_options={
        **app.conf.broker_transport_options,
        "ack_emulation": False,
    },
    worker_send_task_events=True,
    # Task events go out in one publish per 50 ms instead of about one per two events.
    worker_consumer="worker.consumer:BatchedEventsConsumer",
    task_track_started=False,
    worker_hijack_root_logger=False,
)

DAILY_REPORT_TASK = "coalesce.daily_report"
if settings.daily_report_path or settings.daily_report_webhook:
    # ``coalesce beat`` (celery beat) sends it; any worker runs it.
    app.conf.beat_schedule = {
        "daily-report": {
            "task": DAILY_REPORT_TASK,
            "schedule": crontab(hour=0, minute=5),
            "options": {"queue": settings.queue},
        }
    }
    app.conf.timezone = "UTC"

# Celery logs a task's return value on success; ours contains the model's answer.
trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
_saferepr = trace.saferepr


def _result_repr(value: Any, maxlen: int | None = None) -> str:
    """What logs and the task-succeeded event (so Flower) show of a result: no answer text.

    Source, batch, tokens and cost stay visible; the text is replaced by its length unless
    ``COALESCE_LOG_PROMPTS`` is on.
    """
    if isinstance(value, dict) and isinstance(value.get("text"), str) and not settings.log_prompts:
        # An Answer's dict is flat, so the builtin repr is safe and much cheaper than saferepr.
        hidden: dict[str, Any] = {**value, "text": f"<{len(value['text'])} chars>"}
        message = value.get("message")
        if isinstance(message, dict):  # a passthrough reply: content and tool-call arguments
            calls = message.get("tool_calls") or []
            hidden["message"] = f"<message, {len(calls)} tool calls>"
        shown = repr(hidden)
        return shown if maxlen is None else shown[:maxlen]
    return str(_saferepr(value, maxlen))


trace.saferepr = _result_repr


def _reuse_kombu_redis_clients() -> None:
    """Make kombu's Redis channel reuse one client per connection pool.

    Kombu builds a new ``redis.Redis`` for every ack and every event it publishes, and with
    redis-py 5+ building one is costly (a quarter of a busy worker's CPU here). A client is
    thread-safe and holds no connection itself, so one per pool is enough; a new pool (after a
    reconnect) gets a new client.
    """
    from kombu.transport import redis as kombu_redis

    original: Any = kombu_redis.Channel._create_client

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        pool = self.pool
        cached = self.__dict__.get("_coalesce_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, original(self))
            self.__dict__["_coalesce_client"] = cached
        return cached[1]

    setattr(kombu_redis.Channel, "_create_client", _create_client)  # noqa: B010


_reuse_kombu_redis_clients()


@signals.worker_ready.connect
def _warm_up(**_: Any) -> None:
    """Build the pipeline (tokenizer, Redis scripts, HTTP pool) before the first request waits."""
    from .pipeline import get_pipeline
    from .shared.reaper import Reaper
    from .tokens import count_tokens

    pipeline = get_pipeline(settings)
    count_tokens("warm up")
    # What start-up built lives as long as the process: keep the collector from walking it
    # on every full collection (about 5% of a busy worker's CPU here).
    gc.freeze()
    inbox = pipeline.inbox
    Reaper(
        pipeline.redis, app, settings, worker_id=inbox.worker_id, running=inbox.running_tasks
    ).start()


@signals.worker_shutting_down.connect
def _flush_on_shutdown(**_: Any) -> None:
    """Warm shutdown: send what the collector holds now so running tasks can finish."""
    from .pipeline import current_pipeline

    pipeline = current_pipeline()
    if pipeline is not None:
        pipeline.collector.flush_all()
