"""What the ledger stores: one row per upstream call, one per request, and the savings split.

Money: rows hold USD floats for callers, but the ledger converts every amount to integer
nano-dollars (1e-9 USD, round half even) before adding anything up, and the helpers here
(``split_usd``, ``levers_for``) work in nano-dollars too. So shares of a call add up exactly to
the call, levers add up exactly to baseline minus billed, and a day of calls sums to the cent
(64-bit counters hold 9.2 billion USD of nano-dollars).

Savings by lever, nothing counted twice. For one request, with ``baseline`` (sent alone to the
requested model, no cache) and ``billed`` (its share of what the provider charged):

- a hit (``dedup``, ``cache``, ``semantic``) bills 0, so its whole baseline is that lever;
- ``prompt_cache`` is what the request's share of provider-cached prompt tokens would have
  cost at the full input rate, minus what they cost at the cache-read rate;
- what remains of ``baseline - billed`` goes to ``batching`` for a batched request (the shared
  system prompt paid once; fallback re-asks billed to the request make it smaller, possibly
  below 0), and to ``other`` for a request sent alone (only the gap between the baseline's
  token estimate and the provider's count, near 0).

So ``sum(levers) == baseline - billed`` exactly, in nano-dollars. A request whose billed or
baseline cost is unknown (unpriced model) gets no levers and is left out of all dollar sums.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from producer._tags import MAX_TAG_VALUE, MAX_TAGS, TAG_NAME
from worker.pricing import split_total

from .prices import NANO_PER_USD, Price

CALL_KINDS = ("batch", "single", "fallback", "passthrough", "split")
SOURCES = ("batched", "single", "passthrough", "dedup", "cache", "semantic")
HIT_SOURCES = ("dedup", "cache", "semantic")
LEVERS = ("batching", "dedup", "cache", "semantic", "prompt_cache", "routing", "compression")
OTHER = "other"


def to_nano(usd: float) -> int:
    """USD as integer nano-dollars (exact for amounts under about 9 million USD)."""
    return round(usd * NANO_PER_USD)


def to_usd(nano: int) -> float:
    return nano / NANO_PER_USD


def _opt_nano(usd: float | None) -> int | None:
    return None if usd is None else to_nano(usd)


@dataclass(frozen=True)
class CallRecord:
    """One upstream call: tokens from the provider's ``usage``; ``cost_usd`` None = unpriced."""

    ts: float
    tenant: str
    model: str
    kind: str  # "batch" | "single" | "fallback" | "passthrough" | "split"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float | None
    latency_s: float
    batch_size: int
    outcome: str  # "ok" | "error:<status or kind>"

    def to_json(self) -> str:
        row = dict(vars(self))
        row["cost_usd"] = _opt_nano(self.cost_usd)  # stored as nano-dollars
        return json.dumps(row, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> CallRecord:
        row: dict[str, Any] = json.loads(text)
        nano = row.get("cost_usd")
        row["cost_usd"] = None if nano is None else to_usd(int(nano))
        return cls(**row)


@dataclass(frozen=True)
class RequestRecord:
    """One request's share of its call(s), its baseline, and its savings by lever.

    ``billed_usd`` is 0 for dedup/cache/semantic hits, which also carry 0 tokens; None means
    unpriced. ``levers`` come from :func:`levers_for`.
    """

    ts: float
    tenant: str
    model: str
    source: str  # batched | single | passthrough | dedup | cache | semantic
    tags: dict[str, str]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    billed_usd: float | None
    baseline_usd: float | None
    levers: dict[str, float] = field(default_factory=dict)

    @property
    def priced(self) -> bool:
        return self.billed_usd is not None and self.baseline_usd is not None

    def to_json(self) -> str:
        row = dict(vars(self))
        row["billed_usd"] = _opt_nano(self.billed_usd)
        row["baseline_usd"] = _opt_nano(self.baseline_usd)
        row["levers"] = {name: to_nano(usd) for name, usd in self.levers.items()}
        row["tags"] = bounded_tags(self.tags)
        return json.dumps(row, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RequestRecord:
        row: dict[str, Any] = json.loads(text)
        for name in ("billed_usd", "baseline_usd"):
            nano = row.get(name)
            row[name] = None if nano is None else to_usd(int(nano))
        row["levers"] = {name: to_usd(int(n)) for name, n in row.get("levers", {}).items()}
        return cls(**row)


def bounded_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Tags as the ledger keeps them: lenient where ``check_tags`` is strict (never raises).

    Invalid names are dropped, values cut to 64 characters, at most 8 tags (by name).
    """
    kept: dict[str, str] = {}
    for name in sorted(k for k in tags if isinstance(k, str) and TAG_NAME.fullmatch(k)):
        if len(kept) == MAX_TAGS:
            break
        kept[name] = str(tags[name])[:MAX_TAG_VALUE]
    return kept


def split_usd(cost_usd: float | None, weights: Sequence[float]) -> list[float | None]:
    """A call's cost shared by ``weights`` (e.g. each request's tokens), summing exactly.

    The split is done in nano-dollars; None (unpriced) gives None for everyone.
    """
    if cost_usd is None:
        return [None] * len(weights)
    return [to_usd(part) for part in split_total(to_nano(cost_usd), weights)]


def levers_for(
    *,
    source: str,
    baseline_usd: float | None,
    billed_usd: float | None,
    cached_tokens: int = 0,
    price: Price | None = None,
) -> dict[str, float]:
    """Savings of one request by lever; they add up to ``baseline - billed`` (module docstring).

    ``cached_tokens`` is the request's share of the provider-cached prompt tokens of its call(s)
    and ``price`` that call's model price (needed only when ``cached_tokens`` > 0).
    Returns {} for an unpriced request. Zero levers are left out.
    """
    if baseline_usd is None or billed_usd is None:
        return {}
    saved = to_nano(baseline_usd) - to_nano(billed_usd)
    if source in HIT_SOURCES:
        return {source: to_usd(saved)} if saved else {}
    levers: dict[str, int] = {}
    if cached_tokens > 0 and price is not None:
        discount = price.input_per_m - price.cached_input_per_m
        levers["prompt_cache"] = round(cached_tokens * discount * 1000)  # nano per token = $/M*1e3
    rest = saved - sum(levers.values())
    levers["batching" if source == "batched" else OTHER] = rest
    return {name: to_usd(nano) for name, nano in levers.items() if nano}
