"""What the fake says: the answer to a plain prompt, or a batched reply in one of many layouts.

With ``noise`` a batched reply takes a non-standard layout. Line layouts put each answer under
its own label (``**A1:**``, ``Answer 1:``, ``A[1]:``, ``### A1``); one-line layouts, used only
when every answer of the batch is one line, put all answers on one line (``A1: x A2: y``, bold
``**A1:** x **A2:** y``), restate each question (``Q1: <question> A1: x``, one line per slot),
or return a JSON object ``{"A1": "x", "A2": "y"}``, sometimes inside a ```json fence. Every
layout keeps every answer's text exactly as :func:`expected_answer` gives it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import NamedTuple

from worker.tokens import count_tokens

from .answers import expected_answer, group_system, split_batch, token_pieces
from .config import LINE_LAYOUTS, ONE_LINE_LAYOUTS, FakeConfig
from .protocol import ChatRequest, Reply

_LABELS = {
    "canonical": "A{n}: {text}",
    "bold": "**A{n}:** {text}",
    "answer": "Answer {n}: {text}",
    "bracket": "A[{n}]: {text}",
    "heading": "### A{n}\n{text}",
}
_PREAMBLES = (
    "Sure! Here are the answers:",
    "Here are the answers to your questions.",
    "Of course. Answering each question in turn:",
)
_SIGNOFFS = (
    "Let me know if you need anything else!",
    "I hope this helps.",
    "Feel free to ask if anything is unclear.",
)
# A question restated before its answer must not itself look like a label (`A2`, `Q 3`,
# `Answer 4`, `[A1]`), or `Q1: <question> A1: <answer>` could be read two ways.
_LABELISH_RE = re.compile(r"(?<![a-z0-9])(?:a|q|answer|question)[ \t]*+\[?\d", re.IGNORECASE)
_MAX_RESTATED_CHARS = 200


class _Slot(NamedTuple):
    label: int
    question: str
    answer: str


@dataclass(frozen=True)
class _Shape:
    """How a batched reply is laid out; the default is the canonical one the prompt asks for."""

    layout: str = "canonical"
    preamble: str | None = None
    signoff: str | None = None
    order: tuple[int, ...] | None = None
    gap: str = "\n"
    fenced: bool = False  # json: inside a ```json fence
    indented: bool = False  # json: pretty-printed over several lines


def _restated(question: str) -> str:
    """The question on one line, as a model restating it would write it."""
    return " ".join(question.split())


def _fitting(slots: list[_Slot]) -> list[str]:
    """The layouts that keep these answers unambiguous (see ``expected_answer``)."""
    if any("\n" in slot.answer for slot in slots):
        return list(LINE_LAYOUTS)
    restatable = all(
        0 < len(_restated(slot.question)) <= _MAX_RESTATED_CHARS
        and not _LABELISH_RE.search(slot.question)
        for slot in slots
    )
    return [*LINE_LAYOUTS, *(name for name in ONE_LINE_LAYOUTS if restatable or name != "restated")]


def _pick_shape(rng: random.Random, slots: list[_Slot], allowed: tuple[str, ...]) -> _Shape:
    """A random mix of shapes real models produce; never identical to the canonical layout."""
    fitting = _fitting(slots)
    layouts = [name for name in fitting if name in allowed] or fitting[: len(LINE_LAYOUTS)]
    layout = rng.choice(layouts)
    preamble = rng.choice(_PREAMBLES) if rng.random() < 0.4 else None
    signoff = rng.choice(_SIGNOFFS) if rng.random() < 0.4 else None
    order = _shuffled(rng, len(slots)) if len(slots) > 1 and rng.random() < 0.3 else None
    gap = "\n\n" if rng.random() < 0.5 else "\n"
    fenced, indented = rng.random() < 0.5, rng.random() < 0.5
    if layout == "json" and not fenced:
        preamble = signoff = None  # a bare JSON object is the whole reply
    if layout == "canonical" and preamble is None and signoff is None and order is None:
        others = [name for name in layouts if name != "canonical"]
        if others:
            layout = rng.choice(others)
        else:
            preamble = rng.choice(_PREAMBLES)
    return _Shape(layout, preamble, signoff, order, gap, fenced, indented)


def _shuffled(rng: random.Random, count: int) -> tuple[int, ...]:
    order = list(range(count))
    rng.shuffle(order)
    if order == sorted(order):
        order = order[1:] + order[:1]
    return tuple(order)


def _json_body(slots: list[_Slot], shape: _Shape) -> str:
    data = {f"A{slot.label}": slot.answer for slot in slots}
    text = json.dumps(data, ensure_ascii=False, indent=2 if shape.indented else None)
    return f"```json\n{text}\n```" if shape.fenced else text


def _body(slots: list[_Slot], shape: _Shape) -> str:
    if shape.layout == "inline":
        return " ".join(f"A{s.label}: {s.answer}" for s in slots)
    if shape.layout == "bold_inline":
        return " ".join(f"**A{s.label}:** {s.answer}" for s in slots)
    if shape.layout == "restated":
        lines = (f"Q{s.label}: {_restated(s.question)} A{s.label}: {s.answer}" for s in slots)
        return shape.gap.join(lines)
    if shape.layout == "json":
        return _json_body(slots, shape)
    template = _LABELS[shape.layout]
    return shape.gap.join(template.format(n=s.label, text=s.answer) for s in slots)


def _render(slots: list[_Slot], shape: _Shape) -> str:
    if shape.order is not None:
        slots = [slots[index] for index in shape.order]
    body = _body(slots, shape)
    if shape.preamble:
        body = f"{shape.preamble}\n{body}"
    if shape.signoff:
        body = f"{body}\n\n{shape.signoff}"
    return body


def roll(rng: random.Random, probability: float) -> bool:
    return probability > 0 and rng.random() < probability


def _truncated(text: str, max_tokens: int | None) -> tuple[tuple[str, ...], str]:
    """``text`` as token pieces cut to the caller's ``max_tokens``, and the finish_reason."""
    pieces = tuple(token_pieces(text, max_tokens))
    cut = max_tokens is not None and count_tokens(text) > max_tokens
    return pieces, "length" if cut else "stop"


def build_reply(rng: random.Random, config: FakeConfig, chat: ChatRequest) -> Reply:
    """The completion for ``chat``; all random choices happen here, before any await."""
    if chat.tool is not None:
        arguments = chat.tool.arguments(chat.prompt)
        call = {
            "id": chat.tool.call_id(chat.model, chat.prompt),
            "type": "function",
            "function": {"name": chat.tool.name},
        }
        return Reply(tuple(token_pieces(arguments)), "tool_calls", tool_call=call)
    batch = split_batch(chat.prompt)
    if batch is None:
        answer = expected_answer(chat.model, chat.system, chat.prompt)
        return Reply(*_truncated(answer, chat.max_tokens))
    system = group_system(chat.system)
    slots = [_Slot(label, text, expected_answer(chat.model, system, text)) for label, text in batch]
    dropped = bool(slots) and roll(rng, config.drop)
    if dropped:
        del slots[rng.randrange(len(slots))]
    noisy = bool(slots) and roll(rng, config.noise)
    shape = _pick_shape(rng, slots, config.layout_names()) if noisy else None
    pieces, finish = _truncated(_render(slots, shape or _Shape()), chat.max_tokens)
    layout = shape.layout if shape else None
    return Reply(pieces, finish, len(batch), batched=True, layout=layout, dropped=dropped)
