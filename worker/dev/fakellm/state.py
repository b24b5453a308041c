"""Live state of one fake provider: knobs, randomness, limits and the counters ``/stats`` shows."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from .config import FakeConfig
from .promptcache import PromptCache
from .protocol import ChatRequest, Reply

BODIES_KEPT = 50


class TokenBucket:
    """Requests-per-second limit with burst max(1, rate); a rate of 0 means unlimited."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> int:
        """0 when the call may go ahead, else the whole seconds to wait before retrying (>= 1)."""
        if self.rate <= 0:
            return 0
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0
        return max(1, math.ceil((1 - self.tokens) / self.rate))


class Pass:
    """One admitted call: ``start`` waits for a queue slot, ``release`` (idempotent) frees all."""

    def __init__(self, gate: Gate, semaphore: asyncio.Semaphore | None) -> None:
        self.gate = gate
        self.semaphore = semaphore
        self.started = False
        self.released = False

    async def start(self) -> None:
        if self.semaphore is not None:
            await self.semaphore.acquire()
        self.started = True
        self.gate.in_flight += 1
        self.gate.max_in_flight = max(self.gate.max_in_flight, self.gate.in_flight)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.gate.admitted -= 1
        if self.started:
            self.gate.in_flight -= 1
            if self.semaphore is not None:
                self.semaphore.release()


class Gate:
    """Calls in progress: ``admitted`` (queued or running) and ``in_flight`` (running).

    ``max_concurrency`` bounds ``in_flight`` with a queue; ``concurrency_limit`` bounds
    ``admitted`` by refusing. A live queue-limit change builds a new semaphore for calls that
    arrive afterwards; calls holding the old one release that one. Counters change without
    awaits, so a check and the admission that follows it cannot interleave with other calls.
    """

    def __init__(self, queue_limit: int) -> None:
        self.semaphore = asyncio.Semaphore(queue_limit) if queue_limit > 0 else None
        self.admitted = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def resize(self, queue_limit: int) -> None:
        self.semaphore = asyncio.Semaphore(queue_limit) if queue_limit > 0 else None

    def admit(self, limit: int) -> Pass | None:
        """A pass for a new call, or None when ``limit`` (> 0) calls are already in progress."""
        if limit > 0 and self.admitted >= limit:
            return None
        self.admitted += 1
        return Pass(self, self.semaphore)


@dataclass
class Stats:
    """Counters; ``batch_sizes`` is a histogram over batched calls, ``layouts`` over noisy ones."""

    calls: int = 0  # answered with a completion (plain or streamed)
    single_calls: int = 0
    batched_calls: int = 0
    batched_questions: int = 0
    questions: int = 0  # single calls count one each
    streamed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the simulated provider prompt cache
    errors: int = 0  # 500s
    rate_limited: int = 0  # every 429, from rate_limit or concurrency_limit
    concurrency_limited: int = 0
    rejected: int = 0  # content-filter 400s
    malformed: int = 0
    bad_requests: int = 0
    noisy: int = 0
    dropped: int = 0
    tool_calls: int = 0  # replies that call a tool
    calls_by_model: dict[str, int] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    layouts: dict[str, int] = field(default_factory=dict)
    # per model: {"prompt_tokens", "completion_tokens", "cached_tokens"}, to price a run
    tokens_by_model: dict[str, dict[str, int]] = field(default_factory=dict)


def _count(histogram: dict[str, int], key: str) -> None:
    histogram[key] = histogram.get(key, 0) + 1


class State:
    """Everything one app instance shares between requests: config, randomness, counters."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = dataclasses.replace(config)
        self.rng = random.Random(config.seed)
        self.stats = Stats()
        self.gate = Gate(config.max_concurrency)
        self.bucket = TokenBucket(config.rate_limit)
        # The last chat bodies received (GET /debug/last), for tests of what reached us.
        self.bodies: collections.deque[Any] = collections.deque(maxlen=BODIES_KEPT)
        self.prompt_cache = PromptCache()

    def remember(self, body: Any) -> None:
        self.bodies.append(body)

    def reconfigure(self, changes: dict[str, Any]) -> None:
        """Apply ``changes``; a new seed restarts the random sequence, a new rate refills."""
        old, self.config = self.config, dataclasses.replace(self.config, **changes)
        if "seed" in changes:
            self.rng = random.Random(self.config.seed)
        if "rate_limit" in changes:
            self.bucket = TokenBucket(self.config.rate_limit)
        if self.config.max_concurrency != old.max_concurrency:
            self.gate.resize(self.config.max_concurrency)
        if not self.config.prompt_cache:
            self.prompt_cache.clear()

    def cache_prompt(self, chat: ChatRequest, reply: Reply) -> Reply:
        """``reply`` with the cached tokens the provider's prompt cache would report."""
        if not self.config.prompt_cache:
            return reply
        cached = self.prompt_cache.use(chat, time.monotonic(), self.config.prompt_cache_ttl_s)
        return reply if cached is None else dataclasses.replace(reply, cached_tokens=cached)

    def bump(self, *counters: str) -> None:
        """Add one to each named counter (all on the event loop, so no lock is needed)."""
        for counter in counters:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    def record(self, chat: ChatRequest, reply: Reply, *, streamed: bool = False) -> None:
        stats = self.stats
        stats.calls += 1
        stats.streamed_calls += streamed
        stats.questions += reply.questions
        stats.prompt_tokens += chat.prompt_tokens
        stats.completion_tokens += reply.completion_tokens
        stats.cached_tokens += reply.cached_tokens or 0
        per_model = stats.tokens_by_model.setdefault(
            chat.model, {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        )
        per_model["prompt_tokens"] += chat.prompt_tokens
        per_model["completion_tokens"] += reply.completion_tokens
        per_model["cached_tokens"] += reply.cached_tokens or 0
        stats.dropped += reply.dropped
        stats.tool_calls += reply.tool_call is not None
        _count(stats.calls_by_model, chat.model)
        if reply.batched:
            stats.batched_calls += 1
            stats.batched_questions += reply.questions
            _count(stats.batch_sizes, str(reply.questions))
        else:
            stats.single_calls += 1
        if reply.layout is not None:
            stats.noisy += 1
            _count(stats.layouts, reply.layout)

    def snapshot(self) -> dict[str, Any]:
        snapshot = dataclasses.asdict(self.stats)
        gate = self.gate
        snapshot.update(
            max_in_flight=gate.max_in_flight,
            in_flight=gate.in_flight,
            queued=gate.admitted - gate.in_flight,
        )
        return snapshot

    def reset(self) -> None:
        self.stats = Stats()
        self.bodies.clear()
        self.gate.max_in_flight = self.gate.in_flight
