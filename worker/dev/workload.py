"""Realistic request mixes for the demo and benchmarks, built in code so a clean clone has them."""

from __future__ import annotations

import random
from dataclasses import dataclass

SUPPORT_SYSTEM = (
    "You are the support assistant of an online shop. Answer in two or three sentences, "
    "politely and precisely. If an order number is given, refer to it."
)

_TOPICS = [
    "cancel my order {n}",
    "change the delivery address of order {n}",
    "track the parcel for order {n}",
    "get a refund for order {n}",
    "return a damaged item from order {n}",
    "add a gift note to order {n}",
    "pay for order {n} with a voucher",
    "get an invoice for order {n}",
    "speak to a person about order {n}",
    "delete my account",
    "reset my password",
    "change the email address on my account",
    "find the shipping costs to Norway",
    "use two vouchers at once",
    "subscribe to the newsletter",
]
_OPENERS = ["How do I", "Can you tell me how to", "What is the fastest way to", "Please help me"]


@dataclass(frozen=True)
class WorkItem:
    prompt: str
    model: str
    system: str | None


def support_burst(
    count: int, *, models: list[str], repeat_share: float = 0.2, seed: int = 7
) -> list[WorkItem]:
    """``count`` support questions under one system prompt; about ``repeat_share`` are repeats."""
    rng = random.Random(seed)
    items: list[WorkItem] = []
    for index in range(count):
        if items and rng.random() < repeat_share:
            items.append(rng.choice(items))
            continue
        prompt = _question(rng, index, 10_000 + index)
        items.append(WorkItem(prompt, models[index % len(models)], SUPPORT_SYSTEM))
    return items


def _question(rng: random.Random, index: int, number: int) -> str:
    topic = _TOPICS[index % len(_TOPICS)]
    text = f"{rng.choice(_OPENERS)} {topic.format(n=number)}?"
    return text if "{n}" in topic else f"{text} My customer number is {number}."


def distinct_questions(count: int, *, models: list[str], seed: int = 11) -> list[WorkItem]:
    """``count`` different questions (no repeats), for throughput figures that dedup can't help."""
    rng = random.Random(seed)
    return [
        WorkItem(_question(rng, i, 20_000 + i), models[i % len(models)], SUPPORT_SYSTEM)
        for i in range(count)
    ]
