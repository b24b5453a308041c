"""Releasing each answer of a streamed batched reply as soon as it is certainly complete.

``SlotStream`` reads text deltas and releases slot i once the label of slot i+1 has begun, but
only while the reply so far is the plain shape: labels 1, 2, ..., m in order, each at the start
of its own line (or, on the first label line only, inline after each other), with no echoed
question or marker, no JSON, no fence hiding a label not seen yet. The text released is what
``parse_answers`` gives for that slot if the rest of the reply stays well formed. At the first
anything-unusual the stream holds everything to the end, where ``finish`` parses the whole
reply: its slots are the final word. A released slot the final parse gives other text for is
listed in ``mismatches``; one the final parse voids (``None``: a label repeated later, a
dropped answer in an inline reply) in ``voided``: the early answer was what its label held,
but the whole reply no longer vouches for it.

It is cheap: complete lines are read once each; a line still arriving is only looked at
within a short window at its start (is it a label yet?) and, on the first label line, re-read
when a new inline label has arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .labels import (
    MID_RE,
    Label,
    LineTokens,
    answer_label,
    certain_answer_label,
    closes_fence,
    fence_info,
    fence_opener,
    holds_label,
    inline_numbers,
    is_echo,
    line_labels,
    line_tokens,
    segment,
)
from .parse import parse_answers, span_text

_HEAD_WINDOW = 64  # a label line's label is known within its first characters, or held
_TAIL_WINDOW = 64  # an inline label is shorter than this


@dataclass(frozen=True)
class StreamResult:
    slots: list[str | None]  # parse_answers(full_text, count): the final word
    released: dict[int, str]  # 0-based slot -> text released early
    mismatches: list[int]  # slots released early whose final slot has other text
    voided: list[int] = field(default_factory=list)  # released early, final slot None


class _Line(Enum):
    UNDECIDED = "undecided"  # might still become a label line
    LABEL = "label"  # starts with the next label, already handled
    TEXT = "text"  # not a label line (as far as releasing goes)


class SlotStream:
    """Release answers of a batched reply of ``count`` questions as they complete."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self._count = count
        self._chunks: list[str] = []
        self._carriage = False  # a delta ended in "\r": it may pair with a "\n" still to come
        self._lines: list[str] = []  # complete lines, newlines normalised
        self._pieces: list[str] = []  # the line still arriving
        self._size = 0
        self._head = ""  # its first _HEAD_WINDOW characters
        self._tail = ""  # its last _TAIL_WINDOW characters
        self._state = _Line.UNDECIDED
        self._number = 0  # the label starting the line still arriving, once certain
        self._fence: str | None = None
        self._m = 0  # labels 1..m have been seen, in order
        self._last: Label | None = None  # the line-start label of slot m
        self._inline_line: int | None = None  # the first label line, which may carry inline ones
        self._inline = False  # it did: any further label line makes the shape unusual
        self._found: LineTokens | None = None  # the labels read on that line so far
        self._scanned = 0  # inline labels are known up to here in that line
        self._suspect: set[int] = set()  # answer numbers written inside label lines
        self._released: dict[int, str] = {}
        self._held = False
        self._result: StreamResult | None = None

    @property
    def text(self) -> str:
        """Everything fed so far, as received."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def feed(self, delta: str) -> list[tuple[int, str]]:
        """Append a text delta; return (0-based slot, text) for every slot that just became
        safe to release."""
        if self._result is not None:
            raise RuntimeError("the stream is finished")
        if not delta:
            return []
        self._chunks.append(delta)
        out: list[tuple[int, str]] = []
        parts = self._normalise(delta).split("\n")
        for part in parts[:-1]:
            self._append(part)
            self._complete_line(out)
        if parts[-1]:
            self._append(parts[-1])
            self._partial_line(out)
        return out

    def finish(self) -> StreamResult:
        """Parse the whole reply; compare what was released with the final slots."""
        if self._result is None:
            slots = parse_answers(self.text, self._count)
            released = dict(self._released)
            voided = sorted(i for i in released if slots[i] is None)
            mismatches = sorted(
                i for i, text in released.items() if slots[i] is not None and slots[i] != text
            )
            self._result = StreamResult(slots, released, mismatches, voided)
        return self._result

    # --- reading the text ------------------------------------------------------------------

    def _normalise(self, delta: str) -> str:
        """Newlines as ``parse_answers`` sees them: "\\r\\n" and "\\r" become "\\n"."""
        if self._carriage:
            delta = "\r" + delta
        self._carriage = delta.endswith("\r")
        if self._carriage:
            delta = delta[:-1]
        return delta.replace("\r\n", "\n").replace("\r", "\n")

    def _append(self, part: str) -> None:
        """Add to the line still arriving, keeping only short windows of it as strings."""
        if not part:
            return
        self._pieces.append(part)
        self._size += len(part)
        if len(self._head) < _HEAD_WINDOW:
            self._head = (self._head + part[:_HEAD_WINDOW])[:_HEAD_WINDOW]
        self._tail = (self._tail + part)[-(_TAIL_WINDOW + len(part)) :]

    def _take_line(self) -> str:
        line = "".join(self._pieces)
        self._pieces, self._size, self._head, self._tail = [], 0, "", ""
        return line

    # --- deciding --------------------------------------------------------------------------

    def _hold(self) -> None:
        """Something unusual: release nothing more; ``finish`` settles the rest."""
        self._held = True

    def _release(self, slot: int, text: str, out: list[tuple[int, str]]) -> None:
        """Release ``slot`` unless the final parse would void its text anyway."""
        if text and not holds_label(text) and slot not in self._released:
            self._released[slot] = text
            out.append((slot, text))

    def _next_label(self, number: int, index: int, out: list[tuple[int, str]]) -> None:
        """A line-start label: it must be the next one; it completes the slot before it."""
        if self._inline or number != self._m + 1 or number > self._count:
            self._hold()
            return
        if self._last is not None and not {self._m, number} & self._suspect:
            # (The final parse voids a slot whose label, or the next one, is in doubt.)
            body = self._lines[self._last.line + 1 : index]
            self._release(self._m - 1, span_text(self._last, body, last=False), out)
        if self._m == 0:
            self._inline_line = index
        self._m = number

    def _partial_line(self, out: list[tuple[int, str]]) -> None:
        """A line still arriving: has the next label begun, or a new inline label on it?"""
        if self._held or self._fence is not None or self._state is _Line.TEXT:
            return
        index = len(self._lines)
        if self._state is _Line.UNDECIDED:
            label = certain_answer_label(index, self._head)
            if label is None:
                if self._size >= _HEAD_WINDOW:
                    self._state = _Line.TEXT
                return
            self._state, self._number = _Line.LABEL, label.number
            self._next_label(label.number, index, out)
        stopped = self._found is not None and self._found.stopped
        if not self._held and index == self._inline_line and not stopped:
            start = self._size - len(self._tail)
            fresh = any(
                m.end() < len(self._tail) and start + m.end() > self._scanned
                for m in MID_RE.finditer(self._tail)
            )
            if fresh:
                self._inline_labels("".join(self._pieces), out, partial=True)

    def _inline_labels(self, line: str, out: list[tuple[int, str]], *, partial: bool) -> None:
        """Labels after the first one on the first label line: release each completed answer."""
        found = line_tokens(line, partial=partial, resume=self._found)
        self._found, tokens = found, found.tokens
        if len(tokens) < self._m:
            self._hold()  # never expected: labels already read are read again the same way
            return
        fresh = tokens[self._m :]
        if fresh and "`" in line:
            self._hold()  # a backtick may yet open a code span around a label
            return
        for token in fresh:
            if token.question or token.number != self._m + 1 or token.number > self._count:
                self._hold()
                return
            self._release(self._m - 1, segment(line, tokens[self._m - 1], token), out)
            self._m = token.number
            self._inline = True
        self._scanned = tokens[-1].rest_at

    def _complete_line(self, out: list[tuple[int, str]]) -> None:
        """A line has ended: classify it once, as ``parse_answers`` will (fences included)."""
        line = self._take_line()
        index = len(self._lines)
        self._lines.append(line)
        state, self._state = self._state, _Line.UNDECIDED
        if self._held:
            return
        if self._fence is not None:
            if closes_fence(line, self._fence):
                self._fence = None
            elif (shadow := answer_label(index, line)) and self._m < shadow.number <= self._count:
                self._hold()  # it may be a label an unclosed fence swallowed
            return
        label = answer_label(index, line)
        if label is None:
            self._text_line(line, state)
            return
        if state is not _Line.LABEL:
            self._next_label(label.number, index, out)
        elif label.number != self._number:
            self._hold()  # read differently once complete: never expected
        if self._held:
            return
        self._label_line(label, line, index, out)

    def _text_line(self, line: str, state: _Line) -> None:
        """A line without an answer label: an echo or possible JSON holds all; a fence opens."""
        if state is _Line.LABEL or is_echo(line):
            self._hold()
            return
        info = fence_info(line)
        json_like = line.lstrip()[:1] == "{" or (
            info is not None and info[1].lower() in ("", "json")
        )
        if self._m == 0 and json_like:
            self._hold()  # perhaps the JSON layout
            return
        self._fence = None if info is None else info[0]

    def _label_line(self, label: Label, line: str, index: int, out: list[tuple[int, str]]) -> None:
        """A complete label line: inline labels (first label line only) and a fence it opens."""
        if index == self._inline_line:
            self._inline_labels(line, out, partial=False)
            if self._held:
                return
            if self._inline and self._found is not None:
                self._fence = fence_opener(line_labels(index, line, self._found)[-1].rest)
                return
        self._last = label
        self._fence = fence_opener(label.rest)
        self._suspect |= inline_numbers(line)
