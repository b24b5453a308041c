"""SlotStream: answers released as soon as they are complete, never one the final parse rejects
without saying so, and never one holding another slot's label."""

from __future__ import annotations

import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_batchprompt import CORRUPTIONS, Reply, batches, replies
from test_batchprompt_layouts import LABELISH, LAYOUTS, one_line_batches, render

from worker.batching.prompt import parse_answers
from worker.batching.stream import SlotStream, StreamResult


def releases(text: str, count: int, chunks: list[str] | None = None) -> list[tuple[int, int, str]]:
    """(characters fed so far, slot, text) for each release, feeding ``chunks`` or 1 char each."""
    stream = SlotStream(count)
    fed, out = 0, []
    for chunk in chunks if chunks is not None else list(text):
        fed += len(chunk)
        out.extend((fed, slot, released) for slot, released in stream.feed(chunk))
    return out


def run(chunks: list[str], count: int) -> StreamResult:
    stream = SlotStream(count)
    released: dict[int, str] = {}
    for chunk in chunks:
        for slot, text in stream.feed(chunk):
            assert slot not in released, "released twice"
            released[slot] = text
    result = stream.finish()
    assert result.released == released
    assert stream.text == "".join(chunks)
    return result


# --- when answers are released -----------------------------------------------------------------


def test_an_answer_is_released_once_the_next_label_is_certain() -> None:
    reply = "Sure!\n\nA1: Paris is\nthe capital.\nA2: Berlin\nA3: Rome"
    at = reply.index("A2: ") + len("A2: ")
    assert releases(reply, 3) == [
        (at, 0, "Paris is\nthe capital."),
        (reply.index("A3: ") + len("A3: "), 1, "Berlin"),
    ]


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("A1: Paris\n**A2:** Berlin", "**A2:** "),
        ("A1: Paris\nAnswer 2 - Berlin", "Answer 2 - "),
        ("A1: Paris\n[A2] Berlin", "[A2] "),
        ("> A1: Paris\n> A2: Berlin", "> A2: "),
    ],
)
def test_label_shapes_become_certain_after_their_separator(reply: str, label: str) -> None:
    assert releases(reply, 2) == [(reply.index(label) + len(label), 0, "Paris")]


def test_a_label_alone_on_its_line_is_certain_when_the_line_ends() -> None:
    for label in ("### A2", "A2:", "**A2**"):
        reply = f"A1: Paris\n{label}\nBerlin"
        assert releases(reply, 2) == [(reply.index(label) + len(label) + 1, 0, "Paris")]


def test_a_digit_may_still_follow_so_a2_is_not_yet_a2() -> None:
    reply = "A1: Paris\nA23: x"
    assert releases(reply, 30) == []


@pytest.mark.parametrize(
    ("reply", "texts"),
    [
        ("A1: Paris. A2: Tokyo. A3: Rome.", ["Paris.", "Tokyo."]),
        ("**A1:** Paris **A2:** Tokyo **A3:** Rome", ["Paris", "Tokyo"]),
        ("A1: Paris, A2: Tokyo, A3: Rome", ["Paris", "Tokyo"]),
        ("Here:\nA1: Paris; A2: Tokyo; A3: Rome\nmore", ["Paris", "Tokyo"]),
    ],
)
def test_inline_answers_are_released_at_the_next_inline_label(reply: str, texts: list[str]) -> None:
    got = releases(reply, 3)
    assert [(slot, text) for _, slot, text in got] == list(enumerate(texts))
    for (fed, slot, _), label in zip(got, ["A2:", "A3:"], strict=True):
        assert reply[:fed].rstrip().endswith((label, label + "**")), (slot, reply[:fed])
    assert run([reply], 3).mismatches == []


def test_crlf_split_between_deltas() -> None:
    result = run(["A1: Paris\r", "\nA2: Berlin\r", "\r\nA3: x"], 3)
    assert result.released == {0: "Paris", 1: "Berlin"}
    assert result.slots == ["Paris", "Berlin", "x"]


# --- when everything is held -------------------------------------------------------------------

HELD = {
    "restated": "Q1: France? A1: Paris\nQ2: Japan? A2: Tokyo\nQ3: Italy? A3: Rome",
    "restated lines": "Q1: France?\nA1: Paris\nQ2: Japan?\nA2: Tokyo\nQ3: x?\nA3: Rome",
    "json": '{"A1": "Paris", "A2": "Tokyo", "A3": "Rome"}',
    "json fenced": 'Here:\n```json\n{\n  "A1": "Paris",\n  "A2": "Tokyo",\n  "A3": "Rome"\n}\n```',
    "out of order": "A2: Tokyo\nA1: Paris\nA3: Rome",
    "starts past 1": "A2: Tokyo\nA3: Rome\nA1: Paris",
    "inline out of order": "A1: Paris. A3: Rome. A2: Tokyo.",
    "marker echo": "=== Q1 abc ===\nA1: Paris\nA2: Tokyo\nA3: Rome",
    "fence hides a label": "A1: Paris\n```\nA3: Rome\n```\nA2: Tokyo\nA3: x",
    "backtick in inline": "A1: Use ` x. A2: Tokyo. A3: Rome `",
    "numbered list": "1. Paris\n2. Tokyo\n3. Rome",
}


@pytest.mark.parametrize("reply", HELD.values(), ids=HELD.keys())
def test_unusual_replies_release_nothing_early(reply: str) -> None:
    for chunks in (list(reply), [reply]):
        result = run(chunks, 3)
        assert result.released == {} and result.mismatches == []
        assert result.slots == parse_answers(reply, 3)


def test_holding_is_for_good_once_the_shape_is_unusual() -> None:
    result = run(["A1: Paris\nA3: Rome\nA2: Tokyo\nA4: Oslo\nA5: x"], 5)
    assert result.released == {} and result.slots == ["Paris", "Tokyo", "Rome", "Oslo", "x"]


def test_label_like_text_in_an_answer_is_not_released() -> None:
    result = run(["A1: Cell A4: x\nA2: Paris\nA3: y"], 3)
    assert result.released == {1: "Paris"} and result.slots == [None, "Paris", "y"]
    # `A2:` inside line one may be the real A2: the final parse voids slot 2, so it is held.
    result = run(["A1: Cell A2: x\nA2: Paris\nA3: y"], 3)
    assert result.released == {} and result.slots == [None, None, "y"]


# --- mismatches --------------------------------------------------------------------------------


def test_a_label_repeated_at_the_end_voids_a_released_slot() -> None:
    result = run(list("A1: Paris\nA2: Tokyo\nA3: Rome\nA1: Paris again"), 3)
    assert result.released == {0: "Paris", 1: "Tokyo"}
    assert result.slots == [None, "Tokyo", None]
    assert result.voided == [0] and result.mismatches == []


def test_inline_answers_then_a_label_line_void_the_released_slot() -> None:
    # Inline labels followed by label lines: the final parse cannot tell inline labels from
    # answer text any more and voids them; the early release was right, but is recorded.
    result = run(list("A1: Paris. A2: Tokyo.\nA3: Rome\nA4: x"), 4)
    assert result.released == {0: "Paris."}
    assert result.slots == [None, None, "Rome", "x"]
    assert result.voided == [0] and result.mismatches == []


def test_an_injected_label_line_voids_only_the_released_slot() -> None:
    result = run(list("A1: Repeat:\nA2: evil\nA2: real\nA3: Rome"), 3)
    assert result.released == {0: "Repeat:"}
    assert result.slots == [None, None, "Rome"]
    assert result.voided == [0] and result.mismatches == []


# --- the API -----------------------------------------------------------------------------------


def test_api_edges() -> None:
    with pytest.raises(ValueError):
        SlotStream(0)
    stream = SlotStream(2)
    assert stream.text == "" and stream.feed("") == []
    assert stream.feed("A1: x\nA2: ") == [(0, "x")]
    assert stream.feed("y") == []
    first = stream.finish()
    assert first is stream.finish()
    assert first == StreamResult(["x", "y"], {0: "x"}, [])
    with pytest.raises(RuntimeError):
        stream.feed("more")


# --- cheapness ---------------------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "reply",
    [
        "\n".join(f"A{n}: " + "word " * 40 for n in range(1, 501)),  # 100 KB, 500 answers
        "A1: " + " ".join(f"x. A{n}:" for n in range(2, 2001)) + " y" + "z" * 80_000,
        "A1: " + "x" * 100_000 + "\nA2: y",
        "A1: " + "x. A2: " * 14_000,
        "A1: x.\n" + "```\n" + "A2: " * 25_000,
    ],
    ids=["many answers", "many inline", "long line", "inline noise", "fence noise"],
)
def test_feeding_one_character_at_a_time_is_linear(reply: str) -> None:
    count = 2000
    started = time.monotonic()
    stream = SlotStream(count)
    for char in reply:
        stream.feed(char)
    result = stream.finish()
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed  # quadratic work on 100 KB takes minutes
    assert len(result.slots) == count


def test_many_answers_are_all_released_but_the_last() -> None:
    reply = "\n".join(f"A{n}: fact {n}." for n in range(1, 501))
    result = run(list(reply), 500)
    assert result.released == {n - 1: f"fact {n}." for n in range(1, 500)}


# --- properties --------------------------------------------------------------------------------


@st.composite
def chunkings(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut anywhere: inside labels, inside `**`, between "\\r" and "\\n"."""
    if draw(st.booleans()):
        return list(text)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=40))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def check(text: str, count: int, data: st.DataObject) -> StreamResult:
    """Feed ``text`` in a random chunking; what it releases does not depend on the chunking."""
    result = run(data.draw(chunkings(text), label="chunks"), count)
    assert result.released == run([text], count).released
    assert result.slots == parse_answers(text, count)
    assert result.mismatches == sorted(
        i
        for i, released in result.released.items()
        if result.slots[i] is not None and result.slots[i] != released
    )
    assert result.voided == sorted(i for i in result.released if result.slots[i] is None)
    for released in result.released.values():
        assert LABELISH.search(released) is None, released
    return result


@settings(deadline=None)
@given(batches(), replies, st.data())
def test_property_well_formed_line_replies(
    batch: tuple[list[str], list[int]], reply: Reply, data: st.DataObject
) -> None:
    texts, order = batch
    text = reply.render([(n, texts[n - 1]) for n in order])
    result = check(text, len(texts), data)
    assert result.mismatches == []
    assert all(texts[i] == released for i, released in result.released.items())
    if order == sorted(order):
        assert set(result.released) == set(range(len(texts) - 1))


@settings(deadline=None)
@given(st.sampled_from(sorted(LAYOUTS)), st.data())
def test_property_well_formed_one_line_replies(name: str, data: st.DataObject) -> None:
    layout = LAYOUTS[name]
    texts, questions, order = data.draw(one_line_batches(layout), label="batch")
    text = render(layout, [(n, texts[n - 1], questions[n - 1]) for n in order])
    result = check(text, len(texts), data)
    assert result.mismatches == []
    assert all(texts[i] == released for i, released in result.released.items())
    if order == sorted(order) and "Q" not in layout.block and layout.joiner != "\n":
        assert set(result.released) == set(range(len(texts) - 1))


def _repeat_at_end(blocks: list[tuple[int, str]], data: st.DataObject, count: int) -> None:
    blocks.append((data.draw(st.integers(1, count), label="repeated"), "evil"))


def _unclosed_fence(blocks: list[tuple[int, str]], data: st.DataObject, count: int) -> None:
    if any(text.endswith("\n```") for _, text in blocks):
        return  # once only: a second fence line would close the first
    at = data.draw(st.integers(0, len(blocks) - 1), label="fenced block")
    blocks[at] = (blocks[at][0], blocks[at][1] + "\n```")


ADVERSARIAL = {**CORRUPTIONS, "repeat at end": _repeat_at_end, "unclosed fence": _unclosed_fence}


@settings(deadline=None)
@given(batches(), replies, st.sampled_from(sorted(ADVERSARIAL)), st.data())
def test_property_adversarial_replies(
    batch: tuple[list[str], list[int]], reply: Reply, corruption: str, data: st.DataObject
) -> None:
    texts, order = batch
    texts = [f"Ref {n}.\n{text}" for n, text in enumerate(texts, start=1)]
    blocks: list[tuple[int, str]] = [(n, texts[n - 1]) for n in order]
    for _ in range(data.draw(st.integers(1, 2), label="corruptions")):
        ADVERSARIAL[corruption](blocks, data, len(texts))
    text = reply.render(blocks)
    assume(text.strip())
    result = check(text, len(texts), data)
    for i, released in result.released.items():
        if corruption in ("repeat at end", "unclosed fence", "relabel"):
            assert released == texts[i]  # the damage comes after, or holds everything
        elif corruption == "delete label":  # unlabelled text joins the answer before it
            assert released.startswith(texts[i]) and i not in result.mismatches + result.voided
        else:  # a label injected before the real one: wrong early, and recorded as such
            assert released == texts[i] or i in result.mismatches or i in result.voided
    if corruption == "unclosed fence":
        assert result.mismatches == []
