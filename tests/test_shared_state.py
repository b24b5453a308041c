"""The Redis scripts every worker shares, on a real redis-server: dedup, window, inbox, sizer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from celery import Celery

from producer import Answer
from worker.batching.grouping import SIZER, Sizer, SizerPolicy, read_sizer
from worker.batching.window import Item, Limits, Window
from worker.dev.procs import free_port, start_redis
from worker.shared.dedup import Dedup, Outcome
from worker.shared.inbox import Inbox
from worker.shared.redisconn import RedisUnavailable
from worker.shared.scriptpipe import ScriptPipe
from worker.shared.settle import LEASES, Settlement, Settler

pytestmark = pytest.mark.integration

ANSWER = Answer(text="The parcel left the depot.", source="batched", model="gpt-4o-mini")
POLICY = SizerPolicy(max_batch=4)
LIMITS = Limits(window_ms=200, max_batch_tokens=1_000, max_answer_tokens=10_000)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest_asyncio.fixture
async def aclient(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


def item(dedup: Dedup, n: int, *, tokens: int = 10, inbox: str = "coalesce:inbox:test") -> Item:
    """An item whose delivery leads its own key, as a task thread would have made it."""
    key, delivery = secrets.token_hex(8), f"task{n}:w:{secrets.token_hex(2)}"
    assert dedup.claim(key, delivery, inbox).role == "leader"
    payload = {"prompt": f"question {n}", "model": "gpt-4o-mini"}
    return Item(delivery, inbox, key, payload, tokens, 0, time.time() + 30)


# -- dedup ----------------------------------------------------------------------------------


def test_one_leader_per_key_and_two_deliveries_of_one_task_never_both_lead(
    client: redis.Redis,
) -> None:
    dedup = Dedup(client)
    key = secrets.token_hex(8)
    assert dedup.claim(key, "t1:wA:1", "inbox-a").role == "leader"
    assert dedup.claim(key, "t1:wA:1", "inbox-a").role == "leader"  # a retried call: same party
    assert dedup.claim(key, "t1:wB:2", "inbox-b").role == "follower"  # same task, 2nd delivery
    assert client.smembers(f"coalesce:dd:{key}:waiters") == {b"t1:wB:2|inbox-b"}


async def test_settle_stores_the_answer_and_wakes_leader_and_followers(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    dedup, settler = Dedup(client), Settler(aclient, answer_ttl_s=60)
    key = secrets.token_hex(8)
    dedup.claim(key, "lead:w:1", "inbox:a")
    dedup.claim(key, "follow:w:2", "inbox:b")
    settled = await settler.settle([Settlement(key, "lead:w:1", "inbox:a", Outcome(answer=ANSWER))])
    assert settled == 1
    (lead,) = client.lrange("inbox:a", 0, -1)
    (follow,) = client.lrange("inbox:b", 0, -1)
    assert lead.startswith(b"lead:w:1\n") and follow.startswith(b"follow:w:2\n")
    assert Outcome.load(follow.split(b"\n", 1)[1]).answer == ANSWER
    later = dedup.claim(key, "late:w:3", "inbox:c")
    assert later.role == "answer" and later.answer == ANSWER


async def test_settle_stores_the_leaders_celery_result_and_says_so(
    client: redis.Redis, aclient: aioredis.Redis, redis_url: str
) -> None:
    """The leader's caller hears its answer from the settle itself; followers store their own."""
    resolved: dict[str, Outcome] = {}
    settler = Settler(
        aclient,
        answer_ttl_s=60,
        result_expires_s=600,
        own_inbox="inbox:own",
        resolve=lambda delivery, outcome: resolved.setdefault(delivery, outcome),
    )
    dedup = Dedup(client)
    near, far = secrets.token_hex(8), secrets.token_hex(8)
    dedup.claim(near, "near-task:w:1", "inbox:own")
    dedup.claim(near, "follower-task:w:2", "inbox:own")
    dedup.claim(far, "far-task:v:1", "inbox:far")
    other = ANSWER.model_copy(update={"text": "It arrives on Monday."})
    settlements = [
        Settlement(near, "near-task:w:1", "inbox:own", Outcome(answer=ANSWER)),
        Settlement(far, "far-task:v:1", "inbox:far", Outcome(answer=other)),
    ]
    assert await settler.settle(settlements) == 2
    assert resolved["near-task:w:1"].result_stored
    assert not resolved["follower-task:w:2"].result_stored  # a follower's answer is its own
    assert client.get("celery-task-meta-follower-task") is None
    (pushed,) = client.lrange("inbox:far", 0, -1)
    assert pushed.startswith(b"far-task:v:1\n+")  # another process learns it was stored too
    backend = Celery(backend=redis_url, set_as_current=False).backend
    for task_id, answer in (("near-task", ANSWER), ("far-task", other)):
        meta = backend.get_task_meta(task_id)
        assert meta["status"] == "SUCCESS" and meta["task_id"] == task_id
        assert meta["result"] == answer.model_dump()  # what the task itself returns
        assert meta["date_done"] is not None
        assert 0 < client.ttl(f"celery-task-meta-{task_id}") <= 600


async def test_settle_never_overwrites_a_final_result(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    resolved: dict[str, Outcome] = {}
    settler = Settler(
        aclient,
        answer_ttl_s=60,
        own_inbox="inbox:own",
        resolve=lambda delivery, outcome: resolved.setdefault(delivery, outcome),
    )
    key = secrets.token_hex(8)
    Dedup(client).claim(key, "done-task:w:1", "inbox:own")
    failure = b'{"status": "FAILURE", "result": {"exc_type": "UpstreamTimeout"}}'
    client.set("celery-task-meta-done-task", failure)
    await settler.settle([Settlement(key, "done-task:w:1", "inbox:own", Outcome(answer=ANSWER))])
    assert client.get("celery-task-meta-done-task") == failure
    assert not resolved["done-task:w:1"].result_stored  # so the task's own store decides


async def test_settle_is_once_only_and_failures_are_not_kept(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    dedup, settler = Dedup(client), Settler(aclient, answer_ttl_s=60)
    key = secrets.token_hex(8)
    dedup.claim(key, "lead:w:1", "inbox:x")
    failure = Outcome(error="upstream returned 500", kind="UpstreamStatusError")
    s = Settlement(key, "lead:w:1", "inbox:x", failure)
    assert await settler.settle([s]) == 1
    assert await settler.settle([s]) == 0  # a second sender (a taken-over lease) settles nothing
    assert client.llen("inbox:x") == 1
    assert dedup.claim(key, "next:w:2", "inbox:y").role == "leader"  # the failure was not kept


# -- the shared window -----------------------------------------------------------------------


def test_join_waits_then_claims_when_the_group_is_full(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    dedup, window = Dedup(client), Window(client, aclient, LIMITS, POLICY)
    items = [item(dedup, n) for n in range(4)]
    verdicts = [window.join("g1", i, "gpt-4o-mini", f"b{n}") for n, i in enumerate(items)]
    assert [v.action for v in verdicts] == ["wait", "wait", "wait", "batch"]
    assert 0 < verdicts[0].delay_ms <= LIMITS.window_ms
    full = verdicts[-1]
    assert [i.delivery for i in full.items] == [i.delivery for i in items] and full.left == 0
    assert client.zscore(LEASES, full.batch) is not None  # held under a lease


def test_join_claims_at_the_token_budget(client: redis.Redis, aclient: aioredis.Redis) -> None:
    dedup, window = Dedup(client), Window(client, aclient, LIMITS, POLICY)
    first = window.join("g2", item(dedup, 1, tokens=600), "gpt-4o-mini", "b1")
    second = window.join("g2", item(dedup, 2, tokens=600), "gpt-4o-mini", "b2")
    assert first.action == "wait" and second.action == "batch" and len(second.items) == 2


async def test_flush_claims_only_after_the_window_closes(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    dedup, window = Dedup(client), Window(client, aclient, LIMITS, POLICY)
    window.join("g3", item(dedup, 1), "gpt-4o-mini", "b0")
    early = await window.flush("g3", "gpt-4o-mini", "b1")
    assert early.action == "wait" and early.delay_ms > 0
    await asyncio.sleep(early.delay_ms / 1000 + 0.02)
    late, again = (
        await window.flush("g3", "gpt-4o-mini", "b2"),
        await window.flush("g3", "gpt-4o-mini", "b3"),
    )
    assert late.action == "batch" and len(late.items) == 1
    assert again.action == "none"  # exactly one flusher gets the batch


async def test_items_whose_delivery_lost_its_claim_are_dropped(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    dedup, window = Dedup(client), Window(client, aclient, LIMITS, POLICY)
    keep, stale = item(dedup, 1), item(dedup, 2)
    window.join("g4", keep, "gpt-4o-mini", "b0")
    window.join("g4", stale, "gpt-4o-mini", "b0")
    client.delete(f"coalesce:dd:{stale.key}:claim")  # its task gave up or its worker died
    verdict = await window.flush("g4", "gpt-4o-mini", "b1", force=True)
    assert [i.delivery for i in verdict.items] == [keep.delivery]


async def test_a_lapsed_lease_is_taken_over_once(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    dedup, window = Dedup(client), Window(client, aclient, LIMITS, POLICY)
    window.lease_ms = 100
    for n in range(4):
        verdict = window.join("g5", item(dedup, n), "gpt-4o-mini", "dead-sender")
    assert verdict.action == "batch"
    assert (await window.reclaim()).action == "none"  # the lease still runs
    await asyncio.sleep(0.15)
    taken = await window.reclaim()
    assert taken.action == "batch" and taken.batch == "dead-sender" and len(taken.items) == 4
    assert (await window.reclaim()).action == "none"  # renewed for the new sender


# -- inbox ---------------------------------------------------------------------------------


async def test_inbox_routes_pushed_outcomes_to_waiting_deliveries(
    redis_url: str, client: redis.Redis, aclient: aioredis.Redis
) -> None:
    inbox = Inbox(redis_url)
    inbox.start()
    try:
        dedup, settler = Dedup(client), Settler(aclient, answer_ttl_s=60)
        futures = {}
        for n in range(50):
            delivery, future = inbox.new_delivery(f"task{n}")
            key = secrets.token_hex(8)
            dedup.claim(key, delivery, inbox.key)
            futures[delivery] = (key, future)
        await settler.settle(
            [
                Settlement(k, d, inbox.key, Outcome(answer=ANSWER.model_copy(update={"text": d})))
                for d, (k, _) in futures.items()
            ]
        )
        for delivery, (_, future) in futures.items():
            outcome = future.result(timeout=5)
            assert outcome.answer is not None and outcome.answer.text == delivery
    finally:
        inbox.stop()


# -- the shared batch limit -----------------------------------------------------------------


async def test_sizer_halves_on_fallbacks_grows_back_and_is_read_by_join(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    sizer = Sizer(aclient, SizerPolicy(max_batch=8, smoothing=1.0))
    client.delete(SIZER)
    assert await sizer.record("m", 8, 8, 50) == 4  # every answer fell back: halve
    assert await sizer.record("m", 4, 0, 50) == 5  # clean: grow by one
    assert await sizer.record("m", 1, 1, 50) == 0  # a single says nothing about batching
    state = read_sizer(client)["m"]
    assert state["limit"] == 5 and state["answer_tokens"] == 50


async def test_a_model_shrunk_to_one_is_sent_singly_then_probed_after_a_rest(
    client: redis.Redis, aclient: aioredis.Redis
) -> None:
    policy = SizerPolicy(max_batch=4, smoothing=1.0, probe_after_s=0.2)
    sizer, window = Sizer(aclient, policy), Window(client, aclient, LIMITS, policy)
    client.delete(SIZER)
    for size in (4, 2):
        await sizer.record("gpt-4o-mini", size, size, 0)
    dedup = Dedup(client)
    assert window.join("g6", item(dedup, 1), "gpt-4o-mini", "b1").action == "single"
    time.sleep(0.25)
    assert window.join("g6", item(dedup, 2), "gpt-4o-mini", "b2").action == "wait"
    assert read_sizer(client)["gpt-4o-mini"]["limit"] == 2


# -- holders and the reaper ------------------------------------------------------------------


def test_a_workers_held_set_is_replaced_each_tick_and_lapses(client: redis.Redis) -> None:
    from worker.shared.held import HELD, held_by_live_workers, publish_held

    publish_held(client, "a1a1a1", ["t1", "t2"], ttl_s=5)
    publish_held(client, "b2b2b2", ["t3"], ttl_s=0.05)  # a worker that stops refreshing
    publish_held(client, "a1a1a1", ["t2"], ttl_s=5)  # t1 ended (with or without a result)
    time.sleep(0.1)
    assert held_by_live_workers(client) == {"t2"}
    publish_held(client, "a1a1a1", [], ttl_s=5)
    assert client.exists(HELD + "a1a1a1") == 0


def test_the_reaper_resends_only_what_no_live_worker_holds(redis_url: str) -> None:
    """Overdue, not queued: held by a live worker it waits; held by none it is re-sent."""
    from celery import Celery

    from producer import Request, load_settings
    from producer._celeryconf import celery_config
    from producer._pending import PENDING, record
    from worker.shared.held import publish_held
    from worker.shared.reaper import LOCK, Reaper

    settings = load_settings(redis_url=redis_url, queue=f"reaper-{secrets.token_hex(3)}")
    app = Celery("reaper-test", set_as_current=False)
    app.conf.update(celery_config(settings))
    r = redis.Redis.from_url(redis_url)
    reaper = Reaper(r, app, settings)
    payload = Request(prompt="Where is my parcel?", model="gpt-4o-mini").model_dump()
    for task_id in ("held-live", "held-dead"):
        record(r, task_id, payload)
        r.zadd(PENDING, {task_id: time.time() - 3600})
    publish_held(r, "c3c3c3", ["held-live"], ttl_s=30)  # held-dead: its worker is gone
    for _ in range(2):  # missing on two sweeps in a row before it is taken for lost
        r.delete(LOCK)
        reaper.sweep()
    queued = b"".join(r.lrange(settings.queue, 0, -1))
    assert b"held-dead" in queued
    assert b"held-live" not in queued
    app.close()
    r.close()


# -- the worker's result backend ----------------------------------------------------------------


def test_a_stored_result_is_final_and_published_once(redis_url: str) -> None:
    from celery import Celery

    app = Celery("results-test", set_as_current=False)
    app.conf.result_backend = f"worker.shared.results:FinalResults+{redis_url}"
    backend = app.backend
    r = redis.Redis.from_url(redis_url)
    listener = r.pubsub()
    listener.subscribe(backend.get_key_for_task("final-1"))
    listener.get_message(timeout=1)  # the subscribe confirmation
    backend.store_result("final-1", {"text": "first"}, "SUCCESS")
    # Neither may be overwritten by a later copy of the task.
    backend.store_result("final-1", RuntimeError("late copy failed"), "FAILURE")
    backend.store_result("final-2", RuntimeError("upstream refused"), "FAILURE")
    backend.store_result("final-2", {"text": "late"}, "SUCCESS")  # a failure is final too
    first = backend.get_task_meta("final-1", cache=False)
    assert (first["status"], first["result"]) == ("SUCCESS", {"text": "first"})
    assert backend.get_task_meta("final-2", cache=False)["status"] == "FAILURE"
    published = listener.get_message(timeout=1)
    assert published is not None and b'"first"' in published["data"]
    assert listener.get_message(timeout=0.2) is None  # the refused overwrite published nothing
    assert 0 < r.ttl(backend.get_key_for_task("final-1")) <= 86400
    listener.close()
    r.close()
    app.close()


def test_a_task_whose_answer_the_settle_stored_skips_only_that_store(redis_url: str) -> None:
    from celery import Celery

    from worker.shared.results import stored_by_settle

    app = Celery("results-skip-test", set_as_current=False)
    app.conf.result_backend = f"worker.shared.results:FinalResults+{redis_url}"
    backend = app.backend
    r = redis.Redis.from_url(redis_url)
    stored_by_settle("skip-1")
    backend.store_result("skip-1", {"text": "already there"}, "SUCCESS")
    assert r.get(backend.get_key_for_task("skip-1")) is None  # no second write, no round trip
    backend.store_result("skip-2", {"text": "its own"}, "SUCCESS")  # the mark was for skip-1
    assert backend.get_task_meta("skip-2", cache=False)["status"] == "SUCCESS"
    stored_by_settle("skip-3")
    backend.store_result("skip-3", RuntimeError("failed after all"), "FAILURE")  # never skipped
    assert backend.get_task_meta("skip-3", cache=False)["status"] == "FAILURE"
    r.close()
    app.close()


# -- task threads' script calls, pipelined on one loop -----------------------------------------

_ECHO = "redis.call('INCR', KEYS[1]); return {ARGV[1], redis.call('GET', KEYS[1])}"


@contextlib.contextmanager
def script_pipe(url: str) -> Iterator[ScriptPipe]:
    """A ScriptPipe on its own loop thread, as the collector runs it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    aclient = aioredis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        yield ScriptPipe(aclient, loop, _ECHO, "echo test")
    finally:
        asyncio.run_coroutine_threadsafe(aclient.aclose(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_script_calls_from_many_threads_each_get_their_own_reply(
    client: redis.Redis, redis_url: str
) -> None:
    client.script_flush()  # the pipe loads the script when Redis does not know it
    counter = f"pipe-test:{secrets.token_hex(4)}"
    with script_pipe(redis_url) as pipe, concurrent.futures.ThreadPoolExecutor(32) as pool:
        deadline = time.monotonic() + 10
        calls = [pool.submit(pipe.call, [counter], [f"thread {n}"], deadline) for n in range(200)]
        replies = [c.result(timeout=20) for c in calls]
    assert [r[0] for r in replies] == [f"thread {n}".encode() for n in range(200)]
    assert sorted(int(r[1]) for r in replies) == list(range(1, 201))  # each ran exactly once


def test_a_script_call_waits_out_a_redis_restart_and_gives_up_at_its_deadline() -> None:
    port = free_port()
    with script_pipe(f"redis://127.0.0.1:{port}/0") as pipe:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="during echo test"):
            pipe.call(["k"], ["early"], time.monotonic() + 0.5)  # nothing listens on the port
        assert time.monotonic() - started < 3
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(pipe.call, ["k"], ["late"], time.monotonic() + 15)
            time.sleep(0.8)  # Redis comes back while the call retries
            server = start_redis(port)
            try:
                assert waiting.result(timeout=20) == [b"late", b"1"]
            finally:
                server.stop()
