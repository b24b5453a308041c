"""How a batch's tokens are split fairly between its requests (prices: worker/ledger)."""

from __future__ import annotations

from collections.abc import Sequence


def split_total(total: int, weights: Sequence[float]) -> list[int]:
    """Split an integer total in proportion to ``weights`` so the parts add up exactly."""
    if not weights:
        return []
    weight_sum = sum(weights)
    if weight_sum <= 0:
        weights = [1.0] * len(weights)
        weight_sum = float(len(weights))
    raw = [total * w / weight_sum for w in weights]
    parts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def split_prompt(total: int, question_tokens: Sequence[int]) -> list[int]:
    """Shared prefix split evenly, each question's own tokens charged to it."""
    shared = max(0, total - sum(question_tokens)) / max(1, len(question_tokens))
    return split_total(total, [shared + q for q in question_tokens])
