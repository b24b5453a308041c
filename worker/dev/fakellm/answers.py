"""Deterministic answers, batch splitting and token pieces: the truth tests compare against."""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterator

import tiktoken

from worker.batching.prompt import BATCH_INSTRUCTIONS
from worker.tokens import ENCODING, chat_prompt_tokens

# --- token counting -----------------------------------------------------------------------------


def prompt_tokens(contents: list[str]) -> int:
    """Prompt tokens the way OpenAI bills chat messages: content plus 4 per message, plus 3."""
    return chat_prompt_tokens([{"content": text} for text in contents])


def token_pieces(text: str, limit: int | None = None) -> list[str]:
    """``text`` cut at token boundaries: one piece per token, the first ``limit`` tokens only.

    A token that ends inside a multi-byte character yields ``""`` and the character comes
    with the token that completes it, so every piece is valid text, ``len(pieces)`` is the
    token count, and ``"".join(pieces)`` equals ``worker.tokens.truncate_tokens(text, limit)``.
    """
    encoding = tiktoken.get_encoding(
        ENCODING
    )  # cached by tiktoken: the same one worker.tokens uses
    tokens = encoding.encode(text, disallowed_special=())
    if limit is not None:
        tokens = tokens[:limit]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(raw) for raw in encoding.decode_tokens_bytes(tokens)]
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return pieces


# --- deterministic answers ----------------------------------------------------------------------

_WORDS = (
    "river", "stone", "light", "quiet", "garden", "signal", "paper", "window",
    "morning", "number", "silver", "market", "engine", "forest", "bridge", "winter",
    "simple", "careful", "bright", "steady", "measure", "travel", "gather", "follow",
    "change", "build", "carry", "notice", "harbor", "letter", "summer", "valley",
    "copper", "circle", "pattern", "season", "shelter", "question", "reason", "moment",
    "balance", "orbit", "thread", "canvas", "meadow", "anchor", "lantern", "compass",
    "the", "of", "and", "with", "under", "across", "between", "through",
    "every", "small", "large", "early", "late", "open", "clear", "warm",
)  # fmt: skip


def _byte_stream(seed: bytes) -> Iterator[int]:
    """An endless, platform-independent stream of pseudo-random bytes derived from ``seed``."""
    counter = 0
    while True:
        yield from hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1


def _sentence(stream: Iterator[int], count: int, end: str = ".") -> str:
    words = [_WORDS[next(stream) % len(_WORDS)] for _ in range(count)]
    for index in range(count - 1):
        if next(stream) % 9 == 0:
            words[index] += ","
    words[0] = words[0].capitalize()
    return " ".join(words) + end


def expected_answer(model: str, system: str | None, question: str) -> str:
    """The answer the fake gives to ``question``, alone or inside a batch; unique per input.

    It starts with ``ans-<10 hex>`` so tests can tell answers apart; about one in five is a
    sentence followed by a short numbered list, because real answers span lines too.

    A one-line answer is ``ans-<hex>`` and lower-case words with commas, ending in ``.``: it
    never holds ``:``, ``*``, quotes, backslashes, braces or a digit after a space, so the
    one-line reply layouts (``A1: x A2: y``, ``**A1:** x``, ``Q1: q A1: x``, JSON) cannot be
    read two ways. Those layouts are only used when every answer of a batch is one line.
    """
    key = json.dumps([model, system or None, question.strip()])
    digest = hashlib.sha256(key.encode()).digest()
    stream = _byte_stream(digest)
    head = f"ans-{digest.hex()[:10]}"
    words = 5 + next(stream) % 35  # 6..40 words counting the head
    if next(stream) % 5:
        return f"{head} {_sentence(stream, words)}"
    lines = [f"{head} {_sentence(stream, max(3, words // 2), end=':')}"]
    for number in range(1, 3 + next(stream) % 2):
        lines.append(f"{number}. {_sentence(stream, 2 + next(stream) % 5)}")
    return "\n".join(lines)


# --- batched prompts ----------------------------------------------------------------------------

_MARKER_RE = re.compile(r"=== Q(\d+) (\S+) ===")
_END_RE = re.compile(r"=== END (\S+) ===")


def split_batch(text: str) -> list[tuple[int, str]] | None:
    """The (label, question) pairs of a batched prompt, or None when ``text`` is a plain prompt.

    Only markers carrying the first marker's nonce count, like the worker's own parser.
    """
    questions: list[tuple[int, list[str]]] = []
    nonce: str | None = None
    for line in text.split("\n"):
        marker = _MARKER_RE.fullmatch(line.strip())
        if nonce is None:
            if marker:
                nonce = marker.group(2)
                questions.append((int(marker.group(1)), []))
            continue
        if marker and marker.group(2) == nonce:
            questions.append((int(marker.group(1)), []))
            continue
        end = _END_RE.fullmatch(line.strip())
        if end and end.group(1) == nonce:
            return [(label, "\n".join(body).strip()) for label, body in questions]
        questions[-1][1].append(line)
    return None


def group_system(system: str | None) -> str | None:
    """The group's own system prompt inside a batch system message (None when it had none)."""
    suffix = "\n\n" + BATCH_INSTRUCTIONS
    if system is None or system == BATCH_INSTRUCTIONS:
        return None
    if system.endswith(suffix):
        return system[: -len(suffix)] or None
    return system
