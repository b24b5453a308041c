"""The reply parser on inline, restated and JSON layouts: every answer to its own slot, or None."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_batchprompt import PREAMBLES, SIGN_OFFS, WORDS, Reply, answers, batches, replies

from worker.batching.prompt import is_batch_safe, parse_answers

# A label anywhere: what must never reach a user inside an answer (written independently of
# the parser's own patterns), and marker text.
LABELISH = re.compile(
    r"(?<![a-z0-9])(?:answer|question|a|q)[ \t]*\[?[ \t]*\d+[ \t]*\]?[ \t]*[*_]*[ \t]*:(?=\s|$)"
    r"|===",
    re.IGNORECASE,
)

# --- inline layouts ----------------------------------------------------------------------------

INLINE = {
    "one line": ("A1: Paris. A2: Tokyo.", ["Paris.", "Tokyo."]),
    "bold": ("**A1:** Paris **A2:** Tokyo", ["Paris", "Tokyo"]),
    "bold outside": ("**A1**: Paris **A2**: Tokyo", ["Paris", "Tokyo"]),
    "bold whole": ("**A1: Paris** **A2: Tokyo**", ["Paris", "Tokyo"]),
    "italic": ("*A1:* Paris *A2:* Tokyo", ["Paris", "Tokyo"]),
    "bracketed": ("[A1]: Paris [A2]: Tokyo", ["Paris", "Tokyo"]),
    "commas": ("A1: Paris, A2: Tokyo, A3: Brasília", ["Paris", "Tokyo", "Brasília"]),
    "semicolons": ("A1: Paris; A2: Tokyo; A3: Brasília", ["Paris", "Tokyo", "Brasília"]),
    "comma after period": ("A1: Paris., A2: Tokyo.", ["Paris.", "Tokyo."]),
    "questions end": ("A1: Why not? A2: Because!", ["Why not?", "Because!"]),
    "answer words": ("Answer 1: Paris. Answer 2: Tokyo.", ["Paris.", "Tokyo."]),
    "preamble and sign-off": (
        "Sure! Here you go:\n\nA1: Paris. A2: Tokyo.\n\nHope this helps!",
        ["Paris.", "Tokyo."],
    ),
    "last answer runs on": ("A1: Paris. A2: Tokyo.\nIt is big.", ["Paris.", "Tokyo.\nIt is big."]),
    "shuffled but complete": ("A2: Tokyo. A3: Rome. A1: Paris.", ["Paris.", "Tokyo.", "Rome."]),
    "quoted": ("> A1: Paris. A2: Tokyo.", ["Paris.", "Tokyo."]),
    "code span inside an answer": ("A1: Use `x`. A2: Tokyo.", ["Use `x`.", "Tokyo."]),
}


@pytest.mark.parametrize(("reply", "expected"), INLINE.values(), ids=INLINE.keys())
def test_inline_layouts(reply: str, expected: list[str]) -> None:
    assert parse_answers(reply, len(expected)) == expected


RESTATED = {
    "one line each": "Q1: What is the capital of France? A1: Paris\nQ2: And of Japan? A2: Tokyo",
    "blank line between": "Q1: Capital of France? A1: Paris\n\nQ2: Of Japan? A2: Tokyo",
    "question line, answer line": "Q1: Capital of France?\nA1: Paris\nQ2: Of Japan?\nA2: Tokyo",
    "bold": "**Q1:** Capital of France? **A1:** Paris\n**Q2:** Of Japan? **A2:** Tokyo",
    "no question mark": "Q1: Tell me about France A1: Paris\nQ2: Tell me about Japan A2: Tokyo",
    "all on one line": "Q1: Capital of France? A1: Paris, Q2: Of Japan? A2: Tokyo",
    "question words": "Question 1: France?\nAnswer 1: Paris\nQuestion 2: Japan?\nAnswer 2: Tokyo",
    "shuffled": "Q2: Of Japan? A2: Tokyo\nQ1: Capital of France? A1: Paris",
    "multi-line question": "Q1: Capital of\nFrance?\nA1: Paris\nQ2: Of Japan?\nA2: Tokyo",
}


@pytest.mark.parametrize("reply", RESTATED.values(), ids=RESTATED.keys())
def test_restated_questions_are_never_part_of_an_answer(reply: str) -> None:
    assert parse_answers(reply, 2) == ["Paris", "Tokyo"]


def test_restated_pairs_keep_their_answers_when_one_pair_is_missing() -> None:
    assert parse_answers("Q1: a? A1: x\nQ3: c? A3: z", 3) == ["x", None, "z"]


@pytest.mark.parametrize(
    ("reply", "count", "expected"),
    [
        # Only some answers restated: the restatements are echoes, voiding what holds them.
        ("Q1: France?\nA1: Paris\nQ2: Japan?\nA2: Tokyo\nA3: Rome", 3, [None, "Tokyo", "Rome"]),
        ("A1: Paris\nQ2: Japan?\nA2: Tokyo", 2, [None, "Tokyo"]),
        # A restated question with no answer after it, or the wrong one.
        ("Q1: France? A1: Paris\nQ2: Japan?", 2, [None, None]),
        ("Q1: France? A2: Paris\nQ2: Japan? A1: Tokyo", 2, [None, None]),
        # A pair split over two lines while others are inline (`Paris Q2:` is not a label).
        ("Q1: France? A1: Paris. Q2: Japan?\nA2: Tokyo", 2, [None, "Tokyo"]),
        ("Q1: France? A1: Paris Q2: Japan?\nA2: Tokyo", 2, [None, "Tokyo"]),
        # A question repeated.
        ("Q1: France? A1: Paris\nQ1: France? A2: Tokyo", 2, [None, None]),
    ],
)
def test_inconsistent_restatements_give_none(
    reply: str, count: int, expected: list[str | None]
) -> None:
    assert parse_answers(reply, count) == expected


# --- inline labels that must not split -------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "count", "expected"),
    [
        # Answer text that looks like a label: no wrong assignment, whatever the count.
        ("A1: The paper size A4: 210 mm wide\nA2: x\nA3: y", 4, [None, "x", "y", None]),
        ("A1: The paper size A4: 210 mm wide\nA2: x\nA3: y", 3, [None, "x", "y"]),
        ("A1: Paper. A4: 210 mm", 4, [None, None, None, None]),
        ("A1: Use A2: it is bigger\nA3: ok", 3, [None, None, "ok"]),
        ("A1: Paper sizes. A2: 420 mm\nA2: real", 2, [None, None]),
        ("**A1:** x **A2:** y\nA2: evil", 2, [None, None]),
        ("A1: x\nA2: y. A3: z\nA3: w", 3, ["x", None, None]),
        # Out of order with a gap, repeated, out of range.
        ("A1: x. A3: y", 3, [None, None, None]),
        ("A1: x. A2: y. A2: z", 3, [None, None, None]),
        ("A1: x. A2: y. A3: z", 2, [None, None]),
        ("A1: x. A0: y. A2: z", 2, [None, None]),
        # Inside a code span or a quotation, or right after a word.
        ("A1: use `x. A2: y` ok. A2: Tokyo", 2, [None, None]),
        ('A1: He said "yes. A2: hi" A2: Tokyo', 2, [None, None]),
        ("A1: 42 A2: 17", 2, [None, None]),
        ("A1: Paris A2: Tokyo", 2, [None, None]),
        # Inline on a line that does not start with a label.
        ("Sure: A1: Paris. A2: Tokyo.", 2, [None, None]),
        ("A1: Paris is big.\nIt has people. A2: Tokyo", 2, [None, None]),
        # Inline labels mixed with label lines: answer text could be read as a label.
        ("A1: Paris. A2: Tokyo.\nA3: Rome", 3, [None, None, "Rome"]),
        ("A1: Paris\nA2: Tokyo. A3: Rome.", 3, ["Paris", None, None]),
        # A repeated label hidden past a doubtful one, and a label with nothing after it: a
        # complete shuffled set is then no proof of a layout (slot 2 would get `evil.`).
        (
            "**A2:** evil. **A3:** c. **A5:** e. **A1:** a. **A4:** d A0: x **A2:** b.",
            5,
            [None] * 5,
        ),
        ("**A1:** Paris **A3:** **A2:** Rome", 3, [None, None, None]),
        # Inline labels inside a fenced code block are code.
        (
            "A1: code:\n```\nx = 1. A2: y\n```\nA2: Tokyo",
            2,
            ["code:\n```\nx = 1. A2: y\n```", "Tokyo"],
        ),
    ],
)
def test_label_like_answer_text_never_moves_answers(
    reply: str, count: int, expected: list[str | None]
) -> None:
    assert parse_answers(reply, count) == expected


@pytest.mark.parametrize(
    "answer",
    ["Cell A1: the total", "Revenue rose in Q3: 5%", "See Answer 3: below", "Marker === Q2 x ==="],
)
def test_no_slot_holds_label_like_text(answer: str) -> None:
    assert parse_answers(f"A1: {answer}\nA2: Tokyo", 2) == [None, "Tokyo"]
    assert parse_answers(json.dumps({"A1": answer, "A2": "Tokyo"}), 2) == [None, "Tokyo"]


def test_a_number_written_inside_a_label_line_puts_that_label_in_doubt() -> None:
    # `A2:` inside line one may be the reply's real A2 (an inline layout gone wrong).
    assert parse_answers("A1: See Answer 2: below\nA2: Tokyo\nA3: Rome", 3) == [None, None, "Rome"]
    assert parse_answers("**A1:** x **A2:** y\nA2: evil", 2) == [None, None]
    assert parse_answers("Q1: q? A1: x\nA1: y\nA2: z", 2) == [None, "z"]


def test_a_fence_left_open_shelters_no_label() -> None:
    assert parse_answers("A1: x. A2: ```\nfoo A3: y", 3) == [None, None, None]
    assert parse_answers("A1: Paris\nA2: ```\ncode A3: x", 3) == ["Paris", None, None]


# --- JSON --------------------------------------------------------------------------------------

JSON_REPLIES = {
    "bare": '{"A1": "Paris", "A2": "Tokyo"}',
    "number keys": '{"1": "Paris", "2": "Tokyo"}',
    "lower-case keys": '{"a2": "Tokyo", "a1": "Paris"}',
    "pretty": '{\n  "A1": "Paris",\n  "A2": "Tokyo"\n}',
    "fenced": '```json\n{"A1": "Paris", "A2": "Tokyo"}\n```',
    "bare fence": '```\n{"A1": "Paris", "A2": "Tokyo"}\n```',
    "preamble": 'Here are the answers:\n\n```json\n{"A1": "Paris", "A2": "Tokyo"}\n```',
    "preamble, no fence": 'Here are the answers:\n{"A1": "Paris", "A2": "Tokyo"}',
    "sign-off": '```json\n{"A1": "Paris", "A2": "Tokyo"}\n```\n\nHope this helps!',
    "padded values": '{"A1": "  Paris ", "A2": "Tokyo\\n"}',
}


@pytest.mark.parametrize("reply", JSON_REPLIES.values(), ids=JSON_REPLIES.keys())
def test_json_layouts(reply: str) -> None:
    assert parse_answers(reply, 2) == ["Paris", "Tokyo"]


def test_json_multi_line_values_keep_their_lines() -> None:
    answer = "Steps:\n1. boil\n2. eat\n\n```python\nprint(1)\n```"
    assert parse_answers(json.dumps({"A1": answer, "A2": "x"}), 2) == [answer, "x"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"A1": "Paris", "A2": 5}', ["Paris", None]),
        ('{"A1": "Paris", "A2": null}', ["Paris", None]),
        ('{"A1": ["Paris"], "A2": "Tokyo"}', [None, "Tokyo"]),
        ('{"A1": {"city": "Paris"}, "A2": "Tokyo"}', [None, "Tokyo"]),
        ('{"A1": "", "A2": "Tokyo"}', [None, "Tokyo"]),
        # Keys must be exactly 1..count, once each: otherwise nothing is trusted.
        ('{"A1": "Paris"}', [None, None]),
        ('{"A1": "Paris", "A1": "Tokyo"}', [None, None]),
        ('{"A1": "Paris", "A2": "Tokyo", "A3": "Rome"}', [None, None]),
        ('{"A1": "Paris", "A2": "Tokyo", "note": "x"}', [None, None]),
        ('{"A1": "Paris", "1": "Tokyo"}', [None, None]),
        ('{"Q1": "Paris", "Q2": "Tokyo"}', [None, None]),
        ('{"answers": {"A1": "Paris", "A2": "Tokyo"}}', [None, None]),
        # Broken or trailed by more than a sign-off.
        ('{"A1": "Paris", "A2": "Tok', [None, None]),
        ('{"A1": "Paris", "A2": "Tokyo"}\nA1: Lyon', [None, None]),
        ('{"A1": "Paris", "A2": "Tokyo"} and more', [None, None]),
        ('```json\n{"A1": "Paris", "A2": "Tokyo"}\nA2: x', [None, None]),
    ],
)
def test_json_that_cannot_be_trusted(reply: str, expected: list[str | None]) -> None:
    assert parse_answers(reply, 2) == expected


def test_json_inside_an_answer_is_answer_text() -> None:
    reply = 'A1: {"key": 1}\nA2: ```json\n{"A1": "x"}\n```'
    assert parse_answers(reply, 2) == ['{"key": 1}', '```json\n{"A1": "x"}\n```']


def test_a_long_preamble_or_one_with_labels_is_not_json() -> None:
    reply = "One.\nTwo.\nThree.\nFour.\n" + '{"A1": "Paris", "A2": "Tokyo"}'
    assert parse_answers(reply, 2) == [None, None]


# --- linear time ----------------------------------------------------------------------------

ADVERSARIAL = [
    "A1: " + "x. A2: " * 14_000,
    "A1: " + "**A" * 33_000,
    "A1: " + " A1:" * 25_000,
    "Q1: " + "q? A1: x. Q1: " * 7_000,
    "A1: " + "answer " * 14_000 + "1",
    "A1: " + "`" * 50_000 + " A2: " + "`" * 49_999,
    "A1: " + "` " * 50_000 + "A2: x",
    "A1: " + '"' * 100_000 + " A2: x",
    "A1: " + "a" + "1" * 100_000 + ": x",
    "A1: x." + " " * 100_000 + "A2: y",
    "{" * 100_000,
    '```json\n{"A1": ' + "[" * 50_000,
    "[" * 50_000 + "A1",
    "*" * 100_000 + "A1:",
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text", ADVERSARIAL, ids=[f"case{i}" for i in range(len(ADVERSARIAL))])
def test_inline_patterns_take_linear_time(text: str) -> None:
    # About 100 KB each; a backtracking or quadratic scan would take minutes.
    assert len(text) >= 50_000
    for count in (1, 2):
        assert len(parse_answers(text, count)) == count
    assert len(parse_answers("\n".join([text, text]), 3)) == 3
    is_batch_safe(text)


# --- properties --------------------------------------------------------------------------------


@st.composite
def one_liners(draw: st.DrawFn, ends: str = ".?!:") -> str:
    """A one-line, batch-safe answer or question."""
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))
    text = " ".join([words[0].capitalize(), *words[1:]]) + draw(st.sampled_from([*ends, ""]))
    assume(is_batch_safe(text))
    return text


@dataclass(frozen=True)
class Layout:
    """How a one-line layout writes answer ``n``; ``{q}`` is the restated question."""

    block: str
    joiner: str
    ends: str  # how answers may end for the layout to be unambiguous ("" = anything)


LAYOUTS = {
    "inline": Layout("A{n}: {t}", " ", ".?!"),
    "bold inline": Layout("**A{n}:** {t}", " ", ""),
    "bold outside": Layout("**A{n}**: {t}", " ", ""),
    "bracketed": Layout("[A{n}]: {t}", " ", ""),
    "commas": Layout("A{n}: {t}", ", ", ""),
    "semicolons": Layout("A{n}: {t}", "; ", ""),
    "restated": Layout("Q{n}: {q} A{n}: {t}", "\n", ""),
    "restated, blank lines": Layout("Q{n}: {q} A{n}: {t}", "\n\n", ""),
    "restated bold": Layout("**Q{n}:** {q} **A{n}:** {t}", "\n", ""),
    "restated on two lines": Layout("Q{n}: {q}\nA{n}: {t}", "\n", ""),
    "restated on one line": Layout("Q{n}: {q} A{n}: {t}", " ", ".?!"),
}


@st.composite
def one_line_batches(draw: st.DrawFn, layout: Layout) -> tuple[list[str], list[str], list[int]]:
    """Answers (each with its own `ref<n>z`), questions and the order the reply gives them in."""
    count = draw(st.integers(1, 8))
    endings = list(layout.ends) if layout.ends else [".", "?", "!", ":", ""]
    texts = []
    for n in range(1, count + 1):
        words = [*draw(st.lists(st.sampled_from(WORDS), max_size=6)), f"ref{n}z"]
        text = " ".join([words[0].capitalize(), *words[1:]]) + draw(st.sampled_from(endings))
        assume(is_batch_safe(text))
        texts.append(text)
    questions = [draw(one_liners()) for _ in range(count)]
    order = draw(st.permutations(range(1, count + 1)) | st.just(list(range(1, count + 1))))
    return texts, questions, list(order)


def render(layout: Layout, blocks: list[tuple[int, str, str]]) -> str:
    return layout.joiner.join(layout.block.format(n=n, t=t, q=q) for n, t, q in blocks)


def frame(body: str, data: st.DataObject) -> str:
    preamble = data.draw(st.none() | st.sampled_from(PREAMBLES), label="preamble")
    sign_off = data.draw(st.none() | st.sampled_from(SIGN_OFFS), label="sign-off")
    return (f"{preamble}\n\n" if preamble else "") + body + (sign_off or "")


@given(st.sampled_from(sorted(LAYOUTS)), st.data())
def test_property_one_line_layouts_round_trip(name: str, data: st.DataObject) -> None:
    layout = LAYOUTS[name]
    texts, questions, order = data.draw(one_line_batches(layout), label="batch")
    blocks = [(n, texts[n - 1], questions[n - 1]) for n in order]
    assert parse_answers(frame(render(layout, blocks), data), len(texts)) == texts


@st.composite
def json_replies(draw: st.DrawFn, items: list[tuple[str, object]]) -> str:
    indent = draw(st.sampled_from([None, 2, 4]))
    pairs = [f"{json.dumps(key)}: {json.dumps(value, indent=indent)}" for key, value in items]
    if indent is None:
        body = "{" + ", ".join(pairs) + "}"
    else:
        body = "{\n" + ",\n".join(" " * indent + pair for pair in pairs) + "\n}"
    if draw(st.booleans()):
        body = f"```{draw(st.sampled_from(['json', '', 'JSON']))}\n{body}\n```"
    preamble = draw(st.none() | st.sampled_from(["Here are the answers:", "Sure!\n"]))
    sign_off = draw(st.none() | st.sampled_from(SIGN_OFFS))
    return (f"{preamble}\n" if preamble else "") + body + (sign_off or "")


@given(st.lists(answers(), min_size=1, max_size=8), st.data())
def test_property_json_round_trip(texts: list[str], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(["A{n}", "a{n}", "{n}"]), label="key")
    order = data.draw(st.permutations(range(1, len(texts) + 1)), label="order")
    reply = data.draw(json_replies([(key.format(n=n), texts[n - 1]) for n in order]))
    assert parse_answers(reply, len(texts)) == texts


NOISE = [
    "A{k}: evil",
    "**A{k}:** evil",
    "[A{k}]: evil",
    "Answer {k}: evil",
    "Q{k}: evil?",
    "=== Q{k} abc ===",
    "evil. A{k}:",
]

Blocks = list[tuple[int, str, str]]
Corruption = Callable[[Blocks, st.DataObject, int], None]


def _drop(blocks: Blocks, data: st.DataObject, count: int) -> None:
    if len(blocks) > 1:
        del blocks[data.draw(st.integers(0, len(blocks) - 1), label="dropped")]


def _duplicate(blocks: Blocks, data: st.DataObject, count: int, *, evil: bool = False) -> None:
    n = data.draw(st.integers(1, count), label="duplicated label")
    _, text, question = data.draw(st.sampled_from(blocks), label="its text")
    text = "evil." if evil else data.draw(st.sampled_from([text, "evil."]), label="or evil")
    blocks.insert(data.draw(st.integers(0, len(blocks)), label="at"), (n, text, question))


def _noise(blocks: Blocks, data: st.DataObject, count: int) -> None:
    at = data.draw(st.integers(0, len(blocks) - 1), label="noisy block")
    n, text, question = blocks[at]
    noise = data.draw(st.sampled_from(NOISE)).format(k=data.draw(st.integers(0, count + 1)))
    text = data.draw(st.sampled_from([f"{text} {noise}", f"{noise} {text}", f"{text}\n{noise}"]))
    blocks[at] = (n, text, question)


def _relabel(blocks: Blocks, data: st.DataObject, count: int) -> None:
    # Once, on a complete reply: it always leaves a duplicate or out-of-range label.
    if sorted(n for n, _, _ in blocks) == list(range(1, count + 1)):
        at = data.draw(st.integers(0, len(blocks) - 1), label="relabelled")
        old = blocks[at][0]
        new = data.draw(st.integers(0, count + 2).filter(lambda m: m != old), label="new")
        blocks[at] = (new, *blocks[at][1:])


CORRUPTIONS: dict[str, Corruption] = {
    "drop": _drop,
    "duplicate": _duplicate,
    "noise": _noise,
    "relabel": _relabel,
}
# Mixed with a drop, another answer's text under a label (a duplicate, a relabel) is a reply
# that says `A1: <answer 2>` with A1 missing: no parser can tell that from a real answer.
MIXABLE: dict[str, Corruption] = {
    "drop": _drop,
    "duplicate": lambda blocks, data, count: _duplicate(blocks, data, count, evil=True),
    "noise": _noise,
}


def assert_no_leak(slots: list[str | None], texts: list[str]) -> None:
    """No slot holds another slot's text (each carries its own `ref<n>z`) or any label."""
    for i, slot in enumerate(slots, start=1):
        if slot is None:
            continue
        assert LABELISH.search(slot) is None, slot
        others = re.findall(r"ref(\d+)z", slot)
        assert all(int(n) == i for n in others), (i, slot)


@given(
    st.sampled_from(sorted(LAYOUTS)),
    st.sampled_from(sorted(CORRUPTIONS)),
    st.integers(1, 3),
    st.data(),
)
def test_property_one_line_layouts_never_move_answers(
    name: str, corruption: str, times: int, data: st.DataObject
) -> None:
    layout = LAYOUTS[name]
    texts, questions, order = data.draw(one_line_batches(layout), label="batch")
    blocks = [(n, texts[n - 1], questions[n - 1]) for n in order]
    for _ in range(times):
        CORRUPTIONS[corruption](blocks, data, len(texts))
    slots = parse_answers(frame(render(layout, blocks), data), len(texts))
    assert_no_leak(slots, texts)
    assert all(slot in (None, texts[i]) for i, slot in enumerate(slots)), slots


@given(st.sampled_from(sorted(LAYOUTS)), st.data())
def test_property_any_mix_of_corruptions_never_leaks(name: str, data: st.DataObject) -> None:
    # Mixed corruptions can truncate an answer (a dropped label whose number an injected
    # label happens to carry): still never another slot's text or any label.
    layout = LAYOUTS[name]
    texts, questions, order = data.draw(one_line_batches(layout), label="batch")
    blocks = [(n, texts[n - 1], questions[n - 1]) for n in order]
    for corruption in data.draw(st.lists(st.sampled_from(sorted(MIXABLE)), max_size=4)):
        MIXABLE[corruption](blocks, data, len(texts))
    preamble = data.draw(st.sampled_from(["", "Sure! A1: here.\n", "=== Q1 abc ===\n"]))
    assert_no_leak(parse_answers(preamble + render(layout, blocks), len(texts)), texts)


@given(st.lists(answers(), min_size=1, max_size=6), st.data())
def test_property_json_never_moves_answers(texts: list[str], data: st.DataObject) -> None:
    texts = [f"ref{n}z\n{text}" for n, text in enumerate(texts, start=1)]
    items: list[tuple[str, object]] = [(f"A{n}", t) for n, t in enumerate(texts, start=1)]
    items = data.draw(st.permutations(items), label="order")
    kind = data.draw(st.sampled_from(["drop", "duplicate", "noise", "not a string", "extra"]))
    at = data.draw(st.integers(0, len(items) - 1), label="at")
    key, value = items[at]
    if kind == "drop":
        del items[at]
    elif kind == "duplicate":
        items.insert(
            data.draw(st.integers(0, len(items))), (key, data.draw(st.sampled_from(texts)))
        )
    elif kind == "noise":
        items[at] = (key, f"{value}\n{data.draw(st.sampled_from(NOISE)).format(k=1)}")
    elif kind == "not a string":
        items[at] = (key, data.draw(st.sampled_from([1, None, [value], {"A1": value}])))
    else:
        items.append((data.draw(st.sampled_from(["A0", f"A{len(texts) + 1}", "note"])), "x"))
    slots = parse_answers(data.draw(json_replies(items)), len(texts))
    assert_no_leak(slots, texts)
    assert all(slot in (None, texts[i]) for i, slot in enumerate(slots)), slots
    if kind in ("drop", "duplicate", "extra"):
        assert slots == [None] * len(texts)


@given(batches(), replies, st.data())
def test_property_inline_noise_never_fills_a_missing_slot(
    batch: tuple[list[str], list[int]], reply: Reply, data: st.DataObject
) -> None:
    # Answer text carrying the very label a reply left out, in a reply of label lines: the
    # inline label must not be taken for the missing one.
    texts, order = batch
    assume(len(texts) >= 3)
    dropped = data.draw(st.sampled_from(order), label="dropped")
    blocks = [(n, texts[n - 1]) for n in order if n != dropped]
    at = data.draw(st.integers(0, len(blocks) - 1), label="noisy block")
    n, text = blocks[at]
    first, *more = text.split("\n")
    noise = data.draw(st.sampled_from(["A{k}: evil", "**A{k}:** evil", "Q{k}: x? A{k}: evil"]))
    blocks[at] = (n, "\n".join([f"{first}. {noise.format(k=dropped)}", *more]))
    slots = parse_answers(reply.render(blocks), len(texts))
    assert slots[dropped - 1] is None and slots[n - 1] is None
    assert all(slot in (None, texts[i]) for i, slot in enumerate(slots)), slots
