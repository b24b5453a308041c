"""The worker's accounting: price each call, share it between its requests, write the ledger.

Every upstream call becomes a :class:`CallRecord` (tokens from the provider's ``usage``,
priced with the :class:`PriceBook`), and every answered request a :class:`RequestRecord`
with its exact share of the call(s) it took, its baseline (the same request sent alone to
the requested model, uncached: its messages and its answer, counted with the tokenizer) and
its savings by lever. Shares are split in nano-dollars by each request's tokens, so a call's
shares add up to the call exactly. Rows reach Redis through the :class:`LedgerWriter`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from producer import Request, Settings

from ..batching.prompt import build_single_messages
from ..pricing import split_total
from ..tokens import chat_prompt_tokens, count_tokens, messages_tokens
from .prices import PriceBook
from .records import CallRecord, RequestRecord, bounded_tags, levers_for, split_usd
from .store import Ledger
from .writer import LedgerWriter, Then

log = logging.getLogger("coalesce.ledger")

# Called after a request's row is written: (task id, request, billed USD or None).
BudgetHook = Callable[[str, Request, float | None], None]


@dataclass(frozen=True)
class Usage:
    """Tokens a call was billed for (``cached`` is part of ``prompt``)."""

    prompt: int
    completion: int
    cached: int = 0


@dataclass(frozen=True)
class Share:
    """One request's part of a call: tokens and dollars (None: unpriced)."""

    prompt: int
    completion: int
    cached: int
    billed: float | None

    def plus(self, other: Share) -> Share:
        """A fallback's share of its batch plus its own single call."""
        billed = None if self.billed is None or other.billed is None else self.billed + other.billed
        return Share(
            self.prompt + other.prompt,
            self.completion + other.completion,
            self.cached + other.cached,
            billed,
        )


NOTHING = Share(0, 0, 0, 0.0)


class Books:
    def __init__(
        self, settings: Settings, client: redis.Redis, *, budget: BudgetHook | None = None
    ) -> None:
        self.prices = PriceBook.load(settings.prices_file)
        self.writer: LedgerWriter | None = None
        self._budget = budget
        if settings.ledger:
            ledger = Ledger(
                client,
                raw_ttl_s=settings.ledger_raw_ttl_s,
                rollup_ttl_s=settings.ledger_rollup_ttl_s,
                daily_ttl_s=settings.ledger_daily_ttl_s,
            )
            self.writer = LedgerWriter(ledger)

    def cost(self, model: str, usage: Usage) -> float | None:
        return self.prices.cost(model, usage.prompt, usage.completion, usage.cached)

    # -- calls -------------------------------------------------------------------------------
    def call(
        self,
        *,
        tenant: str,
        model: str,
        kind: str,
        usage: Usage | None,
        started: float,
        size: int,
        outcome: str = "ok",
    ) -> float | None:
        """Record one upstream call (``usage`` None: it failed, nothing billed); its cost."""
        usage = usage or Usage(0, 0, 0)
        cost = self.cost(model, usage) if outcome == "ok" else 0.0
        if self.writer is not None:
            record = CallRecord(
                ts=time.time(),
                tenant=tenant,
                model=model,
                kind=kind,
                prompt_tokens=usage.prompt,
                completion_tokens=usage.completion,
                cached_tokens=usage.cached,
                cost_usd=cost,
                latency_s=round(time.monotonic() - started, 4),
                batch_size=size,
                outcome=outcome,
            )
            self.writer.add(calls=[record])
        return cost

    def failed(
        self, request: Request, kind: str, started: float, size: int, exc: BaseException
    ) -> None:
        """Record a call that raised: its status (or error kind), nothing billed."""
        status = getattr(exc, "status_code", 0) or type(exc).__name__
        self.call(
            tenant=request.tenant or "", model=request.model, kind=kind, usage=None,
            started=started, size=size, outcome=f"error:{status}",
        )  # fmt: skip

    def shares(
        self, model: str, usage: Usage, cost: float | None, prompts: Sequence[int],
        completions: Sequence[int],
    ) -> list[Share]:  # fmt: skip
        """Split a call between its requests; each part sums exactly to the call's."""
        cached = split_total(usage.cached, prompts)
        price = self.prices.price(model)
        if price is None:
            weights = [float(p + c) for p, c in zip(prompts, completions, strict=True)]
        else:
            weights = [
                (p - k) * price.input_per_m + k * price.cached_input_per_m + c * price.output_per_m
                for p, c, k in zip(prompts, completions, cached, strict=True)
            ]
        billed = split_usd(cost, weights)
        return [
            Share(p, c, k, b)
            for p, c, k, b in zip(prompts, completions, cached, billed, strict=True)
        ]

    # -- requests ----------------------------------------------------------------------------
    def answered(
        self,
        request: Request,
        task_id: str,
        source: str,
        share: Share,
        answer_text: str,
        *,
        alone_completion: int | None = None,
    ) -> None:
        """Record one answered request: its share, its baseline and its savings by lever.

        ``alone_completion``: the answer's tokens had it been asked alone (a passthrough's or a
        single call's own figure); otherwise the answer text is counted.
        """
        if self.writer is None:  # budgets settle after the ledger's rows: they need it on
            return
        completion = count_tokens(answer_text) if alone_completion is None else alone_completion
        baseline = self.prices.cost(request.model, prompt_tokens(request), completion, 0)
        billed = share.billed
        record = RequestRecord(
            ts=time.time(),
            tenant=request.tenant or "",
            model=request.model,
            source=source,
            tags=bounded_tags(request.tags or {}),
            prompt_tokens=share.prompt,
            completion_tokens=share.completion,
            cached_tokens=share.cached,
            billed_usd=billed,
            baseline_usd=baseline,
            levers=levers_for(
                source=source,
                baseline_usd=baseline,
                billed_usd=billed,
                cached_tokens=share.cached,
                price=self.prices.price(request.model) if share.cached else None,
            ),
        )
        then: list[Then] = []
        if self._budget is not None:
            hook = self._budget
            then.append(lambda: hook(task_id, request, billed))
        self.writer.add(requests=[record], then=then)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.stop()


def prompt_tokens(request: Request) -> int:
    """The request's prompt tokens had it been sent alone."""
    if request.messages is not None:
        return messages_tokens(request.messages)
    return chat_prompt_tokens(build_single_messages(request.prompt, system=request.system))
