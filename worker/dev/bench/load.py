"""Load generators: an open loop at a steady rate and closed-loop callers, both timing each answer.

Latency is measured from just before ``Client.submit`` to the moment the caller holds the
``Answer``. Every answer is checked against the fake's deterministic text, so a fast run that
handed someone the wrong answer shows up as wrong, not as fast.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from producer import Answer, Client, CoalesceError, Ticket

from ..fakellm import expected_answer
from ..workload import SUPPORT_SYSTEM, WorkItem, distinct_questions

ANSWER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    """One request: what was asked, what came back (or why nothing did) and how long it took."""

    item: WorkItem
    latency_s: float
    answer: Answer | None
    error: str | None = None

    @property
    def right(self) -> bool:
        if self.answer is None:
            return False
        expected: str = expected_answer(self.item.model, self.item.system, self.item.prompt)
        return self.answer.text == expected


@dataclass(frozen=True)
class Run:
    """All outcomes of one load run, in the order of the items, and its wall time."""

    outcomes: list[Outcome]
    seconds: float
    submit_rate: float = 0.0  # requests/s actually submitted (open loop only)

    @property
    def answers(self) -> list[Answer]:
        return [o.answer for o in self.outcomes if o.answer is not None]

    @property
    def failed(self) -> int:
        return sum(o.answer is None for o in self.outcomes)

    @property
    def wrong(self) -> int:
        """Answers whose text is not the one the fake gives for that request."""
        return sum(o.answer is not None and not o.right for o in self.outcomes)

    @property
    def rate(self) -> float:
        return len(self.outcomes) / self.seconds

    def latencies(self, source: str | None = None) -> list[float]:
        return [
            o.latency_s
            for o in self.outcomes
            if o.answer is not None and (source is None or o.answer.source == source)
        ]

    def mean_answer_batch(self) -> float:
        """Mean ``Answer.batch_size`` over answers: the batch a typical request rode in."""
        sizes = [a.batch_size for a in self.answers]
        return sum(sizes) / len(sizes) if sizes else float("nan")


def _submit(client: Client, item: WorkItem, tenant: str) -> Ticket:
    return client.submit(item.prompt, model=item.model, system=item.system, tenant=tenant)


def _collect(item: WorkItem, ticket: Ticket, sent: float) -> Outcome:
    try:
        answer = ticket.get(timeout=ANSWER_TIMEOUT_S)
    except CoalesceError as exc:
        return Outcome(item, time.monotonic() - sent, None, type(exc).__name__)
    return Outcome(item, time.monotonic() - sent, answer)


def paced(client: Client, items: Sequence[WorkItem], *, rate: float, tenant: str) -> Run:
    """Submit one request every ``1/rate`` s from this thread; wait for answers in the background.

    A submission that falls behind schedule goes out at once (no skipping), and the rate
    achieved is reported, so a slow producer cannot pass for a slow worker unnoticed.
    """
    threads = min(512, max(32, int(rate * 8)))  # more than rate x latency, so none queues
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-wait") as pool:
        started = time.monotonic()
        futures = []
        last_sent = started
        for index, item in enumerate(items):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            last_sent = time.monotonic()
            ticket = _submit(client, item, tenant)
            futures.append(pool.submit(_collect, item, ticket, last_sent))
        outcomes = [future.result() for future in futures]
    seconds = time.monotonic() - started
    submit_rate = (len(items) - 1) / (last_sent - started) if last_sent > started else 0.0
    return Run(outcomes, seconds, submit_rate)


def closed_loop(client: Client, items: Sequence[WorkItem], *, callers: int, tenant: str) -> Run:
    """``callers`` threads, each submitting a request, waiting for its answer, then the next."""
    results: list[Outcome | None] = [None] * len(items)
    indices = itertools.count()
    lock = threading.Lock()

    def caller() -> None:
        while True:
            with lock:
                index = next(indices)
            if index >= len(items):
                return
            sent = time.monotonic()
            ticket = _submit(client, items[index], tenant)
            results[index] = _collect(items[index], ticket, sent)

    started = time.monotonic()
    with ThreadPoolExecutor(callers, thread_name_prefix="bench-caller") as pool:
        for future in [pool.submit(caller) for _ in range(callers)]:
            future.result()
    seconds = time.monotonic() - started
    return Run([o for o in results if o is not None], seconds)


def warm_up(client: Client, count: int = 32, model: str = "gpt-4o-mini") -> Run:
    """A short burst before measuring, so imports, pools and first connections are paid for."""
    items = [
        WorkItem(f"Warm-up {i}: {item.prompt}", model, SUPPORT_SYSTEM)
        for i, item in enumerate(distinct_questions(count, models=[model], seed=999))
    ]
    return closed_loop(client, items, callers=count, tenant="bench-warmup")
