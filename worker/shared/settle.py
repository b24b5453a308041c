"""Settling requests: store the answer for repeats, release claims, wake every waiting party.

One script call settles any number of requests (a whole batch, or the slots a stream just
released): for each it checks that the delivery still holds its dedup claim, so a request is
settled once even if two workers sent its batch (a lease taken over from a slow worker), and
it pushes the outcome to the inbox of the leader's process and of every follower's. A leading
request's answer is stored in the Celery result backend in the same step
(:mod:`worker.shared.results`), so its caller hears it at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis

from .dedup import ANSWER_PREFIX, PREFIX, Outcome
from .results import RESULT_PREFIX, STORE_FINAL_LUA

LEASES = "coalesce:leases"
BATCH = "coalesce:batch:"

# ARGV: answer ttl ms, inbox ttl ms, batch id to release ('' for none), the caller's own inbox,
# result expiry s, result date (ISO), then per request: key, delivery, inbox, outcome json, '1'
# if it is an answer (kept for repeats, and stored as the leader's Celery result). The leader's plan
# (``<key>:plan``, see worker.batching.entry) adds an exact-cache entry for the answer (when it
# names one) and replaces dedup's answer record. The leader's result is stored only with its own
# outcome (not when an earlier answer record replaces it) and never over a final one. An inbox
# message is "<delivery>\n<outcome json>", with "+" before the json when the result was stored.
# Parties waiting in the caller's own process are not pushed: the reply lists them as
# {delivery, request number, 1 if its result was stored}, and the caller resolves them in memory.
_SETTLE = (
    STORE_FINAL_LUA
    + """
local prefix, ttl, inbox_ttl, batch = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local own, expires, done = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local pushes, order, mine = {}, {}, {0}
-- Celery's meta for a task that returned this answer; the delivery is <task id>:<worker>:<n>.
local function result_meta(delivery, outcome)
  local task_id = string.match(delivery, '^(.*):[^:]*:[^:]*$')
  return '{"status": "SUCCESS", "result": ' .. string.sub(outcome, ANSWER_AT, -2)
    .. ', "traceback": null, "children": [], "date_done": "' .. done .. '", "task_id": '
    .. cjson.encode(task_id) .. '}', task_id
end
local number, replaced = 0, false
local function push(inbox, delivery, message, result)
  if inbox == own and not replaced then
    table.insert(mine, delivery)
    table.insert(mine, number)
    table.insert(mine, result and 1 or 0)
    return
  end
  if not pushes[inbox] then pushes[inbox] = {}; table.insert(order, inbox) end
  table.insert(pushes[inbox], delivery .. '\\n' .. (result and '+' or '') .. message)
end
for i = 7, #ARGV, 5 do
  number = number + 1
  replaced = false
  local key, delivery, inbox, outcome, keep = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  local claim = prefix .. key .. ':claim'
  if redis.call('GET', claim) == delivery then
    local plan_key = prefix .. key .. ':plan'
    local plan = redis.call('GET', plan_key)
    local cache_key, cache_ttl, keep_dedup = '', 0, true
    if plan then
      redis.call('DEL', plan_key)
      local nl = string.find(plan, '\\n', 1, true)
      cache_key = string.sub(plan, 1, nl - 1)
      cache_ttl = tonumber(string.sub(plan, nl + 1))
      keep_dedup = false
    end
    if keep == '1' then
      local answer = prefix .. key .. ':answer'
      local existing = redis.call('GET', answer)
      if existing then outcome = existing; replaced = true
      elseif ttl > 0 and keep_dedup then redis.call('SET', answer, outcome, 'PX', ttl) end
      if cache_key ~= '' then redis.call('SET', cache_key, outcome, 'PX', cache_ttl) end
    end
    local result = false
    if keep == '1' and not replaced then
      local meta, task_id = result_meta(delivery, outcome)
      result = store_final(KEYS[4] .. task_id, meta, expires)
    end
    redis.call('DEL', claim)
    local waiters_key = prefix .. key .. ':waiters'
    local waiters = redis.call('SMEMBERS', waiters_key)
    if #waiters > 0 then redis.call('DEL', waiters_key) end
    mine[1] = mine[1] + 1
    push(inbox, delivery, outcome, result)
    for _, waiter in ipairs(waiters) do
      local bar = string.find(waiter, '|', 1, true)
      push(string.sub(waiter, bar + 1), string.sub(waiter, 1, bar - 1), outcome, false)
    end
  end
end
for _, inbox in ipairs(order) do
  redis.call('RPUSH', inbox, unpack(pushes[inbox]))
  redis.call('PEXPIRE', inbox, inbox_ttl)
end
if batch ~= '' then
  redis.call('ZREM', KEYS[2], batch)
  redis.call('DEL', KEYS[3] .. batch)
end
return mine
""".replace("ANSWER_AT", str(len(ANSWER_PREFIX) + 1))
)

INBOX_TTL_MS = 120_000


@dataclass(frozen=True)
class Settlement:
    """One request's outcome, addressed to the delivery that leads it."""

    key: str
    delivery: str
    inbox: str
    outcome: Outcome


class Settler:
    """Runs the settle script on the collector's loop (async client: never blocks the loop)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        answer_ttl_s: float,
        result_expires_s: int = 0,
        own_inbox: str = "",
        resolve: Callable[[str, Outcome], None] = lambda delivery, outcome: None,
    ) -> None:
        self.answer_ttl_ms = int(answer_ttl_s * 1000)
        self.result_expires_s = result_expires_s
        self._own_inbox = own_inbox
        self._resolve = resolve
        self._script = client.register_script(_SETTLE)

    async def settle(self, settlements: list[Settlement], *, release_batch: str = "") -> int:
        """Settle these requests (and release the batch's lease); returns how many were ours.

        Parties waiting in this process are resolved in memory, the others through their inbox.
        """
        args: list[str | int] = [
            self.answer_ttl_ms,
            INBOX_TTL_MS,
            release_batch,
            self._own_inbox,
            self.result_expires_s,
            datetime.now(UTC).isoformat(),
        ]
        for s in settlements:
            keep = "1" if s.outcome.answer is not None else "0"
            args += [s.key, s.delivery, s.inbox, s.outcome.dump(), keep]
        reply = await self._script(keys=[PREFIX, LEASES, BATCH, RESULT_PREFIX], args=args)
        for n in range(1, len(reply), 3):
            delivery = reply[n].decode() if isinstance(reply[n], bytes) else str(reply[n])
            settled = settlements[int(reply[n + 1]) - 1].outcome
            self._resolve(delivery, settled.with_result_stored() if int(reply[n + 2]) else settled)
        return int(reply[0])
