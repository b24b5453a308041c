"""The benchmark's accounting: Redis command counts, CPU of process trees, percentiles, tables.

Real processes and a real redis-server; these figures end up in the README, so they must count
what they claim (script-internal calls, reaped grandchildren) and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis

from producer import Answer
from worker.dev.bench.common import FakeStats, table
from worker.dev.bench.load import Outcome, Run
from worker.dev.bench.meters import Meter, percentile, redis_commands, tree_cpu_s
from worker.dev.fakellm import expected_answer
from worker.dev.procs import Proc, start_redis
from worker.dev.workload import WorkItem

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[Proc]:
    proc = start_redis()
    yield proc
    proc.stop()


def test_percentile_interpolates_and_handles_edges() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(map(float, range(101))), 90) == 90.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_redis_commands_count_script_calls_and_meter_skips_its_own_info(
    redis_proc: Proc,
) -> None:
    client = redis.Redis.from_url(redis_proc.url)
    before = redis_commands(client)
    for n in range(10):
        client.set(f"k{n}", n)
    client.eval("redis.call('GET', 'k1'); redis.call('GET', 'k2'); return 1", 0)
    # 10 SETs, the EVAL and its 2 GETs, plus the first INFO (counted after it ran)
    assert redis_commands(client) - before == 10 + 1 + 2 + 1

    meter = Meter(client, worker_pids=[], redis_pid=redis_proc.pid)
    meter.start()
    client.set("x", 1)
    client.set("y", 2)
    client.get("x")
    usage = meter.stop()
    assert usage.redis_commands == 3
    assert usage.top_commands() == [("set", 2), ("get", 1)]
    client.close()


def test_tree_cpu_counts_live_and_reaped_grandchildren() -> None:
    # A parent that starts a child burning 0.4 s of CPU, reaps it, then sleeps.
    script = (
        "import subprocess, sys, time\n"
        f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.4)!r}], check=True)\n"
        "print('done', flush=True)\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        start = tree_cpu_s([parent.pid])
        assert parent.stdout is not None and parent.stdout.readline().strip() == "done"
        used = tree_cpu_s([parent.pid]) - start
        assert 0.35 <= used < 1.5, used
        assert tree_cpu_s([]) == 0.0
    finally:
        parent.kill()
        parent.wait()


def test_meter_reports_worker_cpu_of_a_busy_process(redis_proc: Proc) -> None:
    client = redis.Redis.from_url(redis_proc.url)
    child = subprocess.Popen([sys.executable, "-c", BURN.format(s=0.3) + "time.sleep(30)"])
    try:
        meter = Meter(client, worker_pids=[child.pid], redis_pid=redis_proc.pid)
        meter.start()
        time.sleep(0.8)
        usage = meter.stop()
        assert 0.2 <= usage.worker_cpu_s < 1.0, usage
        assert usage.redis_cpu_s < 0.2
    finally:
        child.kill()
        child.wait()
        client.close()


def test_run_counts_wrong_and_failed_answers() -> None:
    item = WorkItem("How do I reset my password?", "gpt-4o-mini", "Be brief.")
    right = Answer(
        text=expected_answer(item.model, item.system, item.prompt),
        source="batched",
        model=item.model,
        batch_size=4,
    )
    wrong = right.model_copy(update={"text": "someone else's answer", "batch_size": 2})
    run = Run([Outcome(item, 0.5, right), Outcome(item, 0.7, wrong), Outcome(item, 1.0, None)], 2)
    assert (run.wrong, run.failed, run.rate) == (1, 1, 1.5)
    assert run.latencies("batched") == [0.5, 0.7]
    assert run.mean_answer_batch() == 3.0


def test_fake_stats_parse_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    stats = FakeStats.parse(
        {
            "calls": 5,
            "batched_calls": 4,
            "batched_questions": 30,
            "single_calls": 1,
            "streamed_calls": 4,
            "rate_limited": 0,
            "max_in_flight": 3,
            "batch_sizes": {"8": 2, "7": 2},
        }
    )
    assert stats.mean_batch == 7.5 and stats.batch_sizes == {8: 2, 7: 2}
    table(["", "req/s"], [["coalesce", "410.9"], ["plain", "39.8"]])
    assert capsys.readouterr().out.splitlines() == [
        "            req/s",
        "  coalesce  410.9",
        "  plain      39.8",
    ]
