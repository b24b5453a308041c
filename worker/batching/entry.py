"""A request's way in: the dedup claim and, for a leader, joining the shared window, in one call.

One script round trip per request instead of two: it returns the stored answer, registers the
request as a follower of an identical one in flight, or makes it the leader and adds it to its
group's window (claiming the batch when the group is ready).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis

from ..shared.dedup import CLAIM_LUA, Outcome, answer_key, claim_key, waiters_key
from .window import HEAD_LUA, JOIN_LUA, Item, Verdict, Window, join_prelude, verdict, window_keys

# KEYS: the six window keys, then answer, claim, waiters. ARGV: delivery, inbox, claim ttl ms,
# waiters ttl ms, '1' to join the window when leading, then the join's arguments.
_ENTER = (
    HEAD_LUA
    + CLAIM_LUA
    + join_prelude(5)
    + JOIN_LUA
    + """
local role, payload = dedup_claim(KEYS[7], KEYS[8], KEYS[9], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if role ~= 'leader' or ARGV[5] ~= '1' then return {role, payload} end
local joined = join_window(5)
table.insert(joined, 1, 'leader')
return joined
"""
)


@dataclass(frozen=True)
class Entered:
    """The claim's outcome; for a leader that joined, what the window decided."""

    role: Literal["leader", "follower", "answer"]
    answer: Outcome | None = None
    verdict: Verdict | None = None


class Entry:
    def __init__(self, client: redis.Redis, window: Window, *, claim_ttl_ms: int) -> None:
        self.window = window
        self.claim_ttl_ms = claim_ttl_ms
        self._script = client.register_script(_ENTER)

    def enter(self, item: Item, group: str, model: str, batch_id: str, *, join: bool) -> Entered:
        """Claim ``item``'s key for its delivery; if it leads and ``join``, add it to the window."""
        keys = [
            *window_keys(group),
            answer_key(item.key),
            claim_key(item.key),
            waiters_key(item.key),
        ]
        args: list[str | int | float] = [
            item.delivery,
            item.inbox,
            self.claim_ttl_ms,
            self.claim_ttl_ms * 4,
            "1" if join else "0",
            *self.window.join_args(item, model, batch_id),
        ]
        reply = self._script(keys=keys, args=args)
        role = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if role == "answer":
            return Entered("answer", answer=Outcome.load(reply[1]))
        if role == "follower":
            return Entered("follower")
        return Entered("leader", verdict=verdict(reply[1:]) if len(reply) > 2 else None)
