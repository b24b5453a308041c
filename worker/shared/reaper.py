"""Re-sends accepted requests whose message was lost, so nothing accepted goes unanswered.

Every request is recorded in ``coalesce:pending`` before it is enqueued (see
``producer/_pending.py``). Every few seconds one worker (whoever holds a short lock) looks at
records older than the bound: those with a stored result are dropped; the rest are sent again
with the same task id. A copy that was only slow, not lost, is answered twice with the same
text: the dedup store and the stored-result check in the task make that harmless.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import redis
from celery import Celery

from producer import Settings
from producer._client import send_request
from producer._pending import PAYLOADS, PENDING

log = logging.getLogger("coalesce.reaper")

LOCK = "coalesce:reaper:lock"


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
        # Past this, a request with no result was lost: kombu would have redelivered it by now.
        self.after_s = settings.visibility_timeout_s * 1.2 + interval_s
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
            except redis.RedisError as exc:
                log.warning("reaper sweep failed: %s", exc)

    def sweep(self, now: float | None = None) -> tuple[int, int]:
        """One pass; returns (records settled, requests re-sent)."""
        now = time.time() if now is None else now
        if not self._redis.set(LOCK, "1", nx=True, px=int(self.interval_s * 1000)):
            return 0, 0
        due = self._redis.zrangebyscore(PENDING, "-inf", now - self.after_s, 0, self.batch)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in due]
        if not ids:
            return 0, 0
        pipe = self._redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.exists(self._app.backend.get_key_for_task(task_id))
        answered = pipe.execute()
        done = [i for i, ok in zip(ids, answered, strict=True) if ok]
        lost = [i for i, ok in zip(ids, answered, strict=True) if not ok]
        if done:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(PENDING, *done)
            pipe.hdel(PAYLOADS, *done)
            pipe.execute()
        for task_id in lost:
            self._resend(task_id, now)
        return len(done), len(lost)

    def _resend(self, task_id: str, now: float) -> None:
        raw = self._redis.hget(PAYLOADS, task_id)
        if raw is None:
            self._redis.zrem(PENDING, task_id)
            return
        self._redis.zadd(PENDING, {task_id: now})
        send_request(self._app, self._settings, json.loads(raw), task_id=task_id, resent=True)
        log.warning("re-sent request %s: no result after %.0f s", task_id, self.after_s)
