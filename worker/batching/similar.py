"""Similarity grouping: a claimed batch split into combined prompts of related questions.

With ``COALESCE_SIMILARITY_GROUPING`` the shared window claims up to :data:`SPLIT_FACTOR` times
a model's batch limit (and token budgets), and the sender splits what it claimed into calls
that each hold related questions and stay within one call's budgets. The split never needs
more calls than the budgets force: it opens as many prompts as the item count and token sums
require, seeds them with questions far apart, and gives every question to the most similar
prompt with room, the most clear-cut questions first.

Embedding happens on the collector's side, in a thread, with one embedder per process. If it
fails, the batch is split in arrival order instead: grouping is an optimisation and never
fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from producer import Settings

    from .window import Item

log = logging.getLogger("coalesce.similar")

# How many prompts' worth a window may claim when grouping is on: room to sort questions into.
SPLIT_FACTOR = 4
# Rounds of centroid refinement after the seeded first pass (each O(n x prompts x dim)).
REFINE_ROUNDS = 4


class _Embedder(Protocol):
    """What grouping needs of :class:`worker.cache.embed.Embedder`."""

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


@dataclass
class _Budget:
    """Room left in one prompt: items, question tokens and expected answer tokens."""

    items: int
    tokens: int
    answers: int
    members: list[int] = field(default_factory=list)

    def fits(self, tokens: int, answers: int) -> bool:
        return self.items > 0 and tokens <= self.tokens and answers <= self.answers

    def take(self, index: int, tokens: int, answers: int) -> None:
        self.members.append(index)
        self.items -= 1
        self.tokens -= tokens
        self.answers -= answers


def _prompts_needed(
    tokens: Sequence[int], answers: Sequence[int], max_items: int, max_tokens: int, max_answers: int
) -> int:
    """The fewest prompts the budgets allow (a lower bound: packing may need one more)."""
    return max(
        1,
        math.ceil(len(tokens) / max_items),
        math.ceil(sum(tokens) / max_tokens),
        math.ceil(sum(answers) / max_answers),
    )


def _check(count: int, max_items: int, max_tokens: int, max_answers: int) -> None:
    if max_items < 1 or max_tokens < 1 or max_answers < 1:
        raise ValueError("max_items, max_tokens and max_answers must be at least 1")
    if count < 0:
        raise ValueError("negative item count")


def split_by_similarity(
    vectors: npt.NDArray[np.floating],
    tokens: Sequence[int],
    *,
    max_items: int,
    max_tokens: int,
    answers: Sequence[int] | None = None,
    max_answers: int | None = None,
) -> list[list[int]]:
    """Indices of the claimed items, one list per combined prompt, each within every budget.

    ``vectors`` are L2-normalised rows in arrival order. Every index appears exactly once;
    indices inside a prompt keep arrival order, and the prompt holding the oldest item (0)
    comes first, then by each prompt's oldest item. An item over a budget on its own gets a
    prompt of its own. Deterministic: ties go to the older item and the older prompt.
    """
    n = len(tokens)
    answers = list(answers) if answers is not None else [0] * n
    max_answers = max_answers if max_answers is not None else max(1, sum(answers))
    _check(n, max_items, max_tokens, max_answers)
    if vectors.shape[0] != n or len(answers) != n:
        raise ValueError(f"{vectors.shape[0]} vectors, {n} token counts, {len(answers)} answers")
    if n == 0:
        return []
    rows = np.asarray(vectors, dtype=np.float64).reshape(n, -1)
    pack = _Packer(tokens, answers, max_items, max_tokens, max_answers)
    seeds = _seeds(rows, _prompts_needed(tokens, answers, max_items, max_tokens, max_answers))
    groups = pack.assign(rows @ rows[seeds].T, first=seeds)
    for _ in range(REFINE_ROUNDS):  # k-means style: a centroid hears a topic through the noise
        centroids = np.stack([rows[g].sum(axis=0) for g in groups])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        again = pack.assign(rows @ centroids.T, first=[])
        if again == groups:
            break
        groups = again
    return groups


@dataclass(frozen=True)
class _Packer:
    """Fills prompts within the budgets, each item into the most similar prompt with room."""

    tokens: Sequence[int]
    answers: Sequence[int]
    max_items: int
    max_tokens: int
    max_answers: int

    def _new(self) -> _Budget:
        return _Budget(self.max_items, self.max_tokens, self.max_answers)

    def assign(self, likeness: npt.NDArray[np.float64], *, first: list[int]) -> list[list[int]]:
        """One prompt per column of ``likeness`` (items x prompts); ``first[j]`` opens prompt j.

        The most clear-cut items choose first, so a borderline one takes what room is left.
        An item no prompt has room for opens another, as arrival-order packing would.
        """
        tokens, answers = self.tokens, self.answers
        prompts = [self._new() for _ in range(likeness.shape[1])]
        for prompt, index in zip(prompts, first, strict=False):
            prompt.take(index, tokens[index], answers[index])
        placed = set(first)
        for index in _most_decided_first(likeness):
            if index in placed:
                continue
            order = [*_preferences(likeness[index]), *range(likeness.shape[1], len(prompts))]
            choice = next((j for j in order if prompts[j].fits(tokens[index], answers[index])), -1)
            if choice < 0:
                prompts.append(self._new())
            prompts[choice].take(index, tokens[index], answers[index])
        groups = [sorted(p.members) for p in prompts if p.members]
        return sorted(groups, key=lambda members: members[0])


def _seeds(rows: npt.NDArray[np.float64], count: int) -> list[int]:
    """The oldest item, then each time the item least like every seed so far (farthest first)."""
    n = rows.shape[0]
    seeds = [0]
    nearest = rows @ rows[0]  # each item's likeness to its most similar seed
    while len(seeds) < min(count, n):
        nearest[seeds] = np.inf
        pick = int(np.argmin(nearest))  # first minimum: the oldest of equals
        seeds.append(pick)
        nearest = np.maximum(nearest, rows @ rows[pick])
    return seeds


def _most_decided_first(to_seeds: npt.NDArray[np.float64]) -> list[int]:
    """Items by how much they prefer their best prompt over the runner-up, oldest first on ties."""
    n, k = to_seeds.shape
    if k == 1:
        return list(range(n))
    top2 = -np.sort(-to_seeds, axis=1)[:, :2]
    margin = top2[:, 0] - top2[:, 1]
    order = np.lexsort((np.arange(n), -margin))
    return [int(i) for i in order]


def _preferences(likeness: npt.NDArray[np.float64]) -> list[int]:
    """Prompt indices from most to least similar; the older prompt first on ties."""
    return [int(i) for i in np.lexsort((np.arange(likeness.shape[0]), -likeness))]


def split_in_order(
    tokens: Sequence[int],
    *,
    max_items: int,
    max_tokens: int,
    answers: Sequence[int] | None = None,
    max_answers: int | None = None,
) -> list[list[int]]:
    """Arrival-order prompts within every budget: the fallback when there are no vectors."""
    n = len(tokens)
    answers = list(answers) if answers is not None else [0] * n
    max_answers = max_answers if max_answers is not None else max(1, sum(answers))
    _check(n, max_items, max_tokens, max_answers)
    groups: list[list[int]] = []
    current: _Budget | None = None
    for index in range(n):
        if current is None or not current.fits(tokens[index], answers[index]):
            current = _Budget(max_items, max_tokens, max_answers)
            groups.append(current.members)
        current.take(index, tokens[index], answers[index])
    return groups


EmbedderFactory = Callable[["Settings"], _Embedder]


def _default_factory(settings: Settings) -> _Embedder:
    """The configured embedder (imported here so a worker without grouping never loads it)."""
    from ..cache.embed import make_embedder

    return make_embedder(settings)


class Grouper:
    """Splits a claimed batch for the sender; the embedder is built once, on first need."""

    def __init__(self, settings: Settings, factory: EmbedderFactory = _default_factory) -> None:
        self.settings = settings
        self._factory = factory
        self._embedder: _Embedder | None = None
        self._broken = False
        self._building: asyncio.Lock | None = None

    async def split(
        self, items: Sequence[Item], *, max_items: int, answer_estimate: int
    ) -> list[list[Item]]:
        """``items`` as combined prompts; one prompt (no embedding) when they all fit in one."""
        tokens = [i.tokens for i in items]
        answers = [i.answer_tokens or answer_estimate for i in items]
        max_items = max(1, max_items)
        max_tokens = self.settings.max_batch_tokens
        max_answers = self.settings.max_batch_answer_tokens

        def in_order() -> list[list[int]]:
            return split_in_order(
                tokens,
                max_items=max_items,
                max_tokens=max_tokens,
                answers=answers,
                max_answers=max_answers,
            )

        if len(items) <= 1 or (
            _prompts_needed(tokens, answers, max_items, max_tokens, max_answers) == 1
            and len(in_order()) == 1
        ):
            return [list(items)]
        parts: list[list[int]] | None = None
        try:
            vectors = await self._vectors([i.request.prompt for i in items])
            if vectors is not None:
                parts = split_by_similarity(
                    vectors,
                    tokens,
                    max_items=max_items,
                    max_tokens=max_tokens,
                    answers=answers,
                    max_answers=max_answers,
                )
        except Exception as exc:  # grouping is advice: fall back to arrival order
            log.warning("similarity split failed (%s); splitting in arrival order", exc)
        return [[items[i] for i in part] for part in (parts or in_order())]

    async def _vectors(self, texts: list[str]) -> npt.NDArray[np.float32] | None:
        embedder = await self._ready()
        if embedder is None:
            return None
        return await asyncio.to_thread(embedder.embed, texts)

    async def _ready(self) -> _Embedder | None:
        """The process's embedder, built in a thread the first time (a model may load slowly)."""
        if self._embedder is not None or self._broken:
            return self._embedder
        if self._building is None:
            self._building = asyncio.Lock()
        async with self._building:
            if self._embedder is None and not self._broken:
                try:
                    self._embedder = await asyncio.to_thread(self._factory, self.settings)
                except Exception as exc:
                    self._broken = True
                    log.error(
                        "similarity grouping has no embedder (%s: %s); batches are split in "
                        "arrival order (COALESCE_EMBEDDER)",
                        type(exc).__name__,
                        exc,
                    )
        return self._embedder
