"""A worker process's inbox: one Redis list, one listener thread, one future per waiting delivery.

Whoever settles a request (any worker) pushes its outcome to the inbox of the process whose
task thread waits for it. One blocking pop serves every waiting request of the process, so a
thousand waiting requests hold no Redis connection each, and an idle worker costs one command
per ``BLOCK_S``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import secrets
import threading
import time

import redis

from .dedup import Outcome
from .redisconn import TRANSIENT, Backoff

log = logging.getLogger("coalesce.inbox")

PREFIX = "coalesce:inbox:"
BLOCK_S = 30
POP_COUNT = 512


def task_id_of(delivery: str) -> str:
    """The task id inside a delivery id (``<task id>:<worker>:<serial>``)."""
    return delivery.rsplit(":", 2)[0]


class Inbox:
    """Routes outcomes pushed to this process's list to the futures of waiting deliveries."""

    def __init__(self, url: str) -> None:
        self.worker_id = secrets.token_hex(6)
        self.key = PREFIX + self.worker_id
        self._serial = itertools.count()  # unique within the process, which the id names
        # Its own connection: a blocking pop must never wait for, or hold up, the shared pool.
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=BLOCK_S + 10
        )
        self._futures: dict[str, concurrent.futures.Future[Outcome]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coalesce-inbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def new_delivery(self, task_id: str) -> tuple[str, concurrent.futures.Future[Outcome]]:
        """A delivery id for this run of ``task_id`` and the future its outcome will resolve."""
        delivery = f"{task_id}:{self.worker_id}:{next(self._serial)}"
        future: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
        with self._lock:
            self._futures[delivery] = future
        return delivery, future

    def forget(self, delivery: str) -> None:
        with self._lock:
            self._futures.pop(delivery, None)

    @property
    def waiting(self) -> int:
        return len(self._futures)

    def running_tasks(self) -> set[str]:
        """Task ids with a delivery waiting here (a delivery is ``<task id>:<worker>:<n>``)."""
        with self._lock:
            deliveries = list(self._futures)
        return {task_id_of(delivery) for delivery in deliveries}

    def resolve(self, delivery: str, outcome: Outcome) -> None:
        """Resolve a delivery of this process directly (its settler runs here too)."""
        with self._lock:
            future = self._futures.pop(delivery, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    def deliver(self, message: bytes | str) -> None:
        """Resolve the future a pushed ``<delivery>\\n[+]<outcome>`` message is for, if it waits."""
        text = message.decode() if isinstance(message, bytes) else message
        delivery, _, payload = text.partition("\n")
        if delivery not in self._futures:
            return  # its thread gave up, or a second copy of a settled outcome: skip the parse
        stored = payload.startswith("+")  # the settle script stored it as the task's result
        try:
            outcome = Outcome.load(payload[1:] if stored else payload)
        except (ValueError, KeyError) as exc:
            outcome = Outcome(error=f"unreadable outcome ({type(exc).__name__})")
            stored = False
        self.resolve(delivery, outcome.with_result_stored() if stored else outcome)

    def _run(self) -> None:
        backoff: Backoff | None = None
        while not self._stop.is_set():
            try:
                popped = self._redis.blmpop(BLOCK_S, 1, self.key, direction="LEFT", count=POP_COUNT)
            except TRANSIENT as exc:
                backoff = backoff or Backoff("inbox pop", deadline=float("inf"))
                time.sleep(backoff.next_wait(exc))
                continue
            backoff = None
            if popped:
                for message in popped[1]:
                    self.deliver(message if isinstance(message, bytes | str) else str(message))
