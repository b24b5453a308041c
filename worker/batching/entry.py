"""A request's way in: the dedup claim and, for a leader, joining the shared window, in one call.

One script call per request instead of two: it returns the stored answer, registers the
request as a follower of an identical one in flight, or makes it the leader and adds it to its
group's window (claiming the batch when the group is ready). Task threads hand the call to the
collector's loop, which sends the calls of many threads in one pipeline (ScriptPipe).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from ..cache.policy import Plan
from ..shared.dedup import CLAIM_LUA, Outcome, answer_key, claim_key, plan_key, waiters_key
from ..shared.scriptpipe import ScriptPipe
from .window import HEAD_LUA, JOIN_LUA, Item, Verdict, Window, join_prelude, verdict, window_keys

# KEYS: the six window keys, then answer, claim, waiters, the exact-cache key and the plan. ARGV:
# delivery, inbox, claim ttl ms, waiters ttl ms, '1' to join the window when leading, the join's
# arguments, then '1' to read the exact cache, '1' to read dedup's stored answer, the plan ('' for
# none) and its ttl ms. A leader records its plan, so whichever process settles it stores the
# answer where the plan says.
_ENTER = (
    HEAD_LUA
    + CLAIM_LUA
    + join_prelude(5)
    + JOIN_LUA
    + """
local n = #ARGV
if ARGV[n - 3] == '1' then
  local hit = redis.call('GET', KEYS[10])
  if hit then return {'cache', hit} end
end
local role, payload = dedup_claim(KEYS[7], KEYS[8], KEYS[9], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                                  ARGV[n - 2] == '1')
if role == 'leader' then
  if ARGV[n - 1] ~= '' then redis.call('SET', KEYS[11], ARGV[n - 1], 'PX', ARGV[n])
  else redis.call('DEL', KEYS[11]) end
end
if role ~= 'leader' or ARGV[5] ~= '1' then return {role, payload} end
local joined = join_window(5)
table.insert(joined, 1, 'leader')
return joined
"""
)


PLAN_MARGIN_MS = 60_000  # a plan outlives its request's deadline by this, for a late settle


def stored_as(plan: Plan) -> str:
    """The plan as the settle script reads it: ``<exact key or ''>\n<ttl ms>``.

    '' when the caches are off for it: dedup's answer record is kept, as without caches. A
    plan means the cache serves later repeats, so the settle script keeps no dedup record.
    """
    if plan.keep_dedup:
        return ""
    key = plan.exact_key if plan.store else ""
    return f"{key}\n{plan.ttl_s * 1000}"


@dataclass(frozen=True)
class Entered:
    """The claim's outcome; for a leader that joined, what the window decided."""

    role: Literal["leader", "follower", "answer", "cache"]
    answer: Outcome | None = None
    verdict: Verdict | None = None


class Entry:
    """Runs the entry script for task threads, through the collector loop's :class:`ScriptPipe`."""

    def __init__(
        self,
        window: Window,
        client: aioredis.Redis,
        loop: asyncio.AbstractEventLoop,
        *,
        claim_ttl_ms: int,
    ) -> None:
        self.window = window
        self.claim_ttl_ms = claim_ttl_ms
        self._pipe = ScriptPipe(client, loop, _ENTER, "dedup claim and window join")

    def enter(
        self,
        item: Item,
        group: str,
        model: str,
        batch_id: str,
        *,
        join: bool,
        plan: Plan,
        deadline: float,
    ) -> Entered:
        """Serve ``item`` from the exact cache, or claim its key for its delivery; if it leads
        and ``join``, add it to the window. ``plan`` says which caches to read and write.
        Connection problems are retried until ``deadline`` (monotonic)."""
        keys = [
            *window_keys(group),
            answer_key(item.key),
            claim_key(item.key),
            waiters_key(item.key),
            plan.exact_key,
            plan_key(item.key),
        ]
        args: list[str | int | float] = [
            item.delivery,
            item.inbox,
            self.claim_ttl_ms,
            self.claim_ttl_ms * 4,
            "1" if join else "0",
            *self.window.join_args(item, model, batch_id),
            "1" if plan.read and plan.exact_key else "0",
            "1" if plan.keep_dedup else "0",
            stored_as(plan),
            int(max(item.deadline - time.time(), 0) * 1000) + PLAN_MARGIN_MS,
        ]
        reply = self._pipe.call(keys, args, deadline)
        role = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if role in ("answer", "cache"):
            return Entered("cache" if role == "cache" else "answer", answer=Outcome.load(reply[1]))
        if role == "follower":
            return Entered("follower")
        return Entered("leader", verdict=verdict(reply[1:]) if len(reply) > 2 else None)
