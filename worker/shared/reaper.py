"""Re-sends accepted requests whose message is really gone, so nothing accepted goes unanswered.

Every request is recorded in ``coalesce:pending`` before it is enqueued (``producer/_pending.py``).
A worker takes a message off the queue for good (kombu's ack emulation is off), so a killed
worker's messages exist nowhere else. Every few seconds one worker (whoever holds a short lock)
looks at records older than the bound. Those with a result are dropped. The rest are looked for
in the queue and among the requests held by live workers (``shared/held.py``): a request found
there is only waiting, in a backlog or on a live worker, and is left alone for another bound.
Only a request missing from both on two sweeps in a row is re-sent, under its own task id.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable

import redis
from celery import Celery

from producer import Settings
from producer._client import send_request
from producer._pending import PAYLOADS, PENDING

from .held import held_by_live_workers, publish_held

log = logging.getLogger("coalesce.reaper")

LOCK = "coalesce:reaper:lock"
_TASK_ID = re.compile(rb'"(?:id|correlation_id)": "([0-9A-Za-z_.:-]{1,200})"')
_SCAN_CHUNK = 1_000


class Reaper:
    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        settings: Settings,
        *,
        worker_id: str | None = None,
        running: Callable[[], Iterable[str]] | None = None,
        interval_s: float = 5.0,
        batch: int = 5_000,
    ) -> None:
        self._redis = client
        self._app = app
        self._settings = settings
        self.interval_s = interval_s
        self.batch = batch
        self.worker_id = worker_id  # None: a reaper that only sweeps (tests, tools)
        self._running = running  # the task ids this worker's threads run now
        # Past this a request with no result is looked for; only one found nowhere on two
        # sweeps in a row is re-sent, so a request between queue and held set is never taken.
        self.after_s = settings.visibility_timeout_s
        self._suspects: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coalesce-reaper", daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()
            try:
                self.sweep()
            except Exception as exc:  # a Redis or broker outage: the next sweep tries again
                log.warning("reaper sweep failed: %s", type(exc).__name__)

    def sweep(self, now: float | None = None) -> tuple[int, int]:
        """One pass; returns (records settled, requests re-sent)."""
        now = time.time() if now is None else now
        if not self._redis.set(LOCK, "1", nx=True, px=int(self.interval_s * 1000)):
            return 0, 0
        due = self._redis.zrangebyscore(PENDING, "-inf", now - self.after_s, 0, self.batch)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in due]
        if not ids:
            self._suspects.clear()
            return 0, 0
        pipe = self._redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.exists(self._app.backend.get_key_for_task(task_id))
        answered = pipe.execute()
        done = [i for i, ok in zip(ids, answered, strict=True) if ok]
        open_ids = {i for i, ok in zip(ids, answered, strict=True) if not ok}
        if done:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(PENDING, *done)
            pipe.hdel(PAYLOADS, *done)
            pipe.execute()
        if not open_ids:
            return len(done), 0
        waiting = open_ids & self._present()
        if waiting:  # queued or held: only slow; look again after another bound
            self._redis.zadd(PENDING, dict.fromkeys(waiting, now))
        missing = open_ids - waiting
        lost = missing & self._suspects
        self._suspects = missing - lost
        for task_id in sorted(lost):
            self._resend(task_id, now)
        return len(done), len(lost)

    def _beat(self) -> None:
        """Say which requests this worker runs, so they are not taken for lost."""
        if self.worker_id is None or self._running is None:
            return
        try:
            publish_held(self._redis, self.worker_id, self._running(), ttl_s=self.interval_s * 4)
        except redis.RedisError as exc:
            log.warning("worker heartbeat failed: %s", type(exc).__name__)

    def _present(self) -> set[str]:
        """Task ids in the queue or held by live workers (read only when something is overdue)."""
        found: set[str] = set()
        start = 0
        while True:
            chunk = self._redis.lrange(self._settings.queue, start, start + _SCAN_CHUNK - 1)
            for raw in chunk:
                found.update(_ids(raw))
            if len(chunk) < _SCAN_CHUNK:
                break
            start += _SCAN_CHUNK
        return found | held_by_live_workers(self._redis)

    def _resend(self, task_id: str, now: float) -> None:
        raw = self._redis.hget(PAYLOADS, task_id)
        if raw is None:
            self._redis.zrem(PENDING, task_id)
            return
        self._redis.zadd(PENDING, {task_id: now})
        send_request(self._app, self._settings, json.loads(raw), task_id=task_id, resent=True)
        log.warning("re-sent request %s: its message was lost", task_id)


def _ids(raw: bytes | str) -> set[str]:
    data = raw.encode() if isinstance(raw, str) else raw
    return {m.decode() for m in _TASK_ID.findall(data)}
