"""Asking the model for a claimed batch or a single request, and settling every request of it.

A batch is streamed when the upstream allows it: each answer is settled as soon as its slot is
complete (:class:`worker.batching.stream.SlotStream`), the rest when the reply ends. Slots the
parser cannot place are asked again singly. A rejection that names the input (400 content
filter, context length) is narrowed down by splitting the batch, so only the request at fault
fails. Every outcome goes through one settle script, which also wakes dedup followers.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from producer import Answer, Request, Settings, UpstreamError
from producer._exceptions import UpstreamRejected, UpstreamStreamBroken

from ..pricing import cost_usd, split_prompt, split_total
from ..shared.dedup import Outcome
from ..shared.redisconn import TRANSIENT, RedisUnavailable, retry_async
from ..shared.settle import Settlement, Settler
from ..shared.stats import Stats
from ..tokens import chat_prompt_tokens, count_tokens
from ..upstream import Completion, Upstream
from .grouping import Sizer
from .prompt import build_batch_messages, build_single_messages
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
    ) -> None:
        self.window = window
        self.settings = settings
        self.upstream = upstream
        self.settler = settler
        self.sizer = sizer
        self.stats = stats

    # -- entry points ----------------------------------------------------------------------
    async def send_batch(self, batch_id: str, items: Sequence[Item]) -> None:
        """Answer every item of a claimed batch under its lease, then release the lease."""
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(batch_id))
        try:
            await self._ask(batch_id, list(items))
        finally:
            keeper.cancel()
            await self.settle([], time.monotonic() + SETTLE_GRACE_S, release_batch=batch_id)

    async def _keep_lease(self, batch_id: str) -> None:
        """Renew the lease while we work, so nobody takes over a batch that is only slow."""
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                await self.window.renew(batch_id)
            except TRANSIENT as exc:
                log.warning("batch %s: lease not renewed (%s)", batch_id, type(exc).__name__)

    async def send_single(self, item: Item) -> None:
        request = item.request
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
            await self._settle([(item, _failure(exc))])
            return
        answer = self._answer(
            request,
            completion.text,
            "single",
            None,
            1,
            completion.prompt_tokens,
            completion.completion_tokens,
        )
        self.stats.add_soon(request.model, singles=1)
        await self._settle([(item, Outcome(answer=answer))])

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
        try:
            completion = await self._call(run, first, messages, per_answer)
        except Exception as exc:
            await asyncio.gather(*run.pending)
            rest = [item for n, item in enumerate(items) if n not in run.released]
            await self._recover(batch_id, first.model, rest, exc)
            return
        await asyncio.gather(*run.pending)
        await self._finish(run, first, completion)

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
            await self._settle([(item, _failure(exc)) for item in rest])

    async def _call(
        self, run: _Run, first: Request, messages: list[dict[str, str]], per_answer: int | None
    ) -> Completion:
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
            answer = self._answer(
                item.request,
                text,
                "batched",
                run.batch_id,
                len(run.items),
                run.prompt_shares[slot],
                count_tokens(text) + 3,  # the label and line break
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

    async def _finish(self, run: _Run, first: Request, completion: Completion) -> None:
        result = run.stream.finish()
        slots: list[str | None] = list(result.slots)
        if completion.finish_reason == "length":
            # Cut off: whichever answer came last may be incomplete, and nothing says which.
            slots = [None] * len(slots)
        lengths = [count_tokens(s) if s else 0 for s in slots]
        todo = [n for n in range(len(run.items)) if n not in run.released]
        answered = [n for n in todo if slots[n]]
        fallbacks = [run.items[n] for n in todo if not slots[n]]
        if answered:
            # Shares of the whole call, over every slot, so early and late answers add up.
            prompts = split_prompt(completion.prompt_tokens, [i.tokens for i in run.items])
            weights = [lengths[n] + 1 if slots[n] else 0 for n in range(len(slots))]
            completions = split_total(completion.completion_tokens, weights)
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
                            prompts[n],
                            completions[n],
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
            await asyncio.gather(*(self.send_single(item) for item in fallbacks))

    # -- settling ----------------------------------------------------------------------------
    def _answer(
        self,
        request: Request,
        text: str,
        source: str,
        batch_id: str | None,
        size: int,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> Answer:
        return Answer(
            text=text,
            source=source,
            model=request.model,
            batch_id=batch_id,
            batch_size=size,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost_usd(
                self.settings.prices, request.model, prompt_tokens, completion_tokens
            ),
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


def _batch_prompt_tokens(system: str | None, question_tokens: list[int]) -> int:
    """A batch prompt's tokens without re-counting its questions: prefix, questions, markers."""
    return _prefix_tokens(system) + sum(question_tokens) + MARKER_TOKENS * len(question_tokens)


def _failure(exc: BaseException) -> Outcome:
    kind = type(exc).__name__ if isinstance(exc, UpstreamError) else "RequestFailed"
    return Outcome(error=str(exc) or type(exc).__name__, kind=kind)


_batch_serial = itertools.count()


def new_batch_id(worker_id: str) -> str:
    """``<claiming worker>.<serial>``: logs and leases then say which worker sent a batch.

    Worker ids are random per process, so a counter keeps ids unique without a syscall each.
    """
    return f"{worker_id}.{next(_batch_serial)}"
