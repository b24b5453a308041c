"""Asking the model for a claimed batch or a single request, and settling every request of it.

A batch is streamed when the upstream allows it: each answer is settled as soon as its slot is
complete (:class:`worker.batching.stream.SlotStream`), the rest when the reply ends. Slots the
parser cannot place are asked again singly. A rejection that names the input (400 content
filter, context length) is narrowed down by splitting the batch, so only the request at fault
fails. Every outcome goes through one settle script, which also wakes dedup followers.

With similarity grouping (:mod:`worker.batching.similar`) a claimed batch may hold several
calls' worth; it is split into prompts of related questions, sent concurrently under the one
lease, each settled as any batch is.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from producer import Answer, Request, Settings
from producer._exceptions import UpstreamRejected, UpstreamStreamBroken

from ..ledger.books import Books, Share, Usage
from ..ledger.prices import Price
from ..metrics.encode import observe_batch
from ..pricing import split_prompt, split_total
from ..shared.dedup import Outcome
from ..shared.inbox import task_id_of
from ..shared.redisconn import TRANSIENT, RedisUnavailable, retry_async
from ..shared.settle import Settlement, Settler
from ..shared.stats import Stats
from ..tokens import chat_prompt_tokens, count_tokens
from ..upstream import Completion, Upstream
from .grouping import Sizer
from .prompt import build_batch_messages, build_single_messages
from .similar import Grouper, split_in_order
from .stream import SlotStream
from .window import LEASE_S, Item, Window

log = logging.getLogger("coalesce.sender")

# Per answer, on top of a request's own max_tokens: the label and the line break.
LABEL_TOKENS = 8
# A question's marker line (`=== Q7 1a2b3c4d5e6f ===`) and its line breaks.
MARKER_TOKENS = 14
RELEASE_TICK_S = 0.01
# How long settling may keep retrying Redis after the request's own deadline has passed.
SETTLE_GRACE_S = 5.0


def _monotonic(epoch_deadline: float) -> float:
    return time.monotonic() + (epoch_deadline - time.time())


@dataclass
class _Run:
    """One call for ``items``: what has been released early, and the settles in flight."""

    batch_id: str
    items: list[Item]
    stream: SlotStream
    prompt_shares: list[int]
    released: set[int]
    pending: list[asyncio.Task[None]]
    ready: list[tuple[Item, Outcome]] = field(default_factory=list)


class Sender:
    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        settler: Settler,
        sizer: Sizer,
        stats: Stats,
        window: Window,
        *,
        books: Books,
        grouper: Grouper | None = None,
    ) -> None:
        self.books = books
        self.window = window
        self.grouper = grouper
        self.settings = settings
        self.upstream = upstream
        self.settler = settler
        self.sizer = sizer
        self.stats = stats

    # -- entry points ----------------------------------------------------------------------
    async def send_batch(
        self, batch_id: str, items: Sequence[Item], *, limit: int = 0, answer_estimate: int = 0
    ) -> None:
        """Answer every item of a claimed batch under its lease, then release the lease.

        ``limit`` and ``answer_estimate`` (0: unknown) come with a claim made for similarity
        grouping: one call's item limit and expected answer tokens per request.
        """
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(batch_id))
        try:
            if self.grouper is None and len(items) <= self.settings.max_batch:
                await self._ask(batch_id, list(items))
            else:
                await self._ask_split(batch_id, items, limit, answer_estimate)
        finally:
            keeper.cancel()
            await self.settle([], time.monotonic() + SETTLE_GRACE_S, release_batch=batch_id)

    async def _ask_split(
        self, batch_id: str, items: Sequence[Item], limit: int, answer_estimate: int
    ) -> None:
        """Several calls for one claim, the prompt with the oldest request started first.

        Without a grouper this is only a batch claimed by a grouping worker and taken over by
        one without it: split in arrival order so no call exceeds this worker's limit.
        """
        max_items = min(limit or self.settings.max_batch, self.settings.max_batch)
        if self.grouper is None:
            parts = [
                [items[i] for i in part]
                for part in split_in_order(
                    [i.tokens for i in items], max_items=max_items, max_tokens=2**62
                )
            ]
        else:
            estimate = answer_estimate or self.sizer.policy.default_answer_tokens
            parts = await self.grouper.split(items, max_items=max_items, answer_estimate=estimate)
        if len(parts) == 1:
            await self._ask(batch_id, parts[0])
            return
        log.debug("batch %s: split into %d calls", batch_id, len(parts))
        await asyncio.gather(*(self._ask(f"{batch_id}/{n}", part) for n, part in enumerate(parts)))

    async def _keep_lease(self, batch_id: str) -> None:
        """Renew the lease while we work, so nobody takes over a batch that is only slow."""
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                await self.window.renew(batch_id)
            except TRANSIENT as exc:
                log.warning("batch %s: lease not renewed (%s)", batch_id, type(exc).__name__)

    async def send_single(self, item: Item, *, prior: Share | None = None) -> None:
        """Ask one request alone; ``prior`` is its share of a batch that did not answer it."""
        request = item.request
        started = time.monotonic()
        kind = "single" if prior is None else "fallback"
        self._observe(request.model, [item])
        try:
            completion = await self.upstream.chat(
                model=request.model,
                messages=build_single_messages(request.prompt, system=request.system),
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                params=request.params,
                deadline=_monotonic(item.deadline),
            )
        except Exception as exc:
            self._count_failure(request.model, exc)
            self.books.failed(request, kind, started, 1, exc)
            await self._settle([(item, Outcome.failed(exc))])
            return
        usage = _usage(completion)
        cost = self.books.call(
            tenant=request.tenant or "", model=request.model, kind=kind, usage=usage,
            started=started, size=1,
        )  # fmt: skip
        share = Share(usage.prompt, usage.completion, usage.cached, cost)
        if prior is not None:  # a fallback's re-ask is a cost of batching, counted against it
            share = prior.plus(share)
        answer = self._answer(request, completion.text, "single", None, 1, share)
        self.books.answered(
            request, task_id_of(item.delivery), "single" if prior is None else "batched", share,
            completion.text, alone_completion=usage.completion,
        )  # fmt: skip
        self.stats.add_soon(request.model, singles=1)
        await self._settle([(item, Outcome(answer=answer))])

    def _observe(self, model: str, items: Sequence[Item]) -> None:
        """Batch size and each request's time since it entered (for the metrics)."""
        # An item's deadline is its entry time plus the request timeout.
        now = time.time() + self.settings.request_timeout_s
        observe_batch(self.stats, model, len(items), [max(0.0, now - i.deadline) for i in items])

    # -- a batch ---------------------------------------------------------------------------
    async def _ask(self, batch_id: str, items: list[Item]) -> None:
        if not items:
            return
        if len(items) == 1:
            await self.send_single(items[0])
            return
        first = items[0].request
        messages = build_batch_messages([i.request.prompt for i in items], system=first.system)
        own_prompt = _batch_prompt_tokens(first.system, [i.tokens for i in items])
        run = _Run(
            batch_id,
            items,
            SlotStream(len(items)),
            split_prompt(own_prompt, [i.tokens for i in items]),
            set(),
            [],
        )
        per_answer = None if first.max_tokens is None else first.max_tokens + LABEL_TOKENS
        started = time.monotonic()
        try:
            completion = await self._call(run, first, messages, per_answer)
        except Exception as exc:
            self.books.failed(first, "batch", started, len(items), exc)
            await asyncio.gather(*run.pending)
            rest = [item for n, item in enumerate(items) if n not in run.released]
            await self._recover(batch_id, first.model, rest, exc)
            return
        await asyncio.gather(*run.pending)
        await self._finish(run, first, completion, started)

    async def _recover(self, batch_id: str, model: str, rest: list[Item], exc: Exception) -> None:
        """The call failed for the requests not yet answered: split, re-ask singly, or fail."""
        if isinstance(exc, UpstreamRejected):
            # The provider refused something in this input: halve until only the culprit fails.
            self.stats.add_soon(model, rejected=1)
            half = len(rest) // 2
            await asyncio.gather(self._ask(batch_id, rest[:half]), self._ask(batch_id, rest[half:]))
        elif isinstance(exc, UpstreamStreamBroken):
            await asyncio.gather(*(self.send_single(item) for item in rest))
        else:
            self._count_failure(model, exc)
            await self._settle([(item, Outcome.failed(exc)) for item in rest])

    async def _call(
        self, run: _Run, first: Request, messages: list[dict[str, str]], per_answer: int | None
    ) -> Completion:
        self._observe(first.model, run.items)
        deadline = min(_monotonic(i.deadline) for i in run.items)
        max_tokens = None if per_answer is None else per_answer * len(run.items)
        if not self.settings.stream:
            completion = await self.upstream.chat(
                model=first.model,
                messages=messages,
                temperature=first.temperature,
                max_tokens=max_tokens,
                params=first.params,
                deadline=deadline,
            )
            run.stream.feed(completion.text)
            return completion
        return await self.upstream.chat_stream(
            model=first.model,
            messages=messages,
            temperature=first.temperature,
            max_tokens=max_tokens,
            params=first.params,
            deadline=deadline,
            on_text=lambda delta: self._on_text(run, first, delta),
        )

    def _on_text(self, run: _Run, first: Request, delta: str) -> None:
        """Settle each slot the moment it is complete; the rest waits for the reply's end."""
        ready = run.stream.feed(delta)
        if not ready:
            return
        settled: list[tuple[Item, Outcome]] = []
        for slot, text in ready:
            run.released.add(slot)
            item = run.items[slot]
            # Tokens of the reply so far are not known yet: an estimate the ledger makes exact.
            estimate = Share(run.prompt_shares[slot], count_tokens(text) + 3, 0, None)
            answer = self._answer(
                item.request, text, "batched", run.batch_id, len(run.items), estimate
            )
            settled.append((item, Outcome(answer=answer)))
        self.stats.add_soon(first.model, stream_released=len(settled))
        if not run.ready:
            run.pending.append(asyncio.get_running_loop().create_task(self._settle_released(run)))
        run.ready.extend(settled)

    async def _settle_released(self, run: _Run) -> None:
        """Settle what a stream released, gathering slots finished within one short tick.

        Chunks often complete several slots moments apart; one script call for them costs
        less than one each, and a tick is far below what streaming saves.
        """
        await asyncio.sleep(RELEASE_TICK_S)
        ready, run.ready = run.ready, []
        await self._settle(ready)

    async def _finish(
        self, run: _Run, first: Request, completion: Completion, started: float
    ) -> None:
        result = run.stream.finish()
        slots: list[str | None] = list(result.slots)
        if completion.finish_reason == "length":
            # Cut off: whichever answer came last may be incomplete, and nothing says which.
            slots = [None] * len(slots)
        lengths = [count_tokens(s) if s else 0 for s in slots]
        todo = [n for n in range(len(run.items)) if n not in run.released]
        answered = [n for n in todo if slots[n]]
        fallbacks = [n for n in todo if not slots[n]]
        # Shares of the whole call, over every slot, so early and late answers add up exactly.
        usage = _usage(completion)
        cost = self.books.call(
            tenant=first.tenant or "", model=first.model, kind="batch", usage=usage,
            started=started, size=len(run.items),
        )  # fmt: skip
        prompts = split_prompt(usage.prompt, [i.tokens for i in run.items])
        weights = [lengths[n] + 1 if slots[n] else 0 for n in range(len(slots))]
        completions = split_total(usage.completion, weights)
        shares = self.books.shares(first.model, usage, cost, prompts, completions)
        for n, item in enumerate(run.items):
            if n not in fallbacks:
                self.books.answered(
                    item.request, task_id_of(item.delivery), "batched", shares[n], slots[n] or ""
                )
        if answered:
            settled = [
                (
                    run.items[n],
                    Outcome(
                        answer=self._answer(
                            run.items[n].request,
                            slots[n] or "",
                            "batched",
                            run.batch_id,
                            len(run.items),
                            shares[n],
                        )
                    ),
                )
                for n in answered
            ]
            await self._settle(settled)
        size, misses = len(run.items), len(fallbacks)
        counted = [length for length, s in zip(lengths, slots, strict=True) if s]
        mean = sum(counted) / len(counted) if counted else 0.0
        self.stats.add_soon(
            first.model,
            batches=1,
            batched_items=size,
            fallbacks=misses,
            stream_mismatches=len(result.mismatches),
            stream_voided=len(result.voided),
        )
        if result.mismatches:
            log.warning(
                "batch %s: %d early answers differ from the whole reply's parse",
                run.batch_id,
                len(result.mismatches),
            )
        try:
            await self.sizer.record(first.model, size, misses, mean)
        except Exception as exc:  # the limit is advice; never fail requests over it
            log.warning("batch limit not recorded: %s", type(exc).__name__)
        if fallbacks:
            log.info("batch %s: %d of %d answers re-sent singly", run.batch_id, misses, size)
            await asyncio.gather(
                *(self.send_single(run.items[n], prior=shares[n]) for n in fallbacks)
            )

    # -- settling ----------------------------------------------------------------------------
    def _answer(
        self,
        request: Request,
        text: str,
        source: str,
        batch_id: str | None,
        size: int,
        share: Share,
    ) -> Answer:
        cost = share.billed
        if cost is None and share.cached == 0:  # an early answer's estimate, priced now
            cost = self.books.cost(request.model, Usage(share.prompt, share.completion))
        return Answer(
            text=text,
            source=source,
            model=request.model,
            batch_id=batch_id,
            batch_size=size,
            prompt_tokens=share.prompt,
            completion_tokens=share.completion,
            cached_tokens=share.cached,
            cost_usd=cost,
        )

    async def _settle(self, outcomes: list[tuple[Item, Outcome]]) -> None:
        if not outcomes:
            return
        settlements = [Settlement(i.key, i.delivery, i.inbox, o) for i, o in outcomes]
        await self.settle(
            settlements, max(_monotonic(i.deadline) for i, _ in outcomes) + SETTLE_GRACE_S
        )

    async def settle(
        self, settlements: list[Settlement], deadline: float, *, release_batch: str = ""
    ) -> None:
        """The settle script, retried until ``deadline``; giving up only logs.

        Requests left unsettled time out in their task and say so, and a redelivery asks
        again; a lease left unreleased lapses.
        """
        try:
            await retry_async(
                "settle",
                lambda: self.settler.settle(settlements, release_batch=release_batch),
                deadline,
            )
        except RedisUnavailable as exc:
            log.error(
                "could not settle %d request(s) (batch %s): %s",
                len(settlements),
                release_batch or "-",
                exc,
            )

    def _count_failure(self, model: str, exc: BaseException) -> None:
        if isinstance(exc, UpstreamRejected):
            self.stats.add_soon(model, rejected=1)


@functools.lru_cache(maxsize=256)
def _prefix_tokens(system: str | None) -> int:
    """Tokens of a batch's shared part (system prompt and instructions), counted once per system."""
    return chat_prompt_tokens(build_batch_messages([], system=system))


@functools.lru_cache(maxsize=256)
def _single_overhead(system: str | None) -> int:
    """Tokens of a call for one question, besides the question: system prompt and framing."""
    return chat_prompt_tokens(build_single_messages("", system=system))


def batching_pays(system: str | None, price: Price | None, size: int) -> bool:
    """Whether a full combined prompt of ``size`` costs less per request than asking alone.

    A batch adds the instructions (shared), a marker per question and a label per answer; it
    saves the system prompt and framing each separate call repeats. With no or a short system
    prompt, that never pays. Unpriced models are batched (nothing to compare).
    """
    if price is None or size < 2:
        return True
    per_request = (_prefix_tokens(system) / size + MARKER_TOKENS) * price.input_per_m
    per_request += LABEL_TOKENS * price.output_per_m
    return per_request < _single_overhead(system) * price.input_per_m


def _batch_prompt_tokens(system: str | None, question_tokens: list[int]) -> int:
    """A batch prompt's tokens without re-counting its questions: prefix, questions, markers."""
    return _prefix_tokens(system) + sum(question_tokens) + MARKER_TOKENS * len(question_tokens)


_batch_serial = itertools.count()


def new_batch_id(worker_id: str) -> str:
    """``<claiming worker>.<serial>``: logs and leases then say which worker sent a batch.

    Worker ids are random per process, so a counter keeps ids unique without a syscall each.
    """
    return f"{worker_id}.{next(_batch_serial)}"


def _usage(completion: Completion) -> Usage:
    return Usage(completion.prompt_tokens, completion.completion_tokens, completion.cached_tokens)
