"""Which requests each live worker is running, so the reaper can tell held from lost.

Kombu's ack emulation is off (``worker/app.py``), so Redis keeps no copy of a message a worker
has taken. Instead every worker, on each reaper tick, replaces ``coalesce:held:<worker id>``
with the task ids its threads are running and lets it expire after a few ticks: a dead
worker's set lapses, and a request whose task ended without a stored result (say, a result
written just before Redis lost it) drops out of it. Either way the reaper finds the request
in neither the queue nor a held set, and re-sends it. Costs one pipeline per worker per tick,
nothing per request.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

HELD = "coalesce:held:"  # + worker id: set of the task ids it runs; expires unless refreshed


def publish_held(
    client: redis.Redis, worker_id: str, task_ids: Iterable[str], ttl_s: float
) -> None:
    """Say which requests this worker runs now (and that it is alive)."""
    key = HELD + worker_id
    ids = list(task_ids)
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    if ids:
        pipe.sadd(key, *ids)
        pipe.pexpire(key, int(ttl_s * 1000))
    pipe.execute()


def held_by_live_workers(client: redis.Redis, scan_count: int = 100) -> set[str]:
    """Task ids that some live worker said it runs, at its last tick."""
    found: set[str] = set()
    for key in client.scan_iter(match=HELD + "*", count=scan_count):
        found.update(_text(member) for member in client.smembers(key))
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
