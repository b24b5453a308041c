"""Reading a reply to a combined prompt back into one answer per question, or None.

Layouts, tried in this order:

* JSON: an object keyed by label (``{"A1": "...", "A2": "..."}``, keys ``1`` and ``a1`` too),
  maybe in a ```json fence, after a short preamble. Trusted only when its keys are exactly
  1..count, each once; a value that is not a string leaves its slot None.
* Inline and restated: labels after another label on the same line (``A1: x. A2: y``,
  ``**A1:** x **A2:** y``, ``A1: x, A2: y``) and restated questions (``Q1: <question> A1: x``,
  or a ``Q1:`` line before the ``A1:`` line), which are never part of any answer. Trusted only
  when the whole reply has one consistent shape: every label once and in range; either every
  answer right after its own restated question, or answers in order (or all of them, shuffled)
  all on one line; restated pairs never split across lines. Anything else falls through to the
  line layout, where the inline labels are plain text.
* Lines: one label at the start of a line, in any order (the shape the prompt asks for).
* A plain numbered list, only when no line carries a label.

Whatever the layout, a slot whose text still holds label-like text (``A2:`` inside a line,
``Q3:``, a marker) is None: a wrong answer would reach the wrong user, a None is re-asked alone.
"""

from __future__ import annotations

import itertools
import json
import re
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .labels import (
    Label,
    answer_label,
    closes_fence,
    fence_info,
    fence_opener,
    holds_label,
    inline_numbers,
    is_echo,
    label_like,
    line_labels,
    line_tokens,
    number_of,
)

# A top-level numbered list item, the fallback when a reply has no labels at all.
_ITEM_RE = re.compile(r"^(?P<num>\d++)[.):](?:[ \t]++(?P<rest>.*)|[ \t]*+)$")
_QUOTE_RE = re.compile(r"^[ \t]*>[ \t]?")
_RULE_RE = re.compile(r"^[ \t]*+(?:(?:-[ \t]*+){3,}+|(?:\*[ \t]*+){3,}+|(?:_[ \t]*+){3,}+)$")
_SIGN_OFF_RE = re.compile(
    r"^[\W_]*(?:"
    r"(?:i[ \t]+)?hope[ \t]+(?:this|these|that|it|my[ \t]+answers?|you[ \t]+find)\b"
    r"|let[ \t]+me[ \t]+know\b"
    r"|feel[ \t]+free[ \t]+to\b"
    r"|if[ \t]+you[ \t]+have[ \t]+(?:any[ \t]+)?(?:other|more|further|additional|follow-up)?"
    r"[ \t]*questions\b"
    r"|is[ \t]+there[ \t]+anything[ \t]+else\b"
    r"|(?:i['\u2019]m[ \t]+|i[ \t]+am[ \t]+)?(?:happy|glad)[ \t]+to[ \t]+help\b"
    r"|don['\u2019]t[ \t]+hesitate\b"
    r")",
    re.IGNORECASE,
)
_SIGN_OFF_MAX_LINES = 3
_SIGN_OFF_MAX_CHARS = 300
_JSON_KEY_RE = re.compile(r"[Aa]?(\d++)")


@dataclass(frozen=True)
class _Scan:
    """What a pass over the reply's lines found, code blocks told apart from the rest."""

    labels: list[Label]  # outside fenced code blocks
    shadows: list[Label]  # label-like lines inside fenced code blocks
    echoes: list[int]  # lines outside code blocks that look like question labels or markers


_Matcher = Callable[[int, str], list[Label]]


def _answer_labels(index: int, line: str) -> list[Label]:
    """The line layout: one answer label at the start of the line, the rest is its text."""
    label = answer_label(index, line)
    return [] if label is None else [label]


def _list_item(index: int, line: str) -> list[Label]:
    m = _ITEM_RE.match(line)
    return [] if m is None else [Label(index, number_of(m["num"]), m["rest"] or "", False)]


def _scan(lines: list[str], matcher: _Matcher) -> _Scan:
    """Find labels, shadows and echoes, tracking fenced code blocks."""
    found = _Scan([], [], [])
    fence: str | None = None
    for index, line in enumerate(lines):
        if fence is not None:
            if closes_fence(line, fence):
                fence = None
            elif (shadow := answer_label(index, line)) is not None:
                found.shadows.append(shadow)
            continue
        labels = matcher(index, line)
        if labels:
            found.labels.extend(labels)
            fence = fence_opener(labels[-1].rest)  # `A1: ```python` opens a block too
            continue
        if is_echo(line):
            found.echoes.append(index)
        fence = fence_opener(line)
    return found


def _is_break(line: str) -> bool:
    """A blank line or a horizontal rule: what separates a sign-off from the answer."""
    return not line.strip() or _RULE_RE.match(line) is not None


def _sign_off_start(lines: list[str]) -> int | None:
    """Where a trailing sign-off paragraph begins, if ``lines`` end with one after real text."""
    breaks = (i for i in reversed(range(len(lines))) if _is_break(lines[i]))
    boundary = next(breaks, None)
    if boundary is None:
        return None
    tail = lines[boundary + 1 :]
    paragraph = " ".join(line.strip() for line in tail)
    if not (0 < len(tail) <= _SIGN_OFF_MAX_LINES and len(paragraph) <= _SIGN_OFF_MAX_CHARS):
        return None
    if not _SIGN_OFF_RE.match(paragraph):
        return None
    has_content = any(not _is_break(lines[i]) for i in range(boundary))
    return boundary if has_content else None


def _trim_tail(lines: list[str], *, sign_off: bool) -> list[str]:
    """Drop trailing blank lines and rules and, for the last answer, trailing sign-offs."""
    lines = list(lines)
    while True:
        while lines and not lines[-1].strip():
            lines.pop()
        if lines and _RULE_RE.match(lines[-1]):
            lines.pop()
        elif sign_off and (cut := _sign_off_start(lines)) is not None:
            del lines[cut:]
        else:
            return lines


def span_text(label: Label, body: list[str], *, last: bool) -> str:
    """The answer text of one label: the rest of its line and the lines up to the next label."""
    lines = _trim_tail([label.rest, *body], sign_off=last)
    if label.quoted and all(not line.strip() or _QUOTE_RE.match(line) for line in lines[1:]):
        # The whole answer sits in a quote block, as its label does: unquote it once.
        unquoted = [_QUOTE_RE.sub("", line, count=1) for line in lines[1:]]
        lines = _trim_tail(lines[:1] + unquoted, sign_off=last)
    return "\n".join(lines).strip()


def _assign(
    found: _Scan, lines: list[str], count: int, suspect: frozenset[int] = frozenset()
) -> list[str | None]:
    """Slot texts from label positions; any slot whose boundaries are in doubt stays None.

    ``suspect`` numbers count as repeated: the reply also has them as inline labels.
    """
    answers = [label for label in found.labels if not label.question]
    seen = Counter(label.number for label in answers)
    bad = {n for n, times in seen.items() if times > 1 or not 1 <= n <= count} | suspect
    # A label hidden in a code block while missing outside may have been swallowed by an
    # unclosed fence, and an echoed question may be another user's: either way the text
    # around it is not one answer for sure.
    hidden = [s.line for s in found.shadows if 1 <= s.number <= count and s.number not in seen]
    doubtful = sorted([*hidden, *found.echoes])
    slots: list[str | None] = [None] * count
    labels = found.labels
    for i, label in enumerate(labels):
        following = labels[i + 1] if i + 1 < len(labels) else None
        if label.question or label.number in bad:
            continue
        if following is not None and not following.question and following.number in bad:
            continue
        if label.cut:
            slots[label.number - 1] = label.rest.strip() or None
            continue
        end = following.line if following is not None else len(lines)
        if bisect_right(doubtful, label.line) < bisect_left(doubtful, end):
            continue
        text = span_text(label, lines[label.line + 1 : end], last=following is None)
        slots[label.number - 1] = text or None
    return slots


def _consistent(labels: list[Label], count: int, loose: list[tuple[bool, int]]) -> bool:
    """Whether inline labels and restatements make one unambiguous shape (see module doc).

    ``loose`` is label-like text the labels were not read past: it counts as a repeat.
    """
    answers = [label.number for label in labels if not label.question]
    questions = [label.number for label in labels if label.question]
    if not answers or any(not 1 <= n <= count for n in answers + questions):
        return False
    every_answer = answers + [n for question, n in loose if not question]
    every_question = questions + [n for question, n in loose if question]
    if len(set(every_answer)) < len(every_answer):
        return False
    if len(set(every_question)) < len(every_question):
        return False
    if any(label.cut and not label.question and not label.rest.strip() for label in labels):
        return False  # `A5: A1: ...`: an empty inline answer is a confused reply
    if questions:
        # Every answer right after its own restated question: the pairs vouch for each other.
        pairs = list(zip(labels[::2], labels[1::2], strict=False))
        if len(labels) % 2 or any(
            not q.question or a.question or q.number != a.number for q, a in pairs
        ):
            return False
    else:
        in_order = all(b == a + 1 for a, b in itertools.pairwise(answers))
        if not in_order and sorted(answers) != list(range(1, count + 1)):
            return False
    if not any(label.inline for label in labels):
        return True
    if not questions:
        return len({label.line for label in labels}) == 1
    # Restated inline: each line holds whole `Qn ... An ...` pairs.
    starts = [i for i, label in enumerate(labels) if i == 0 or label.line != labels[i - 1].line]
    return all(i % 2 == 0 for i in starts)


def _line_slots(lines: list[str], count: int) -> list[str | None]:
    """The inline/restated layout if the reply is consistently one, else the line layout."""
    loose: list[tuple[bool, int]] = []

    def inline_labels(index: int, line: str) -> list[Label]:
        """The line's first label (answer or question) and the inline ones after it."""
        found = line_tokens(line)
        loose.extend(found.leftover)
        return line_labels(index, line, found)

    inline = _scan(lines, inline_labels)
    labels = inline.labels
    if any(label.inline or label.question for label in labels) and _consistent(
        labels, count, loose
    ):
        return _assign(inline, lines, count)
    found = _scan(lines, _answer_labels)
    if found.labels:
        # Inline labels, read as text here, still compete with label lines of the same number.
        lines_with_labels = [label.line for label in found.labels] + found.echoes
        suspect = set().union(*(inline_numbers(lines[i]) for i in lines_with_labels))
        return _assign(found, lines, count, frozenset(suspect))
    return _numbered_fallback(lines, count)


def _numbered_fallback(lines: list[str], count: int) -> list[str | None]:
    """A plain top-level numbered list, trusted only if it numbers exactly 1..count once each."""
    found = _scan(lines, _list_item)
    if sorted(item.number for item in found.labels) != list(range(1, count + 1)):
        return [None] * count
    return _assign(found, lines, count)


# --- the JSON layout --------------------------------------------------------------------------


def _json_start(lines: list[str]) -> tuple[int, str | None] | None:
    """Where a JSON layout's object starts (its line, and the fence around it), if it is one."""
    preamble, chars = 0, 0
    for index, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            return index, None
        fence = fence_info(line)
        if fence is not None:
            after = next((i for i in range(index + 1, len(lines)) if lines[i].strip()), None)
            if after is None or lines[after].lstrip()[:1] != "{":
                return None
            return (after, fence[0]) if fence[1].lower() in ("", "json") else None
        preamble, chars = preamble + 1, chars + len(text)
        too_long = preamble > _SIGN_OFF_MAX_LINES or chars > _SIGN_OFF_MAX_CHARS
        if too_long or label_like(line) or is_echo(line):
            return None
    return None


def _only_sign_off(lines: list[str]) -> bool:
    """Whether what follows the JSON object is nothing, or a short sign-off."""
    paragraph = " ".join(line.strip() for line in lines if line.strip())
    if not paragraph:
        return True
    short = sum(1 for line in lines if line.strip()) <= _SIGN_OFF_MAX_LINES
    return short and len(paragraph) <= _SIGN_OFF_MAX_CHARS and bool(_SIGN_OFF_RE.match(paragraph))


def _json_values(pairs: list[tuple[str, Any]], count: int) -> list[str | None]:
    """Slots from the object's (key, value) pairs: all None unless keys are exactly 1..count."""
    numbers = []
    for key, _ in pairs:
        m = _JSON_KEY_RE.fullmatch(key)
        if m is None:
            return [None] * count
        numbers.append(number_of(m[1]))
    if sorted(numbers) != list(range(1, count + 1)):
        return [None] * count
    slots: list[str | None] = [None] * count
    for (_, value), number in zip(pairs, numbers, strict=True):
        if isinstance(value, str) and value.strip():
            slots[number - 1] = value.strip()
    return slots


def _json_slots(lines: list[str], count: int) -> list[str | None] | None:
    """Slots from a JSON layout; None when the reply is not one."""
    start = _json_start(lines)
    if start is None:
        return None
    index, fence = start
    body = "\n".join(lines[index:])
    decoder = json.JSONDecoder(object_pairs_hook=list)
    try:
        pairs, end = decoder.raw_decode(body, body.index("{"))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python recurses
        return [None] * count
    after = body[end:].split("\n")
    if after[0].strip():
        return [None] * count
    after = after[1:]
    if fence is not None:
        closing = next((i for i, line in enumerate(after) if line.strip()), None)
        if closing is None or not closes_fence(after[closing], fence):
            return [None] * count
        after = after[closing + 1 :]
    if not _only_sign_off(after):
        return [None] * count
    return _json_values(pairs, count)


def parse_answers(text: str, count: int) -> list[str | None]:
    """Map a reply to a combined prompt back to ``count`` slots; None wherever in doubt.

    A slot is None when its label is missing or repeated, when its text is cut by a repeated
    or out-of-range label, holds an echoed question label or marker line, may hide a label in
    an unclosed code block, or holds label-like text anywhere outside code blocks, or when it
    is empty: a None is re-sent on its own, while a wrong answer would reach the wrong user.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    slots = _json_slots(lines, count)
    if slots is None:
        slots = _line_slots(lines, count)
    return [None if slot is None or holds_label(slot) else slot for slot in slots]
