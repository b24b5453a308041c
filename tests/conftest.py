"""Fixtures that start real parts: a private redis-server, the fake upstream, worker processes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import redis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from producer import Client, load_settings
from worker.dev.procs import Proc, start_fake_llm, start_redis, start_worker, wait_for_workers

# Property tests judge what is generated, not how fast: this machine is shared and noisy, so
# Hypothesis's timing checks (per-example deadline, slow generation) would only add flakes.
hypothesis_settings.register_profile(
    "coalesce", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile("coalesce")

# Small but realistic bounds so redelivery tests finish in seconds, not minutes.
FAST_ENV = {
    "COALESCE_WINDOW_MS": "200",
    "COALESCE_MAX_BATCH": "16",
    "COALESCE_REQUEST_TIMEOUT_S": "20",
    "COALESCE_VISIBILITY_TIMEOUT_S": "25",
    "COALESCE_WORKER_CONCURRENCY": "96",
}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Proc]:
    proc = start_redis()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_server: Proc) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def fake_llm() -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(**knobs: float | int) -> Proc:
        proc = start_fake_llm(**knobs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def worker_env(redis_url: str) -> Callable[..., dict[str, str]]:
    def make(upstream_url: str, **overrides: str) -> dict[str, str]:
        env = {**FAST_ENV, "COALESCE_REDIS_URL": redis_url, "COALESCE_UPSTREAM_URL": upstream_url}
        env.update({f"COALESCE_{k.upper()}": str(v) for k, v in overrides.items()})
        env.pop("OPENAI_API_KEY", None)
        return env

    return make


@pytest.fixture
def workers(redis_url: str) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(env: dict[str, str], *, name: str = "w1", wait: bool = True) -> Proc:
        proc = start_worker(env, name=name)
        started.append(proc)
        if wait:
            try:
                wait_for_workers(redis_url, 1, timeout=30)
            except TimeoutError:
                pytest.fail(f"worker {name} did not start:\n{proc.log_tail()}")
        return proc

    yield start
    for proc in started:
        if os.environ.get("COALESCE_TEST_SHOW_LOGS"):
            proc.stop(keep_logs=True)
            print(proc.log_tail(400))
        proc.stop()


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(settings=load_settings(redis_url=redis_url, **fast_settings())) as c:
        yield c


def fast_settings() -> dict[str, object]:
    return {k.removeprefix("COALESCE_").lower(): v for k, v in FAST_ENV.items()}
