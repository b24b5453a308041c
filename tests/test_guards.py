"""Every guard: the fact it protects must match, and a harmless rephrasing still passes."""

from __future__ import annotations

import json
import re

import pytest

from worker.cache.guards import Features, features, mismatch


def guard(a: str, b: str) -> str | None:
    """The failed guard's name, checked both ways (a guard must be symmetric)."""
    forward = mismatch(features(a), features(b))
    assert mismatch(features(b), features(a)) == forward
    return forward


@pytest.mark.parametrize(
    ("a", "b", "name"),
    [
        ("cancel order 732201349959", "cancel order 113542617735902", "numbers"),
        ("how do I cancel purchase 00123842", "how do I cancel purchase 00004587345", "numbers"),
        ("How do I lose 5 kg in a month?", "How do I lose 10 kg in a month?", "numbers"),
        ("What is the third law of motion?", "What is the second law of motion?", "numbers"),
        ("How do I get two million followers?", "How do I get three million followers?", "numbers"),
        ("can i see invoice #85632", "can i see invoice #12588", "numbers"),
        ("status of ticket ABC-123", "status of ticket ABC-124", "codes"),
        ("where is order #A77", "where is order #B77", "codes"),
        ("Is iPhone 5s waterproof?", "Is iPhone 6s waterproof?", "codes"),
        ("Can I trust healthwarehouse.com?", "Can I trust iimjobs.com?", "codes"),
        ("I paid $160 for this order", "I paid $299 for this order", "amounts"),
        ("refund of 20 euros", "refund of 20 dollars", "amounts"),
        ("Is it open on Monday?", "Is it open on Tuesday?", "dates"),
        ("book a table for 5 March", "book a table for 6 March", "numbers"),
        ("deliver on 2023-01-05", "deliver on 2023-01-06", "dates"),
        ("deliver on 05/01/2024", "deliver on 06/01/2024", "dates"),
        ("meeting at 5pm", "meeting at 6pm", "dates"),
        ("what happened yesterday in the market", "what happens tomorrow in the market", "dates"),
        ("events in March 2020", "events in April 2020", "dates"),
        ("What are todays best deals?", "What are tomorrows best deals?", "dates"),
        ('what does "hello world" mean', 'what does "goodbye world" mean', "quoted"),
        ("Who is Mr. Jones?", "Who is Mr. Smith?", "entities"),
        ("do you ship to Munich", "do you ship to Detroit", "entities"),
        ("Why is the sky blue?", "Why is the sky not blue?", "negation"),
        ("Why does my code work?", "Why doesn't my code work?", "negation"),
        (
            "how to earn money with an investment",
            "how to earn money without an investment",
            "negation",
        ),
        ("I can come today", "I cannot come today", "negation"),
        ("How do I convert dollars to euros?", "How do I convert euros to dollars?", "direction"),
        (
            "How do I convert Celsius to Fahrenheit?",
            "How do I convert Fahrenheit to Celsius?",
            "direction",
        ),
        ("flights from Paris to London", "flights from London to Paris", "direction"),
        ("Is Python better than Java?", "Is Java better than Python?", "direction"),
        ("Python vs Java for beginners", "Java vs Python for beginners", "direction"),
        ("translate english to french", "translate french to english", "direction"),
    ],
)
def test_guard_fails(a: str, b: str, name: str) -> None:
    assert guard(a, b) == name


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("cancel order 732201349959", "please cancel my order 732201349959"),
        ("How can I learn Python?", "What is the best way to learn python?"),
        ("How can I get a refund", "how do i get my money back"),
        ("I paid 1,000 dollars", "I paid $1000"),
        ("flights from Paris to London", "flights to London from Paris"),
        ("What is the capital of France?", "Which city is the capital of France?"),
        ("Why doesn't my code work?", "Why does my code not work?"),
        ("How do I improve my English?", "How can I improve my English language skills?"),
        ("invoice #85632 please", "show me invoice 85632"),
        (
            "Which team will win the 2016-17 Premier League?",
            "Which team will win the 2016/17 Premier League?",
        ),
        ("What is the real meaning of 'Jihad'?", "What is the true meaning of jihad?"),
        ("What are Bollywood's best dialogues?", "What are the best dialogues in Bollywood?"),
    ],
)
def test_guard_passes(a: str, b: str) -> None:
    assert guard(a, b) is None


def test_features_hold_hashes_not_text() -> None:
    text = 'cancel order 732201349959 for "Anna Freeman" in Munich on 2024-02-03, $50'
    data = json.loads(features(text).dump())
    values = [v for value in data.values() if isinstance(value, list) for v in value]
    assert len(values) >= 6
    assert all(re.fullmatch(r"[0-9a-f]{12}", v) for v in values)


def test_dump_load_round_trip() -> None:
    feats = features('Is "big data" better than AI for order #A77 on Monday? I paid $5, not 6')
    assert Features.load(feats.dump()) == feats
    assert mismatch(Features.load(feats.dump()), feats) is None


def test_load_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        Features.load("[1, 2]")


def test_version_mismatch_is_a_miss() -> None:
    old = Features(version=0)
    assert mismatch(features("hello there"), old) == "version"
