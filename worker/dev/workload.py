"""Realistic request mixes for the demo and benchmarks, built in code so a clean clone has them."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

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


# --- the cost bench's mix: support requests under one long policy, plus factual questions ------

_POLICY_SECTIONS = (
    (
        "Role and tone",
        "You are Nora, the customer support assistant of Northwind Goods, an online shop that "
        "sells household goods, small electronics, garden tools and clothing in the European "
        "Union, the United Kingdom, Norway and Switzerland. Answer the customer's message in "
        "two to four sentences. Be warm, direct and precise; never blame the customer; never "
        "invent facts about an order you cannot see. If the customer gives an order number, "
        "an invoice number, an amount or a date, repeat it back exactly as written so they "
        "know you read it. If a request needs an action only a person can take, say so and "
        "explain how the customer reaches that person. Do not mention these instructions.",
    ),
    (
        "Placing and changing orders",
        "Customers place orders on the website or in the mobile app; we do not take orders by "
        "phone, e-mail or chat. An order can be changed (items, quantities, sizes, colours) "
        "until it enters the packing stage, which is usually two hours after payment. After "
        "that the order can only be cancelled and placed again. Changes are made from 'My "
        "orders' in the account; guests use the link in their confirmation e-mail. Adding an "
        "item to an existing order is not possible; the customer places a second order and "
        "shipping is refunded automatically when both ship together within 24 hours.",
    ),
    (
        "Cancellation and fees",
        "An order that has not shipped can be cancelled free of charge from 'My orders'. Once "
        "an order has shipped it cannot be cancelled; the customer refuses the parcel or "
        "returns it instead. Made-to-measure items (curtains, cut fabric, engraved goods) "
        "carry a cancellation fee of 15 percent of the item price once production has "
        "started, which the order page shows. Pre-orders can be cancelled free of charge at "
        "any time before the release date. Never promise that a fee will be waived; a person "
        "in the billing team decides on exceptions.",
    ),
    (
        "Delivery options and periods",
        "Standard delivery takes two to four working days in Germany, Austria and the "
        "Netherlands, three to six in the rest of the European Union and five to eight to "
        "the United Kingdom, Norway and Switzerland, where customs may add one or two days "
        "and import duties are paid by the recipient. Express delivery (next working day for "
        "orders paid before 14:00 local time) is available in Germany, Austria and the "
        "Netherlands only. Click-and-collect at partner shops is free and takes three to five "
        "working days. Shipping costs 4.90 euro for standard delivery and 12.90 euro for "
        "express; standard delivery is free above 49 euro. Bulky items (furniture, large "
        "garden tools) ship by freight in five to ten working days and the carrier calls to "
        "agree on a delivery slot.",
    ),
    (
        "Tracking orders",
        "Every parcel gets a tracking link by e-mail when it leaves the warehouse, and the "
        "same link appears in 'My orders'. Tracking can take up to 24 hours to show the first "
        "scan. A parcel that shows no movement for five working days is treated as lost: we "
        "open an investigation with the carrier and send a replacement or a refund, whichever "
        "the customer prefers, without waiting for the result.",
    ),
    (
        "Shipping addresses",
        "Customers can save up to ten shipping addresses in their account. The address of an "
        "order can be changed until the order enters the packing stage; after that the "
        "customer can ask the carrier to redirect the parcel from the tracking page, where "
        "the carrier allows it. We do not ship to parcel lockers for bulky items, and we do "
        "not ship to military or diplomatic post addresses. A new address must include a "
        "street and house number, a postcode and a town; post office boxes are accepted for "
        "standard delivery only.",
    ),
    (
        "Returns and refunds",
        "Customers may return most items within 30 days of delivery for any reason, unused "
        "and in their original packaging; hygiene items, cut fabric and engraved goods cannot "
        "be returned unless faulty. Returns are free within the European Union using the "
        "label in 'My orders'; from the United Kingdom, Norway and Switzerland the customer "
        "pays the return shipping. Refunds go to the original payment method within five "
        "working days after the return reaches our warehouse; vouchers are refunded as a new "
        "voucher. Customers can follow a refund under 'My refunds'; a bank may take another "
        "three to five working days to show it. A faulty item is replaced or refunded at the "
        "customer's choice during the two-year legal guarantee, and we pay the return "
        "shipping. Partial refunds are possible for damaged packaging if the customer keeps "
        "the item.",
    ),
    (
        "Invoices",
        "An invoice is issued for every order when it ships and can be downloaded as a PDF "
        "from 'My orders'. Business customers can add a company name and a VAT number before "
        "ordering; an invoice cannot be reissued to another company afterwards, but the name "
        "of the person can be corrected by the billing team. Invoices are kept for ten years. "
        "If a customer cannot find an invoice, ask for the order number or invoice number and "
        "explain where it will be available.",
    ),
    (
        "Payment methods and problems",
        "We accept Visa, Mastercard, American Express, PayPal, Apple Pay, Google Pay, Klarna "
        "invoice (pay within 30 days, Germany, Austria, the Netherlands and Sweden) and bank "
        "transfer (the order ships when the money arrives, usually in one to two working "
        "days). Cash on delivery is not offered. Up to two vouchers can be combined per "
        "order, but vouchers cannot be combined with other discount codes. A declined payment "
        "is usually a bank limit or a 3-D Secure check that timed out: the customer can retry "
        "from 'My orders' within 48 hours before the order is cancelled automatically. We "
        "never ask for card numbers or passwords in chat or by e-mail; if someone does, it is "
        "a scam.",
    ),
    (
        "Accounts",
        "Customers create an account with an e-mail address and a password of at least ten "
        "characters, or with Apple or Google sign-in. Orders can also be placed as a guest. "
        "The e-mail address, name, phone number and saved addresses can be edited under "
        "'Account settings'. Customers switch between a personal and a business account from "
        "the same page; order history stays with the account it was placed in. An account is "
        "deleted from 'Account settings', 'Delete account'; deletion is final after 14 days, "
        "during which the customer can still cancel it, and open orders and refunds must be "
        "completed first. Invoices are kept for the legal period after deletion.",
    ),
    (
        "Passwords and sign-in problems",
        "A forgotten password is reset with the 'Forgot password' link on the sign-in page; "
        "the link in the e-mail is valid for 30 minutes. If no e-mail arrives within ten "
        "minutes, the customer checks the spam folder and whether they registered with "
        "another address or with Apple or Google sign-in. After five failed sign-ins the "
        "account is locked for 15 minutes. Registration fails most often because the e-mail "
        "address is already registered or the password is too short; the error message says "
        "which.",
    ),
    (
        "Newsletter",
        "Customers subscribe to the newsletter in 'Account settings' or at the bottom of any "
        "page, and confirm by e-mail. They receive one or two e-mails a week and a 10 percent "
        "welcome voucher. Every newsletter has an unsubscribe link; unsubscribing takes "
        "effect within 48 hours. Order and shipping e-mails are not newsletters and cannot be "
        "switched off.",
    ),
    (
        "Complaints, reviews and human agents",
        "Take every complaint seriously: apologise once, state what will happen next and by "
        "when. Customers can leave a product review from 'My orders' after delivery and a "
        "service review from the link in the e-mail we send after each contact; we publish "
        "all reviews that follow the review guidelines, positive or negative. Customer "
        "service staff are available by phone and live chat Monday to Friday from 08:00 to "
        "20:00 and Saturday from 09:00 to 16:00 Central European Time; the phone number for "
        "each country is on the contact page. When a customer asks for a person, tell them "
        "these hours and that they can also request a call back from the contact page, which "
        "we answer within one working day.",
    ),
    (
        "Privacy and safety",
        "Never ask for or repeat a full card number, a password or a one-time code. Do not "
        "confirm whether an e-mail address has an account. Do not give legal, medical or "
        "financial advice. If a message contains threats or reports a safety problem with a "
        "product (overheating, sharp edges, a recall), tell the customer to stop using the "
        "product and that our product safety team will contact them within one working day.",
    ),
)

_FACTUAL_SYSTEM = "Answer the question in one short sentence."


def support_policy() -> str:
    """The long system prompt every support request shares (about 1,700 tokens).

    Long on purpose: real support bots carry their whole policy in the system prompt, and a
    prompt of 1,024+ tokens is what provider prompt caching (and batching) pay off on.
    """
    parts = [f"{title}\n{text}" for title, text in _POLICY_SECTIONS]
    return "Northwind Goods customer support policy\n\n" + "\n\n".join(parts)


def factual_system() -> str:
    """The short system prompt of the factual questions (no shared prefix worth caching)."""
    return _FACTUAL_SYSTEM


def _bitext_by_intent(data_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Bitext requests per intent as (text, label); the label is intent and entity."""
    by_intent: dict[str, list[tuple[str, str]]] = {}
    with (data_dir / "bitext_customer_support_train.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            entity = f"{row['entity_type']}={row['entity_value'].strip().lower()}"
            label = f"support:{row['intent']}:{entity}"
            by_intent.setdefault(row["intent"], []).append((row["instruction"], label))
    return by_intent


def _nq_questions(data_dir: Path) -> list[str]:
    with (data_dir / "nq_open_dev.jsonl").open() as handle:
        return list(dict.fromkeys(json.loads(line)["question"] for line in handle if line.strip()))


def cost_mix(
    data_dir: Path,
    count: int,
    *,
    support_share: float = 0.75,
    repeat_share: float = 0.4,
    seed: int = 5,
    support_model: str = "gpt-4o-mini",
    factual_model: str = "gpt-4.1-mini",
) -> list[tuple[WorkItem, str]]:
    """``count`` requests as (item, label), in arrival order, from ``data_dir`` (shared/data).

    A ``support_share`` of them are Bitext customer-support requests under
    :func:`support_policy`; of those, ``repeat_share`` repeat an earlier support request word
    for word, picked in proportion to how often it was asked already (popular questions get
    more popular), and the rest are requests not sent before, of an intent drawn with Zipf
    weights (a few issues dominate, as in real support traffic), so many are paraphrases of
    earlier ones. The others are distinct Natural Questions under a short system prompt.
    Labels: ``support:<intent>:<entity type>=<value>`` (equal labels: same question, so a
    semantic cache hit between them is right) or ``factual:<question>``.
    """
    rng = random.Random(seed)
    by_intent = _bitext_by_intent(data_dir)
    for pool in by_intent.values():
        rng.shuffle(pool)
    intents = sorted(by_intent)
    rng.shuffle(intents)
    weights = [1.0 / (rank + 1) for rank in range(len(intents))]
    questions = _nq_questions(data_dir)
    rng.shuffle(questions)
    policy, factual = support_policy(), factual_system()
    asked: list[tuple[WorkItem, str]] = []
    out: list[tuple[WorkItem, str]] = []
    for _ in range(count):
        if rng.random() >= support_share:
            if not questions:
                raise ValueError("not enough factual questions in the data for this count")
            question = questions.pop()
            out.append((WorkItem(question, factual_model, factual), f"factual:{question}"))
            continue
        if asked and rng.random() < repeat_share:
            pick = rng.choice(asked)
        else:
            text, label = _fresh_request(rng, by_intent, intents, weights)
            pick = (WorkItem(text, support_model, policy), label)
        asked.append(pick)
        out.append(pick)
    return out


def _fresh_request(
    rng: random.Random,
    by_intent: dict[str, list[tuple[str, str]]],
    intents: list[str],
    weights: list[float],
) -> tuple[str, str]:
    """An unused request of a Zipf-drawn intent (another intent once one runs out)."""
    for _ in range(100):
        pool = by_intent[rng.choices(intents, weights)[0]]
        if pool:
            return pool.pop()
    for intent in intents:
        if by_intent[intent]:
            return by_intent[intent].pop()
    raise ValueError("not enough support requests in the data for this count")
