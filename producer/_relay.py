"""The passthrough stream relay: how a worker hands upstream chunks to whoever waits.

A worker answering a passthrough request with ``stream=True`` relays each upstream
``chat.completion.chunk`` as it arrives: it appends ``{"seq": n, "chunk": {...}}`` to the list
:func:`chunk_key` (so a reader that starts late still sees every chunk in order) and publishes
the same JSON on the channel of the same name (so a reader already listening needs no polling).
The last item is ``{"seq": n, "done": true}``; the final :class:`~producer.Answer` is stored as
for any request. Both sides use these helpers, so the wire format lives in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CHUNK_PREFIX = "coalesce:chunks:"
CHUNK_TTL_S = 600


def chunk_key(task_id: str) -> str:
    """The Redis list (and pub/sub channel) that carries one task's chunks."""
    return CHUNK_PREFIX + task_id


def encode_chunk(seq: int, chunk: dict[str, Any]) -> str:
    """One upstream chunk, numbered so a reader can merge the list and the channel."""
    return json.dumps({"seq": seq, "chunk": chunk}, ensure_ascii=False, separators=(",", ":"))


def encode_done(seq: int) -> str:
    """The end marker: no chunk follows; the stored result is the final answer."""
    return json.dumps({"seq": seq, "done": True}, separators=(",", ":"))


@dataclass(frozen=True)
class RelayItem:
    """One decoded relay item: a chunk (``chunk`` set) or the end (``done`` true)."""

    seq: int
    chunk: dict[str, Any] | None = field(default=None)
    done: bool = False


def decode(raw: str | bytes) -> RelayItem:
    """A relay item from its JSON; ValueError for anything that is not one."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"relay item is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("seq"), int):
        raise ValueError("relay item must be an object with an integer seq")
    if data.get("done") is True:
        return RelayItem(seq=data["seq"], done=True)
    chunk = data.get("chunk")
    if not isinstance(chunk, dict):
        raise ValueError("relay item must carry a chunk object or done")
    return RelayItem(seq=data["seq"], chunk=chunk)
