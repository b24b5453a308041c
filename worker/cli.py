"""The ``coalesce`` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from producer import CoalesceError

app = typer.Typer(
    help="coalesce: batch, dedup and account for LLM API calls behind a Celery queue.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print figures (not part of the test run).")
app.add_typer(bench_app, name="bench")
cache_app = typer.Typer(help="The answer caches: how they do, and clearing them.")
app.add_typer(cache_app, name="cache")

TenantOption = Annotated[str | None, typer.Option(help="Only this tenant's entries.")]
NamespaceOption = Annotated[str | None, typer.Option(help="Only this namespace's entries.")]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Run a worker (same as ``celery -A worker.app worker -E``; extra options pass through)."""
    from producer import load_settings

    load_settings().check_worker()  # fail here, with the setting's name, not inside Celery
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-E", *ctx.args]
    os.execv(sys.executable, argv)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def beat(ctx: typer.Context) -> None:
    """Run the scheduler for the daily report (``celery -A worker.app beat``); one per cluster."""
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "beat", *ctx.args]
    os.execv(sys.executable, argv)


@app.command("fake-llm")
def fake_llm(
    port: Annotated[int, typer.Option(help="Port to listen on (127.0.0.1).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Latency before the first token.")] = 0.0,
    latency_per_token_ms: Annotated[float, typer.Option(help="Extra latency per token.")] = 0.0,
    noise: Annotated[float, typer.Option(help="Share of batched replies in other formats.")] = 0.0,
    drop: Annotated[float, typer.Option(help="Share of batched replies missing an answer.")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Share of calls answered 500.")] = 0.0,
    malformed_rate: Annotated[float, typer.Option(help="Share of 200s with a bad body.")] = 0.0,
    rate_limit: Annotated[float, typer.Option(help="Calls/s before 429 (0: none).")] = 0.0,
    max_concurrency: Annotated[int, typer.Option(help="Calls served at once (0: any).")] = 0,
    concurrency_limit: Annotated[
        int, typer.Option(help="Calls in progress before 429 at once (0: any).")
    ] = 0,
    retry_after_ms: Annotated[
        int, typer.Option(help="retry-after-ms header on those 429s (0: none).")
    ] = 0,
    stream_mode: Annotated[
        str, typer.Option(help="on: honour stream; ignore: answer JSON; reject: 400.")
    ] = "on",
    reject_word: Annotated[
        str, typer.Option(help="Content-filter 400 for calls containing this word.")
    ] = "",
    layouts: Annotated[
        str, typer.Option(help="Comma-separated layouts noise picks from (empty: all).")
    ] = "",
    seed: Annotated[int, typer.Option(help="Seed for the noise and error draws.")] = 0,
    prompt_cache: Annotated[
        bool, typer.Option(help="Report cached prompt tokens like a provider's prompt cache.")
    ] = True,
    prompt_cache_ttl_s: Annotated[
        float, typer.Option(help="How long a prompt prefix stays cached.")
    ] = 300.0,
) -> None:
    """Serve a deterministic OpenAI-compatible model for tests and the demo."""
    from .dev.fakellm import FakeConfig, serve

    try:
        config = FakeConfig(
            latency_ms=latency_ms,
            latency_per_token_ms=latency_per_token_ms,
            noise=noise,
            drop=drop,
            error_rate=error_rate,
            malformed_rate=malformed_rate,
            rate_limit=rate_limit,
            max_concurrency=max_concurrency,
            concurrency_limit=concurrency_limit,
            retry_after_ms=retry_after_ms,
            stream_mode=stream_mode,
            reject_word=reject_word,
            layouts=layouts,
            seed=seed,
            prompt_cache=prompt_cache,
            prompt_cache_ttl_s=prompt_cache_ttl_s,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"fake upstream on http://{host}:{port}/v1", err=True)
    serve(config, host=host, port=port)


@app.command()
def submit(
    prompt: str,
    model: Annotated[str, typer.Option(help="Model name, as the upstream knows it.")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.0,
    max_tokens: Annotated[int | None, typer.Option(help="Answer length limit.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Tenant; never batched with others.")] = None,
    cache: Annotated[
        str | None, typer.Option(help="Cache flags: no_cache, no_store, sensitive, sampled.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 120.0,
) -> None:
    """Enqueue one prompt, wait for its answer and print it as JSON."""
    from producer import Client

    with Client() as client:
        ticket = client.submit(
            prompt,
            model=model,
            system=system,
            temperature=temperature,
            max_tokens=max_tokens,
            tenant=tenant,
            cache=cache,
        )
        typer.echo(ticket.get(timeout=timeout).model_dump_json(indent=2))


@app.command()
def metrics(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for /metrics.")] = 9464,
) -> None:
    """Serve Prometheus metrics read from the shared Redis (one exporter for all workers)."""
    from .metrics import serve_metrics

    serve_metrics(host=host, port=port)


@app.command()
def report(
    since: Annotated[str, typer.Option(help="How far back: 30m, 24h, 7d, ...")] = "24h",
    by: Annotated[
        str | None, typer.Option(help="Break down by tenant, model, source or tag:NAME.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    html: Annotated[
        Path | None, typer.Option(help="Also write a self-contained page with charts here.")
    ] = None,
) -> None:
    """Billed against baseline (one call per request, no cache), saved by lever."""
    import redis

    from producer import load_settings

    from .ledger.report import parse_duration, run_report

    settings = load_settings()
    try:
        since_s = parse_duration(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    client = redis.Redis.from_url(settings.redis_url)
    try:
        run_report(
            client,
            since_s=since_s,
            by=by,
            as_json=as_json,
            html_path=str(html) if html else None,
            out=typer.echo,
            rollup_ttl_s=settings.ledger_rollup_ttl_s,
        )
    except ValueError as exc:  # a --by it does not know
        raise typer.BadParameter(str(exc)) from None
    except redis.RedisError as exc:
        raise CoalesceError(f"Redis unavailable: {type(exc).__name__}") from None
    finally:
        client.close()


@cache_app.command("stats")
def cache_stats(
    tenant: TenantOption = None,
    namespace: NamespaceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Entries, hits and misses by kind, hit rate and cost saved (counters cover every tenant)."""
    import dataclasses
    import json

    from producer import Client

    with Client() as client:
        stats = client.cache_stats(tenant=tenant, namespace=namespace)
    if as_json:
        data = {**dataclasses.asdict(stats), "lookups": stats.lookups, "hit_rate": stats.hit_rate}
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"{'kind':<10}{'entries':>10}{'hits':>10}{'misses':>10}")
    typer.echo(
        f"{'exact':<10}{stats.exact_entries:>10}{stats.exact_hits:>10}{stats.exact_misses:>10}"
    )
    typer.echo(
        f"{'semantic':<10}{stats.semantic_entries:>10}{stats.semantic_hits:>10}"
        f"{stats.semantic_misses:>10}"
    )
    typer.echo(f"hit rate {stats.hit_rate:.1%} of {stats.lookups} lookups")
    typer.echo(f"saved ${stats.saved_usd:.6f} (what the hits' answers cost when first asked)")


@cache_app.command("clear")
def cache_clear(tenant: TenantOption = None, namespace: NamespaceOption = None) -> None:
    """Drop cached answers: all of them, or one tenant's and/or one namespace's."""
    from producer import Client

    with Client() as client:
        removed = client.clear_cache(tenant=tenant, namespace=namespace)
    typer.echo(f"removed {removed} cache entries")


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    workers: Annotated[int, typer.Option(help="Server processes (each one event loop).")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, ...)."""
    from producer.api import serve

    if workers < 1:
        raise typer.BadParameter("workers must be at least 1")
    serve(host=host, port=port, workers=workers, log_level=log_level)


@app.command()
def demo(
    requests: Annotated[int, typer.Option(help="How many requests to send.")] = 120,
    latency_ms: Annotated[float, typer.Option(help="Fake upstream latency per call.")] = 300.0,
) -> None:
    """Start what is missing (Redis, fake upstream, a worker), send a burst, print the bill."""
    from .dev.demo import run_demo

    run_demo(requests=requests, latency_ms=latency_ms)


@bench_app.command("pipeline")
def bench_pipeline(
    requests: Annotated[int, typer.Option(help="Requests per scenario and integration.")] = 2000,
    workers: Annotated[int, typer.Option(help="Worker processes per integration.")] = 1,
) -> None:
    """Throughput, upstream calls, Redis commands and CPU: this pipeline against plain tasks."""
    from .dev.bench import run_pipeline_bench

    run_pipeline_bench(requests=requests, workers=workers)


@bench_app.command("scale")
def bench_scale(
    workers: Annotated[int, typer.Option(help="Worker processes to compare with one.")] = 3,
    rate: Annotated[float, typer.Option(help="Steady arrival rate, requests/s.")] = 40.0,
    seconds: Annotated[float, typer.Option(help="Length of the steady run.")] = 15.0,
    burst: Annotated[int, typer.Option(help="Requests in the burst run.")] = 600,
    callers: Annotated[int, typer.Option(help="Closed-loop callers in the burst run.")] = 64,
) -> None:
    """Batch size at a steady rate and burst throughput: 1 worker process against N."""
    from .dev.bench import run_scale_bench

    if workers < 1 or rate <= 0 or seconds <= 0 or burst < 1 or callers < 1:
        raise typer.BadParameter("workers, rate, seconds, burst and callers must be positive")
    run_scale_bench(workers=workers, rate=rate, seconds=seconds, burst=burst, callers=callers)


@bench_app.command("latency")
def bench_latency(
    callers: Annotated[int, typer.Option(help="Closed-loop callers.")] = 48,
    requests: Annotated[int, typer.Option(help="Requests per run.")] = 600,
    latency_ms: Annotated[float, typer.Option(help="Fake latency before the first token.")] = 300.0,
    ms_per_token: Annotated[float, typer.Option(help="Fake time per completion token.")] = 5.0,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Latency of batched answers with the upstream streaming against whole replies."""
    from .dev.bench import run_latency_bench

    if callers < 1 or requests < 1 or workers < 1 or latency_ms < 0 or ms_per_token < 0:
        raise typer.BadParameter("callers, requests and workers must be positive")
    run_latency_bench(
        callers=callers,
        requests=requests,
        latency_ms=latency_ms,
        ms_per_token=ms_per_token,
        workers=workers,
    )


@bench_app.command("api")
def bench_api(
    requests: Annotated[int, typer.Option(help="Requests at once, direct and via the API.")] = 1000,
    callers: Annotated[int, typer.Option(help="Closed-loop callers in the second run.")] = 32,
    waiting: Annotated[int, typer.Option(help="Requests held waiting at once.")] = 1000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Requests/s, the API's added latency (p50/p99) and its memory with many requests waiting."""
    from .dev.bench.api import run_api_bench

    if min(requests, callers, waiting, workers) < 1:
        raise typer.BadParameter("requests, callers, waiting and workers must be positive")
    run_api_bench(requests=requests, callers=callers, waiting=waiting, workers=workers)


DEFAULT_DATA = Path("../shared/data")


@bench_app.command("cache")
def bench_cache(
    data: Annotated[
        Path, typer.Option(help="The labelled datasets (QQP, Bitext, arena-hard, ...).")
    ] = DEFAULT_DATA,
    embedder: Annotated[
        str | None, typer.Option(help="Only this embedder (hashing, local, openai).")
    ] = None,
    sizes: Annotated[str, typer.Option(help="Index sizes for lookup latency.")] = "10000,100000",
    grouping: Annotated[bool, typer.Option(help="Also measure similarity grouping.")] = True,
) -> None:
    """Semantic cache precision and recall per labelled set, lookup and embedding latency, and
    what similarity grouping changes (fallbacks, tokens, topics per prompt)."""
    from .dev.bench.cache import run_cache_bench
    from .dev.bench.grouping import run_grouping_bench

    if not data.is_dir():
        raise typer.BadParameter(f"{data} is not a directory (see --data)")
    try:
        index_sizes = tuple(int(n) for n in sizes.split(",") if n.strip())
    except ValueError:
        raise typer.BadParameter("sizes must be comma-separated integers") from None
    run_cache_bench(data, embedder=embedder, sizes=index_sizes)
    if grouping:
        run_grouping_bench(data)


@bench_app.command("cost")
def bench_cost(
    data: Annotated[Path, typer.Option(help="The datasets (Bitext, NQ).")] = DEFAULT_DATA,
    requests: Annotated[int, typer.Option(help="Requests per variant.")] = 1500,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    rate: Annotated[float, typer.Option(help="Arrivals per second.")] = 25.0,
) -> None:
    """Billed against baseline and savings by lever for a realistic mixed workload, with the
    caches on and off (and other variants), all through the whole pipeline."""
    from .dev.bench.cost import run_cost_bench

    if not data.is_dir():
        raise typer.BadParameter(f"{data} is not a directory (see --data)")
    if requests < 1 or workers < 1 or rate <= 0:
        raise typer.BadParameter("requests, workers and rate must be positive")
    run_cost_bench(data, requests=requests, workers=workers, rate=rate, out=typer.echo)


def main() -> None:
    try:
        app()
    except CoalesceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
