"""Provider prompt caching, the way OpenAI bills it, so the ledger's cached-input pricing is real.

A prompt of at least 1,024 tokens whose leading tokens match a prompt seen in the last
``prompt_cache_ttl_s`` seconds (same model) reports the matched length, rounded down to a
multiple of 128, as ``usage.prompt_tokens_details.cached_tokens``. Prefixes are compared on
the token sequence of the messages in order (role, content, then the per-message framing), so
only a byte-identical start (system prompt first) is a hit, as with the real provider.
"""

from __future__ import annotations

import array
import collections
import hashlib

import tiktoken

from worker.tokens import ENCODING

from .protocol import ChatRequest

MIN_PREFIX = 1024
STEP = 128
_FRAME = 3  # framing tokens after each message's role token: 4 per message, as prompt_tokens
_ROLE_IDS = {"system": -1, "developer": -1, "user": -2, "assistant": -3, "tool": -4}


def token_sequence(chat: ChatRequest) -> list[int]:
    """The prompt as one token list: per message a role token, its content, then framing."""
    encoding = tiktoken.get_encoding(ENCODING)  # cached by tiktoken
    tokens: list[int] = []
    roles = chat.roles or ("user",) * len(chat.texts)
    for role, text in zip(roles, chat.texts, strict=True):
        tokens.append(_ROLE_IDS.get(role, -5))
        tokens.extend(encoding.encode(text, disallowed_special=()))
        tokens.extend([-9] * _FRAME)
    return tokens


def prefix_digests(model: str, tokens: list[int]) -> list[tuple[int, bytes]]:
    """(length, digest) of every cacheable prefix: 1024 tokens, then every 128 more."""
    digest = hashlib.blake2b(model.encode(), digest_size=16)
    out: list[tuple[int, bytes]] = []
    done = 0
    for length in range(MIN_PREFIX, len(tokens) + 1, STEP):
        digest.update(array.array("q", tokens[done:length]).tobytes())
        done = length
        out.append((length, digest.copy().digest()))
    return out


class PromptCache:
    """Prefixes seen recently; the oldest are dropped beyond ``max_entries``."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def clear(self) -> None:
        self._seen.clear()

    def use(self, chat: ChatRequest, now: float, ttl_s: float) -> int | None:
        """Cached tokens for ``chat`` (None: too short to cache), remembering its prefixes.

        Runs without awaits, so concurrent calls on the event loop see each other in order.
        """
        if chat.prompt_tokens < MIN_PREFIX:
            return None
        digests = prefix_digests(chat.model, token_sequence(chat))
        cached = 0
        for length, digest in reversed(digests):
            expiry = self._seen.get(digest)
            if expiry is not None and expiry > now:
                cached = length
                break
        for _, digest in digests:
            self._seen[digest] = now + ttl_s
            self._seen.move_to_end(digest)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return min(cached, chat.prompt_tokens // STEP * STEP)
