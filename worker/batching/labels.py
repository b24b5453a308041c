"""What counts as a label in a batched reply, for the parser (``parse``) and ``stream``.

Two strengths of pattern live here. The *splitting* ones decide where one answer ends and the
next begins: a label at the start of a line (after indentation, quote marks, a heading, a list
bullet and emphasis), and an inline label after it on the same line, accepted only in a context
that makes it unambiguous. The *loose* ones (``label_like``) find anything a parser could take
for a label, anywhere on a line; they keep such text out of answers (``holds_label``) and keep
questions holding it out of batches (``is_batch_safe``). Every splitting pattern is covered by a
loose one. All patterns use possessive quantifiers, so each runs in linear time.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

# A label starts its line, after optional indentation, quote marks (`>`), a heading (`###`), a
# list bullet (`-`, `1.`) and emphasis (`**`, `__`, `*`), and is followed by a separator (`:` `.`
# `)` `-` en/em dash) and whitespace, or ends the line. `[A1]` needs no separator and takes only
# `:` (so `[A1] - x` keeps its bullet). Everything else is answer text.

_PREFIX = (
    r"^[ \t]*+(?P<quote>(?:>[ \t]*+)++)?(?:\#{1,6}[ \t]++)?"
    r"(?:(?:[-+*\u2022]|\d{1,9}+[.)])[ \t]++)?"
)
_MARK = r"[*_]{1,3}+"
_SEP = r"[ \t]*+[:.)\-\u2013\u2014]"
_ANSWER_WORDS = (
    r"answer[ \t]++(?:to|for)[ \t]++(?:question[ \t]*+(?:\#[ \t]*+)?|q)"
    r"|answer[ \t]*+(?:\#[ \t]*+)?"
    r"|a"
)
_QUESTION_WORDS = r"question[ \t]*+(?:\#[ \t]*+)?|q"


def _label_pattern(words: str) -> re.Pattern[str]:
    return re.compile(
        rf"{_PREFIX}(?P<open>{_MARK})?(?P<lb>\[)?(?:{words})(?:(?P<num>\d++)|\[(?P<bnum>\d++)\])"
        rf"(?(lb)\])(?P<close>{_MARK})?(?:(?P<sep>(?(lb)[ \t]*+:|{_SEP}))(?P<close2>{_MARK})?)?"
        r"(?:[ \t]++(?P<rest>.*)|[ \t]*+)$",
        re.IGNORECASE,
    )


_ANSWER_RE = _label_pattern(_ANSWER_WORDS)
_QUESTION_RE = _label_pattern(_QUESTION_WORDS)
# A label anywhere in a line: a word, a number, a colon and then whitespace or the line's end.
# `A1:B2` (a spreadsheet range) and `A1 steak sauce:` are not labels.
MID_RE = re.compile(
    rf"(?<![^\W_])(?P<open>{_MARK})?(?P<lb>\[)?"
    rf"(?:(?P<a>{_ANSWER_WORDS})|(?P<q>{_QUESTION_WORDS}))"
    rf"(?:(?P<num>\d++)|\[(?P<bnum>\d++)\])(?(lb)\])(?P<close>{_MARK})?[ \t]*+:"
    rf"(?P<close2>{_MARK})?(?=[ \t]|$)",
    re.IGNORECASE,
)
MARKER_TEXT_RE = re.compile(r"(?<!=)={2,}+[ \t]*+(?:q[ \t]*+\[?\d|end\b)", re.IGNORECASE)
# A key a reply in the JSON layout could use: "A1", "a1", "1" (and "answer 1", to be safe).
_JSON_KEY_TEXT_RE = re.compile(r"[\"'](?:a|answer[ \t]*+)?\d++[\"'][ \t]*+:", re.IGNORECASE)
_FENCE_RE = re.compile(r"^[ \t]*+(?:>[ \t]*+)*+(?P<fence>`{3,}+|~{3,}+)(?P<info>.*)$")
_LIST_MARK_RE = re.compile(r"^[ \t]*+(?:[-*+\u2022]|\d++[.)])[ \t]+")
_TICKS_RE = re.compile(r"`++")
_WS_RE = re.compile(r"[ \t]*+")
_MAX_DIGITS = 6
# What may come just before the space ahead of a plain inline label: the end of a sentence or
# clause (`Paris. A2:`), a closing bracket, quote or code span, or the end of emphasis.
_INLINE_AFTER = frozenset(".!?,;)]\"'\u201d\u2019*_`")


@dataclass(frozen=True)
class Token:
    """One label in a line: where it starts, where its text starts, and what it names."""

    start: int
    rest_at: int
    number: int
    question: bool
    emphasis: str  # an emphasis mark opened before the label and not closed after it, or ""


@dataclass(frozen=True)
class Label:
    """A label in a reply, with the text after it on its line (up to the next label there)."""

    line: int
    number: int
    rest: str
    quoted: bool
    question: bool = False  # a restated question `Q<n>:`, not an answer
    inline: bool = False  # found after another label on the same line
    cut: bool = False  # another label follows on the same line, where `rest` ends


def number_of(digits: str) -> int:
    """A label's number; absurdly long ones become 0, out of range like any other."""
    return int(digits) if len(digits) <= _MAX_DIGITS else 0


def _match(pattern: re.Pattern[str], line: str) -> re.Match[str] | None:
    """A label match; a separator is required unless the label is bracketed or ends the line."""
    m = pattern.match(line)
    if m is None or not (m["sep"] or m["lb"] or not m["rest"]):
        return None
    return m


def _question_match(line: str) -> re.Match[str] | None:
    """Like an answer label, but ``Q[3]`` counts even without a separator."""
    m = _QUESTION_RE.match(line)
    return m if m is not None and (m["sep"] or m["lb"] or m["bnum"] or not m["rest"]) else None


def _open_emphasis(m: re.Match[str]) -> str:
    return m["open"] if m["open"] and not (m["close"] or m["close2"]) else ""


def _token(m: re.Match[str], *, question: bool, rest_at: int) -> Token:
    return Token(m.start(), rest_at, number_of(m["num"] or m["bnum"]), question, _open_emphasis(m))


def head_token(line: str) -> tuple[Token, bool] | None:
    """The label starting ``line`` (an answer, else a restated question); whether it is quoted."""
    m = _match(_ANSWER_RE, line)
    question = m is None
    if m is None and (m := _question_match(line)) is None:
        return None
    rest_at = len(line) if m["rest"] is None else m.start("rest")
    return _token(m, question=question, rest_at=rest_at), bool(m["quote"])


def certain_answer_label(index: int, text: str) -> Label | None:
    """An answer label at the start of ``text``, a line's beginning, that no continuation undoes.

    It has its separator (or brackets) and whitespace after it, so whatever follows on the line
    is answer text; a bare ``A2`` could still become ``A23`` or ``A2 steak sauce``.
    """
    m = _match(_ANSWER_RE, text)
    if m is None or not (m["sep"] or m["lb"]) or m["rest"] is None:
        return None
    return answer_label(index, text)


def answer_label(index: int, line: str) -> Label | None:
    """The answer label starting ``line``, its text being the rest of the line."""
    m = _match(_ANSWER_RE, line)
    if m is None:
        return None
    rest = m["rest"] or ""
    opened = _open_emphasis(m)
    if opened and rest.rstrip().endswith(opened):
        # `**A1: text**`: the emphasis closes at the end of the line, not after the label.
        rest = rest.rstrip()[: -len(opened)]
    return Label(index, number_of(m["num"] or m["bnum"]), rest, bool(m["quote"]))


def looks_like_label(line: str) -> bool:
    """Whether ``parse_answers`` would read ``line`` as an answer label (outside code blocks)."""
    return _match(_ANSWER_RE, line) is not None


def looks_like_question_label(line: str) -> bool:
    """Whether ``line`` starts with a question label (``Q3:``, ``Q[3]``, ``Question 3.``)."""
    return _question_match(line) is not None


def is_echo(line: str) -> bool:
    """A question label or marker line: the model echoing a question, maybe another user's."""
    return looks_like_question_label(line) or MARKER_TEXT_RE.search(line) is not None


def label_like(line: str) -> bool:
    """Whether ``line`` holds anything a reply parser could read as a label or restatement."""
    return (
        looks_like_label(line)
        or looks_like_question_label(line)
        or MARKER_TEXT_RE.search(line) is not None
        or MID_RE.search(line) is not None
    )


def fence_info(line: str) -> tuple[str, str] | None:
    """The fence and its info text if ``line`` opens a fenced code block (CommonMark, roughly)."""
    m = _FENCE_RE.match(line)
    if m is None or (m["fence"][0] == "`" and "`" in m["info"]):
        return None
    return m["fence"], m["info"].strip()


def fence_opener(line: str) -> str | None:
    found = fence_info(line)
    return None if found is None else found[0]


def closes_fence(line: str, fence: str) -> bool:
    m = _FENCE_RE.match(line)
    return bool(
        m and m["fence"][0] == fence[0] and len(m["fence"]) >= len(fence) and not m["info"].strip()
    )


def holds_label(text: str) -> bool:
    """Whether answer text holds label-like text outside closed code blocks.

    Such a slot is re-asked alone: the text may be another request's answer or question. A
    fence left open to the end does not shelter its lines, since it may have swallowed a label.
    """
    fence: str | None = None
    sheltered: list[str] = []
    for line in text.split("\n"):
        if fence is not None:
            if closes_fence(line, fence):
                fence, sheltered = None, []
            else:
                sheltered.append(line)
            continue
        if label_like(line):
            return True
        fence = fence_opener(line)
    return any(label_like(line) for line in sheltered)


def is_batch_safe(text: str) -> bool:
    """Whether a user's question may share a combined prompt with other users' questions.

    False when ``text`` holds anything ``parse_answers`` could read as a label or restatement:
    a line that is an answer label (``A2:``, ``**Answer 2.**``, ``### A2``, ``[A2]``, ``- A2:``)
    or a question label (``Q3:``, ``Q[3]``, ``Question 3:``), also with a leading bullet removed
    as a model quoting it might; a label inside a line (``what does A2: mean``, ``**A3:**``,
    ``Q4:``); marker text (``=== Q1``, ``=== END``); or a quoted label key as in a JSON object
    (``{"A1": ...}``, ``"1":``), braces or not. A model that echoes such text could move
    answers between requests, so the worker sends these questions alone. Prose stays batch
    safe: "Explain Q-learning", "A1 steak sauce", "size A4 paper", "sum A1:B2" have no label
    separator.
    """
    if _JSON_KEY_TEXT_RE.search(text):
        return False
    for line in text.splitlines():
        if MARKER_TEXT_RE.search(line) or MID_RE.search(line):
            return False
        for candidate in (line, _LIST_MARK_RE.sub("", line, count=1)):
            if looks_like_label(candidate) or looks_like_question_label(candidate):
                return False
    return True


# --- labels inside a line ---------------------------------------------------------------------


def _code_spans(line: str) -> list[tuple[int, int]]:
    """Inline code spans: a backtick run up to the next run of the same length (CommonMark)."""
    runs = [(m.start(), m.end()) for m in _TICKS_RE.finditer(line)]
    following: list[int | None] = [None] * len(runs)
    last: dict[int, int] = {}
    for k in reversed(range(len(runs))):
        length = runs[k][1] - runs[k][0]
        following[k] = last.get(length)
        last[length] = k
    spans: list[tuple[int, int]] = []
    k = 0
    while k < len(runs):
        j = following[k]
        if j is None:
            k += 1
            continue
        spans.append((runs[k][0], runs[j][1]))
        k = j + 1
    return spans


def _in_code(position: int, spans: list[tuple[int, int]], starts: list[int]) -> bool:
    k = bisect_right(starts, position) - 1
    return k >= 0 and position < spans[k][1]


def _fits(line: str, m: re.Match[str], previous: Token) -> bool:
    """Whether an inline label candidate reads as a label in its context, not as answer text."""
    start = m.start()
    if start == 0 or line[start - 1] not in " \t":
        return False
    segment = line[previous.rest_at : start]
    if segment.count('"') % 2 or segment.count("\u201c") > segment.count("\u201d"):
        return False  # inside a quotation: `He said "A2: hi"`
    if m["open"] or m["lb"]:
        return True  # `**A2:**`, `[A2]:`
    number = number_of(m["num"] or m["bnum"])
    if previous.question and m["a"] is not None and number == previous.number:
        return True  # `Q1: <question> A1: <answer>`
    before = segment.rstrip(" \t")
    return bool(before) and before[-1] in _INLINE_AFTER


@dataclass(frozen=True)
class LineTokens:
    tokens: list[Token]  # empty when the line does not start with a label
    stopped: bool  # reading stopped at a candidate that did not fit its context
    quoted: bool  # the line is inside a quote block
    # Label-like text from where reading stopped to the line's end: (is a question, number).
    leftover: tuple[tuple[bool, int], ...] = ()


def line_tokens(
    line: str, *, partial: bool = False, resume: LineTokens | None = None
) -> LineTokens:
    """The labels of a line that starts with one, and whether reading stopped at a doubtful one.

    After the line's first label, inline labels are read up to the first candidate that does
    not fit its context (inside code or a quotation, or a plain label not after punctuation);
    from there on the line is answer text, and the parser's final check voids that answer.
    On a ``partial`` line (still arriving), a candidate touching the end is not yet known;
    ``resume`` carries on from what an earlier call found on a shorter prefix of the line.
    """
    if resume is not None and (resume.stopped or resume.tokens):
        if resume.stopped:
            return resume
        tokens, quoted = list(resume.tokens), resume.quoted
    elif (head := head_token(line)) is not None:
        tokens, quoted = [head[0]], head[1]
    else:
        return LineTokens([], False, False)
    if fence_info(line[tokens[0].rest_at :]) is not None:
        # `A1: ```lang ...`: the rest of the line is a fence's info text.
        return LineTokens(tokens, True, quoted, _leftover(line, tokens[0].rest_at))
    spans = _code_spans(line)
    starts = [s for s, _ in spans]
    for m in MID_RE.finditer(line, tokens[-1].rest_at):
        if partial and m.end() == len(line):
            break
        rest_at = _WS_RE.match(line, m.end())
        assert rest_at is not None  # `[ \t]*+` always matches
        doubtful = _in_code(m.start(), spans, starts) or not _fits(line, m, tokens[-1])
        if doubtful or fence_info(line[rest_at.end() :]) is not None:
            # A label whose text opens a fence would put code where the line layout sees none.
            return LineTokens(tokens, True, quoted, _leftover(line, m.start()))
        tokens.append(_token(m, question=m["q"] is not None, rest_at=rest_at.end()))
    return LineTokens(tokens, False, quoted)


def inline_numbers(line: str) -> set[int]:
    """Answer numbers written inside a label line after its first label, labels or not.

    In the line layout these are answer text, yet each may be the reply's real label for that
    number (an inline layout gone wrong), so a label line with the same number is in doubt.
    """
    head = head_token(line)
    if head is None:
        return set()
    found = MID_RE.finditer(line, head[0].rest_at)
    return {number_of(m["num"] or m["bnum"]) for m in found if m["q"] is None}


def _leftover(line: str, start: int) -> tuple[tuple[bool, int], ...]:
    """Label-like text from ``start`` on: not labels, but evidence a label may be repeated."""
    return tuple(
        (m["q"] is not None, number_of(m["num"] or m["bnum"])) for m in MID_RE.finditer(line, start)
    )


def _clean(rest: str, emphasis: str, *, cut: bool) -> str:
    """A label's text on its line: a `,`/`;` before the next label and open emphasis dropped."""
    if cut:
        rest = rest.rstrip()
        if rest.endswith((",", ";")):
            rest = rest[:-1].rstrip()
    if emphasis and rest.rstrip().endswith(emphasis):
        rest = rest.rstrip()[: -len(emphasis)]
    return rest


def segment(line: str, token: Token, following: Token) -> str:
    """The answer text of ``token`` when ``following`` is the next label on its line."""
    return _clean(line[token.rest_at : following.start], token.emphasis, cut=True).strip()


def line_labels(index: int, line: str, found: LineTokens) -> list[Label]:
    """Labels for the tokens of one line, each with its own stretch of the line as text."""
    labels, tokens, quoted = [], found.tokens, found.quoted
    for k, token in enumerate(tokens):
        cut = k + 1 < len(tokens)
        end = tokens[k + 1].start if cut else len(line)
        rest = _clean(line[token.rest_at : end], token.emphasis, cut=cut)
        labels.append(Label(index, token.number, rest, quoted, token.question, k > 0, cut))
    return labels
