"""The window every worker shares: a group's requests gather in Redis, not in one process.

Per group (``coalesce:win:<group id>``) a list holds the waiting items and a hash its budget
(``due``: when the window closes, in Redis time; tokens so far). Joining is one script: it
appends the item and, if the group is now full, over its token budget or past its window,
claims the batch at once. A worker with an item in a group keeps a local timer for its ``due``
and runs the flush script then; whichever worker's script runs first claims the batch, the
others find nothing. A claimed batch is kept under a lease (``coalesce:leases``) that its
sender renews; if the sender dies, any worker with requests waiting takes it over.

Only items whose delivery still holds its dedup claim are sent, so an item whose task gave up
or was redelivered elsewhere is dropped instead of asked twice.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Literal

import redis
import redis.asyncio as aioredis

from producer import Request

from ..shared.dedup import PREFIX as DEDUP_PREFIX
from ..shared.settle import BATCH, LEASES
from .grouping import LIMIT_LUA, SIZER, SizerPolicy

WINDOW = "coalesce:win:"
LEASE_S = 6.0  # a dead sender's batch is taken over within about 1.5 x this
KEEP_MS = 600_000  # an abandoned window's keys expire after this

HEAD_LUA = """
local win, meta, sizer, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local batch_prefix, dedup = KEYS[5], KEYS[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Claims up to `limit` items of the window as batch `batch` under a lease; drops items whose
# delivery no longer holds its claim, and repeats of one delivery (a retried join).
# With `factor` > 1 (similarity grouping) it claims up to `factor` x `limit`, in whole calls'
# worth when there is more than one (the rest waits for its window, as without grouping), and
# the reply is 'split', carrying the limit and answer estimate the sender splits by.
_CLAIM_LUA = """
local function claim(limit, factor, batch, lease_ms, window_ms)
  local want = limit
  if factor > 1 then
    local len = redis.call('LLEN', win)
    want = math.min(len, limit * factor)
    if want > limit then want = want - want % limit end
  end
  local raw = redis.call('LRANGE', win, 0, want - 1)
  redis.call('LTRIM', win, #raw, -1)
  local items, seen, tokens, answers = {}, {}, 0, 0
  local estimate = nil  -- read once per claim, not per item
  for _, blob in ipairs(raw) do
    local item = cjson.decode(blob)
    tokens = tokens + item.n
    if item.a == 0 then
      estimate = estimate or math.floor(answer_estimate())
      answers = answers + estimate
    else answers = answers + item.a end
    if not seen[item.d] and redis.call('GET', dedup .. item.k .. ':claim') == item.d then
      seen[item.d] = true
      table.insert(items, blob)
    end
  end
  local left = redis.call('LLEN', win)
  if left == 0 then
    redis.call('DEL', meta)
  else
    redis.call('HINCRBY', meta, 'tokens', -tokens)
    redis.call('HINCRBY', meta, 'answers', -answers)
    redis.call('HSET', meta, 'due', now + window_ms)
  end
  if #items == 0 then return {'none', 0} end
  redis.call('RPUSH', batch_prefix .. batch, unpack(items))
  redis.call('PEXPIRE', batch_prefix .. batch, 3600000)
  redis.call('ZADD', leases, now + lease_ms, batch)
  if factor > 1 then
    estimate = estimate or math.floor(answer_estimate())
    return {'split', batch, left, limit, estimate, unpack(items)}
  end
  return {'batch', batch, left, unpack(items)}
end
"""

# Joining, as a Lua function over ARGV[o+1 ..]: item json, its tokens, its answer estimate
# (0: use the model's), model, window ms, max tokens, max answer tokens, batch id, lease ms,
# then the sizer policy, then the split factor (1: no similarity grouping). The join script has
# o = 0; the entry script puts its claim first and its cache arguments after.
JOIN_LUA = (
    LIMIT_LUA
    + _CLAIM_LUA
    + """
local function join_window(o)
  local limit = model_limit()
  if limit <= 1 then return {'single', 0} end
  local factor = tonumber(ARGV[o + 16]) or 1
  local answer = tonumber(ARGV[o + 3])
  if answer == 0 then answer = math.floor(answer_estimate()) end
  local n = redis.call('RPUSH', win, ARGV[o + 1])
  local tokens = redis.call('HINCRBY', meta, 'tokens', tonumber(ARGV[o + 2]))
  local answers = redis.call('HINCRBY', meta, 'answers', answer)
  local window_ms = tonumber(ARGV[o + 5])
  local due = tonumber(redis.call('HGET', meta, 'due'))
  if not due then
    due = now + window_ms
    redis.call('HSET', meta, 'due', due)
  end
  redis.call('PEXPIRE', win, 600000)
  redis.call('PEXPIRE', meta, 600000)
  if n >= limit * factor or tokens >= tonumber(ARGV[o + 6])
      or answers >= tonumber(ARGV[o + 7]) or now >= due then
    return claim(limit, factor, ARGV[o + 8], tonumber(ARGV[o + 9]), window_ms)
  end
  return {'wait', due - now}
end
"""
)


def join_prelude(offset: int) -> str:
    """Lua reading the model and sizer policy of a join whose arguments follow ``offset``."""
    return f"""
local model = ARGV[{offset + 4}]
local policy = {{}}
for i = {offset + 10}, {offset + 15} do table.insert(policy, tonumber(ARGV[i])) end
"""


_JOIN = HEAD_LUA + join_prelude(0) + JOIN_LUA + "\nreturn join_window(0)\n"

# ARGV: model, window ms, batch id, lease ms, the sizer policy, force, split factor.
_FLUSH = (
    HEAD_LUA
    + """
local model = ARGV[1]
local policy = {}
for i = 5, 10 do table.insert(policy, tonumber(ARGV[i])) end
"""
    + LIMIT_LUA
    + _CLAIM_LUA
    + """
local due = tonumber(redis.call('HGET', meta, 'due'))
if not due then return {'none', 0} end
if now < due and ARGV[11] ~= '1' then return {'wait', due - now} end
local factor = tonumber(ARGV[12]) or 1
return claim(math.max(2, model_limit()), factor, ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[2]))
"""
)

# Takes over one batch whose lease ran out (its sender died). ARGV: lease ms.
_RECLAIM = (
    HEAD_LUA
    + """
local due = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 8)
for _, batch in ipairs(due) do
  local raw = redis.call('LRANGE', batch_prefix .. batch, 0, -1)
  local items = {}
  for _, blob in ipairs(raw) do
    local item = cjson.decode(blob)
    if redis.call('GET', dedup .. item.k .. ':claim') == item.d then table.insert(items, blob) end
  end
  if #items == 0 then
    redis.call('ZREM', leases, batch)
    redis.call('DEL', batch_prefix .. batch)
  else
    redis.call('ZADD', leases, now + tonumber(ARGV[1]), batch)
    return {'batch', batch, 0, unpack(items)}
  end
end
return {'none', 0}
"""
)

# Renews a lease we hold. ARGV: batch id, lease ms.
_RENEW = (
    HEAD_LUA
    + """
return redis.call('ZADD', leases, 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
"""
)


@dataclass(frozen=True)
class Item:
    """One request waiting in a window, as every worker sees it."""

    delivery: str
    inbox: str
    key: str
    payload: dict[str, Any]
    tokens: int
    answer_tokens: int
    deadline: float  # wall-clock (epoch) seconds: items cross processes and hosts

    @functools.cached_property
    def request(self) -> Request:
        """The request itself; validated by the worker that joined it, so not again here."""
        return Request.model_construct(**self.payload)

    def dump(self) -> str:
        return json.dumps(
            {
                "d": self.delivery,
                "i": self.inbox,
                "k": self.key,
                "r": self.payload,
                "n": self.tokens,
                "a": self.answer_tokens,
                "e": self.deadline,
            },
            ensure_ascii=False,
        )

    @classmethod
    def load(cls, blob: bytes | str) -> Item:
        d = json.loads(blob)
        return cls(d["d"], d["i"], d["k"], d["r"], int(d["n"]), int(d["a"]), float(d["e"]))


@dataclass(frozen=True)
class Verdict:
    """What a join or flush decided: wait ``delay_ms``, send ``items`` as ``batch``, or neither."""

    action: Literal["wait", "batch", "single", "none"]
    delay_ms: int = 0
    batch: str = ""
    left: int = 0  # items still in the window after this claim
    items: tuple[Item, ...] = ()
    # Similarity grouping only (0: unknown): one call's item limit and answer estimate.
    limit: int = 0
    answer_estimate: int = 0


def verdict(reply: list[Any]) -> Verdict:
    """A join, flush or reclaim script's reply as a record."""
    action = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if action == "batch":
        batch = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        items = tuple(Item.load(b) for b in reply[3:])
        return Verdict("batch", batch=batch, left=int(reply[2]), items=items)
    if action == "split":
        batch = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        items = tuple(Item.load(b) for b in reply[5:])
        return Verdict(
            "batch",
            batch=batch,
            left=int(reply[2]),
            items=items,
            limit=int(reply[3]),
            answer_estimate=int(reply[4]),
        )
    if action == "wait":
        return Verdict("wait", delay_ms=max(0, int(reply[1])))
    return Verdict("single" if action == "single" else "none")


def window_keys(group: str) -> list[str]:
    return [WINDOW + group, WINDOW + group + ":meta", SIZER, LEASES, BATCH, DEDUP_PREFIX]


@dataclass(frozen=True)
class Limits:
    window_ms: int
    max_batch_tokens: int
    max_answer_tokens: int


class Window:
    """Join from task threads (sync client); flush, reclaim and renew from the loop (async)."""

    def __init__(
        self,
        client: redis.Redis,
        aclient: aioredis.Redis,
        limits: Limits,
        policy: SizerPolicy,
        *,
        split_factor: int = 1,
    ) -> None:
        """``split_factor`` > 1 (similarity grouping): claim that many calls' worth at once.

        ``limits`` are then the scaled budgets of a whole claim; one call's stay in settings.
        """
        self.limits = limits
        self.policy = policy
        self.split_factor = split_factor
        self._join = client.register_script(_JOIN)
        self._flush = aclient.register_script(_FLUSH)
        self._reclaim = aclient.register_script(_RECLAIM)
        self._renew = aclient.register_script(_RENEW)
        self.lease_ms = int(LEASE_S * 1000)

    def join(self, group: str, item: Item, model: str, batch_id: str) -> Verdict:
        """Add ``item``; claims the batch (as ``batch_id``) when the group is ready to go."""
        return verdict(
            self._join(keys=window_keys(group), args=self.join_args(item, model, batch_id))
        )

    def join_args(self, item: Item, model: str, batch_id: str) -> list[str | int | float]:
        lim = self.limits
        return [
            item.dump(),
            item.tokens,
            item.answer_tokens,
            model,
            lim.window_ms,
            lim.max_batch_tokens,
            lim.max_answer_tokens,
            batch_id,
            self.lease_ms,
            *self.policy.args(),
            self.split_factor,  # always sent: the entry script appends its own arguments
        ]

    async def flush(self, group: str, model: str, batch_id: str, *, force: bool = False) -> Verdict:
        """At the window's close (or now, if ``force``): claim what is there, or learn when."""
        args = [model, self.limits.window_ms, batch_id, self.lease_ms, *self.policy.args()]
        args += ["1" if force else "0", self.split_factor]
        return verdict(await self._flush(keys=window_keys(group), args=args))

    async def reclaim(self) -> Verdict:
        """Take over one batch whose sender stopped renewing its lease."""
        return verdict(await self._reclaim(keys=window_keys("-"), args=[self.lease_ms]))

    async def renew(self, batch_id: str) -> bool:
        return bool(await self._renew(keys=window_keys("-"), args=[batch_id, self.lease_ms]))
