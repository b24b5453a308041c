"""Re-sends accepted requests whose message is really gone, so nothing accepted goes unanswered.

Every request is recorded in ``coalesce:pending`` before it is enqueued (``producer/_pending.py``):
kombu's Redis transport pops a message before it records it as unacknowledged, so a worker
killed in that instant loses it. Every few seconds one worker (whoever holds a short lock) looks
at records older than the bound. Those with a result are dropped. The rest are looked for in the
queue and among unacknowledged messages (which kombu itself redelivers): a request found there
is only waiting, in a backlog or on a live worker, and is left alone for another bound. Only a
request missing from both on two sweeps in a row is re-sent, under its own task id.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import redis
from celery import Celery

from producer import Settings
from producer._client import send_request
from producer._pending import PAYLOADS, PENDING

log = logging.getLogger("coalesce.reaper")

LOCK = "coalesce:reaper:lock"
UNACKED = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, routing key]
_TASK_ID = re.compile(rb'"(?:id|correlation_id)": "([0-9A-Za-z_.:-]{1,200})"')
_SCAN_CHUNK = 1_000


class Reaper:
    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        settings: Settings,
        *,
        interval_s: float = 5.0,
        batch: int = 5_000,
    ) -> None:
        self._redis = client
        self._app = app
        self._settings = settings
        self.interval_s = interval_s
        self.batch = batch
        # Past this, a request with no result may have been lost: kombu would have redelivered it.
        self.after_s = settings.visibility_timeout_s * 1.2 + interval_s
        self._suspects: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coalesce-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
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

    def _present(self) -> set[str]:
        """Task ids in the queue or held unacknowledged (scanned only when something is overdue)."""
        found: set[str] = set()
        start = 0
        while True:
            chunk = self._redis.lrange(self._settings.queue, start, start + _SCAN_CHUNK - 1)
            for raw in chunk:
                found.update(_ids(raw))
            if len(chunk) < _SCAN_CHUNK:
                break
            start += _SCAN_CHUNK
        for raw in self._redis.hvals(UNACKED):
            found.update(_ids(raw))
        return found

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
