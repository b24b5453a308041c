"""``coalesce demo``: the whole path on this machine, with a bill at the end."""

from __future__ import annotations

import contextlib
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import typer

from producer import Answer, Client, load_settings

from ..batching.prompt import build_single_messages
from ..ledger.prices import PriceBook
from ..tokens import chat_prompt_tokens, count_tokens
from .procs import Proc, redis_answers, start_fake_llm, start_redis, start_worker, wait_for_workers
from .workload import WorkItem, support_burst

MODELS = ["gpt-4o-mini", "gpt-4.1-mini"]


@contextlib.contextmanager
def _stack(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def _say(text: str) -> None:
    typer.echo(text)


def run_demo(*, requests: int, latency_ms: float) -> None:
    settings = load_settings()
    with _stack([]) as procs:
        redis_url = settings.redis_url
        if redis_answers(redis_url):
            _say(f"Redis: using {redis_url}")
        else:
            redis_proc = start_redis()
            procs.append(redis_proc)
            redis_url = redis_proc.url
            _say(f"Redis: none at {settings.redis_url}; started a private one at {redis_url}")
        fake = start_fake_llm(latency_ms=latency_ms, noise=0.3, drop=0.05, seed=1)
        procs.append(fake)
        _say(f"Upstream: fake OpenAI-compatible model at {fake.url} ({latency_ms:.0f} ms per call)")
        env = {"COALESCE_REDIS_URL": redis_url, "COALESCE_UPSTREAM_URL": fake.url}
        procs.append(start_worker(env, name="demo"))
        wait_for_workers(redis_url, 1, timeout=30)
        _say("Worker: started (celery -A worker.app worker)\n")
        items = support_burst(requests, models=MODELS)
        client_settings = settings.model_copy(update={"redis_url": redis_url})
        answers, elapsed, latencies = _send(Client(settings=client_settings), items)
        stats = httpx.get(fake.url.removesuffix("/v1") + "/stats", timeout=5).json()
        _report(items, answers, stats, elapsed, latencies, PriceBook.load(settings.prices_file))
        _say(
            f"\nWatch it live: celery --broker={redis_url} flower  (then open http://localhost:5555)"
        )


def _send(client: Client, items: list[WorkItem]) -> tuple[list[Answer], float, list[float]]:
    # A tenant of its own per run, so answers a previous run left in the dedup store
    # (kept COALESCE_DEDUP_TTL_S) don't make this run look free.
    tenant = f"demo-{secrets.token_hex(4)}"
    started = time.monotonic()
    tickets = client.submit_many(
        {"prompt": i.prompt, "model": i.model, "system": i.system, "tenant": tenant} for i in items
    )
    answers, latencies = [], []
    for ticket in tickets:
        answers.append(ticket.get(timeout=120))
        latencies.append(time.monotonic() - started)
    client.close()
    return answers, time.monotonic() - started, latencies


def _report(
    items: list[WorkItem],
    answers: list[Answer],
    stats: dict[str, int],
    elapsed: float,
    latencies: list[float],
    prices: PriceBook,
) -> None:
    sources = Counter(a.source for a in answers)
    base_prompt = base_completion = 0
    base_cost = our_cost = 0.0
    for item, answer in zip(items, answers, strict=True):
        p = chat_prompt_tokens(build_single_messages(item.prompt, system=item.system))
        c = count_tokens(answer.text)
        base_prompt, base_completion = base_prompt + p, base_completion + c
        base_cost += prices.cost(item.model, p, c, 0) or 0.0
        our_cost += answer.cost_usd or 0.0
    billed = stats["prompt_tokens"] + stats["completion_tokens"]
    baseline = base_prompt + base_completion
    rows = [
        ("requests", f"{len(items)} ({len(set(items))} distinct)"),
        (
            "answered",
            f"{len(answers)}: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())),
        ),
        ("upstream calls", f"{stats['calls']} (one call per request would be {len(items)})"),
        (
            "tokens billed",
            f"{billed:,} (prompt {stats['prompt_tokens']:,}, "
            f"completion {stats['completion_tokens']:,})",
        ),
        (
            "one call per request",
            f"{baseline:,} tokens (prompt {base_prompt:,}, completion {base_completion:,})",
        ),
        ("tokens saved", f"{1 - billed / baseline:.1%}" if baseline else "n/a"),
        ("cost", f"${our_cost:.6f} against ${base_cost:.6f} one call per request"),
        (
            "time",
            f"{elapsed:.2f} s for the burst; median answer after "
            f"{statistics.median(latencies):.2f} s",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        _say(f"{name.ljust(width)}  {value}")
