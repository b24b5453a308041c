"""The effect of similarity grouping (``COALESCE_SIMILARITY_GROUPING``): on against off.

A mixed workload (trivia, grade-school maths, customer support, arena-hard prompts, from the
shared data directory) is sent at a steady rate, once with grouping off (the baseline) and once
on, each with fresh worker processes on a flushed Redis, against one fake upstream that drops
and re-lays-out answers (so some requests fall back to single calls). Printed per run: upstream
calls, questions per batched call, fallback rate, prompt tokens per request, how many topics a
combined prompt holds, p50/p99 latency, Redis commands and worker CPU per request.

The fake's fallbacks are random per call (``drop``, ``noise``): they do not depend on which
questions share a prompt, so only a real model can show whether grouping changes accuracy or
fallbacks. What this run can show is what grouping costs and what it changes in the prompts.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ...shared.stats import read_stats, reset_stats
from ..workload import WorkItem
from .common import Rig, fresh_tenant
from .load import Run, paced, warm_up
from .meters import Usage, percentile

MODEL = "gpt-4o-mini"
MAX_PROMPT_CHARS = 600  # long arena-hard prompts would fill a call's token budget alone
SYSTEM = "Answer briefly and precisely."
FAKE = {"noise": 0.2, "drop": 0.1, "seed": 17, "latency_ms": 250, "latency_per_token_ms": 0.2}


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: str  # a key of WORKLOADS
    rate: float  # requests per second, paced


SCENARIOS = [
    Scenario("four sources, about one prompt's worth per window", "sources", 60.0),
    Scenario("four sources, several prompts' worth per window", "sources", 240.0),
    Scenario("four support intents, several prompts' worth per window", "intents", 240.0),
]
SUPPORT_INTENTS = ("complaint", "payment_issue", "newsletter_subscription", "check_invoice")


@dataclass(frozen=True)
class GroupingRun:
    grouping: bool
    run: Run
    fake: dict[str, Any]
    usage: Usage
    batched_items: int
    fallbacks: int
    topics_per_prompt: float
    single_topic_share: float
    embedding_failed: bool  # a worker logged that it split in arrival order instead


# -- the workload ------------------------------------------------------------------------------


def _jsonl(path: Path, field: str, count: int, rng: random.Random) -> list[str]:
    rows = [json.loads(line)[field] for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r, str) and 0 < len(r) <= MAX_PROMPT_CHARS]
    return rng.sample(rows, min(count, len(rows)))


def _bitext(path: Path, count: int, rng: random.Random, intent: str | None = None) -> list[str]:
    with path.open(newline="") as handle:
        rows = {r["instruction"] for r in csv.DictReader(handle) if intent in (None, r["intent"])}
    return rng.sample(sorted(rows), count)


def _shuffled(sources: dict[str, list[str]], rng: random.Random) -> list[tuple[str, WorkItem]]:
    pairs = [
        (topic, WorkItem(text, MODEL, SYSTEM)) for topic, texts in sources.items() for text in texts
    ]
    rng.shuffle(pairs)
    return pairs


def mixed_workload(data_dir: Path, per_topic: int, seed: int = 5) -> list[tuple[str, WorkItem]]:
    """``4 x per_topic`` distinct questions from four sources, shuffled: (topic, item) pairs."""
    rng = random.Random(seed)
    sources: dict[str, list[str]] = {
        "trivia": _jsonl(data_dir / "nq_open_dev.jsonl", "question", per_topic, rng),
        "maths": _jsonl(data_dir / "gsm8k_test.jsonl", "question", per_topic, rng),
        "support": _bitext(data_dir / "bitext_customer_support_train.csv", per_topic, rng),
        "arena": _jsonl(data_dir / "arena_hard_v0.1_questions.jsonl", "prompt", per_topic, rng),
    }
    return _shuffled(sources, rng)


def intents_workload(data_dir: Path, per_topic: int, seed: int = 5) -> list[tuple[str, WorkItem]]:
    """Support requests of four intents (one vocabulary each, one domain), shuffled."""
    rng = random.Random(seed)
    path = data_dir / "bitext_customer_support_train.csv"
    return _shuffled({i: _bitext(path, per_topic, rng, i) for i in SUPPORT_INTENTS}, rng)


WORKLOADS = {"sources": mixed_workload, "intents": intents_workload}


# -- one run -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Worker processes inherit this process's environment (the rig passes only its URLs)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _topic_mix(run: Run, topics: list[str]) -> tuple[float, float]:
    """Mean distinct topics per combined prompt, and the share of prompts with one topic."""
    prompts: dict[str, set[str]] = {}
    for outcome, topic in zip(run.outcomes, topics, strict=True):
        answer = outcome.answer
        if answer is not None and answer.source == "batched" and answer.batch_id:
            prompts.setdefault(answer.batch_id, set()).add(topic)
    if not prompts:
        return math.nan, math.nan
    kinds = [len(t) for t in prompts.values()]
    return sum(kinds) / len(kinds), sum(k == 1 for k in kinds) / len(kinds)


def _one(
    rig: Rig, pairs: list[tuple[str, WorkItem]], *, grouping: bool, rate: float, workers: int
) -> GroupingRun:
    rig.flush()
    with _env("COALESCE_SIMILARITY_GROUPING", "1" if grouping else "0"):
        rig.start_workers(workers, prefix="grp" if grouping else "base")
    try:
        with rig.client() as client:
            warm_up(client)
            reset_stats(rig.redis)
            rig.reset_stats()
            meter = rig.meter()
            meter.start()
            items = [item for _, item in pairs]
            run = paced(client, items, rate=rate, tenant=fresh_tenant("grouping"))
            usage = meter.stop()
        fake = httpx.get(rig.fake_base + "/stats", timeout=5).json()
        counts = read_stats(rig.redis).get(MODEL, {})
        mix = _topic_mix(run, [topic for topic, _ in pairs])
        failed = any("arrival order" in w.log_tail(2_000) for w in rig.workers)
        return GroupingRun(
            grouping,
            run,
            fake,
            usage,
            counts.get("batched_items", 0),
            counts.get("fallbacks", 0),
            *mix,
            failed,
        )
    finally:
        rig.stop_workers()


# -- printing ------------------------------------------------------------------------------------


def _row(r: GroupingRun) -> list[str]:
    n = len(r.run.outcomes)
    batched_calls = int(r.fake.get("batched_calls", 0))
    questions = int(r.fake.get("batched_questions", 0))
    latencies = r.run.latencies()
    return [
        "on" if r.grouping else "off (baseline)",
        str(int(r.fake["calls"])),
        f"{questions / batched_calls:.1f}" if batched_calls else "n/a",
        f"{r.fallbacks / r.batched_items:.1%}" if r.batched_items else "n/a",
        f"{int(r.fake['prompt_tokens']) / n:.1f}",
        f"{r.topics_per_prompt:.2f}",
        f"{r.single_topic_share:.0%}",
        f"{percentile(latencies, 50) * 1000:.0f}",
        f"{percentile(latencies, 99) * 1000:.0f}",
        f"{r.usage.redis_commands / n:.1f}",
        f"{r.usage.worker_cpu_s / n * 1000:.2f}",
        f"{r.run.wrong}/{r.run.failed}",
    ]


HEADER = [
    "grouping",
    "calls",
    "q/batch",
    "fallback",
    "prompt tok/req",
    "topics/prompt",
    "1-topic prompts",
    "p50 ms",
    "p99 ms",
    "redis cmd/req",
    "worker cpu ms/req",
    "wrong/failed",
]


def _table(rows: list[list[str]], out: Callable[[str], None]) -> None:
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    for row in [HEADER, *rows]:
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        out("  " + "  ".join(cells))


def run_grouping_bench(
    data_dir: Path,
    *,
    out: Callable[[str], None] = print,
    per_topic: int = 60,
    workers: int = 1,
    scenarios: list[Scenario] | None = None,
) -> None:
    """Grouping off (baseline) then on, per scenario, in this one invocation; prints a table."""
    scenarios = scenarios or SCENARIOS
    workloads = {s.workload: WORKLOADS[s.workload](data_dir, per_topic) for s in scenarios}
    knobs = ", ".join(f"{k}={v}" for k, v in FAKE.items())
    out(
        f"similarity grouping: {4 * per_topic} distinct requests per run, {per_topic} per topic, "
        f"shuffled; 'sources' = trivia (NQ), maths (GSM8K), support (Bitext), arena-hard; "
        f"'intents' = Bitext {', '.join(SUPPORT_INTENTS)}. One model and system prompt, "
        f"{workers} worker process(es), default window and batch limit, embedder from "
        f"COALESCE_EMBEDDER (default hashing); fake upstream {knobs}\n"
    )
    with Rig(**FAKE) as rig:
        for scenario in scenarios:
            pairs = workloads[scenario.workload]
            out(f"{scenario.name}: {scenario.rate:g} requests/s")
            runs = [
                _one(rig, pairs, grouping=on, rate=scenario.rate, workers=workers)
                for on in (False, True)
            ]
            _table([_row(r) for r in runs], out)
            if runs[-1].embedding_failed:
                out("  WARNING: the embedder failed; 'on' split in arrival order (see worker log)")
            out("")
    out(
        "calls: upstream calls answered; q/batch: questions per batched call; fallback: "
        "batched requests re-sent singly;\nprompt tok/req: upstream prompt tokens over all "
        "requests (the shared instructions are paid once per call); topics/prompt: distinct "
        "topics per combined prompt (batched answers);\nlatency: submit to answer, all requests.\n"
        "Note: the fake drops and re-lays-out answers at random per call, whatever the "
        "questions, so its fallback rate cannot show an effect of similarity; only a real "
        "model can."
    )
