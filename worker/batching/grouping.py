"""Which requests may share a call, and how large a batch a model has earned (shared by workers).

The batch limit per model lives in Redis (``coalesce:sizer``), so every worker process sees the
same limit and the same fallback history: a model whose replies often fail to parse has its
limit halved, grows back after clean batches, and is probed again after a rest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import NamedTuple

import redis
import redis.asyncio as aioredis

from producer import Request
from producer._keys import answer_params

SIZER = "coalesce:sizer"


class GroupKey(NamedTuple):
    """Requests share a combined prompt only when all of these are equal.

    The tenant is part of it, so two tenants' questions never meet in one call; so are the
    answer-changing parameters a chat request brought (top_p, seed, penalties), as canonical
    JSON ("" for none), so requests with different ones never share a call.
    """

    tenant: str
    model: str
    system: str | None
    temperature: float
    max_tokens: int | None
    params: str = ""

    @property
    def id(self) -> str:
        """A short stable name for Redis keys; never the raw text of the system prompt."""
        blob = json.dumps(list(self), ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def group_key(request: Request) -> GroupKey:
    return GroupKey(
        tenant=request.tenant or "",
        model=request.model,
        system=request.system or None,
        temperature=float(request.temperature) + 0.0,
        max_tokens=request.max_tokens,
        params=_params(request),
    )


def _params(request: Request) -> str:
    params = answer_params(request.params)
    return json.dumps(params, sort_keys=True, ensure_ascii=False) if params else ""


@dataclass(frozen=True)
class SizerPolicy:
    """When to shrink, grow and probe a model's batch limit."""

    max_batch: int
    shrink_above: float = 0.25
    grow_below: float = 0.05
    smoothing: float = 0.3
    probe_after_s: float = 30.0
    default_answer_tokens: int = 200

    def args(self) -> list[float | int]:
        return [
            self.max_batch,
            self.shrink_above,
            self.grow_below,
            self.smoothing,
            int(self.probe_after_s * 1000),
            self.default_answer_tokens,
        ]


# A Lua fragment shared by the window scripts: the model's current limit, with the probe after a
# rest. Expects `now` (ms), `sizer` (key), `model` and `policy` = {max, shrink, grow, smooth,
# probe_ms, default_answer} in scope.
LIMIT_LUA = """
local function model_limit()
  local limit = tonumber(redis.call('HGET', sizer, model .. '|limit')) or policy[1]
  if limit > policy[1] then limit = policy[1] end
  if limit <= 1 and policy[1] >= 2 then
    local shrunk = tonumber(redis.call('HGET', sizer, model .. '|shrunk_at'))
    if shrunk and now - shrunk >= policy[5] then
      limit = 2
      redis.call('HSET', sizer, model .. '|limit', 2, model .. '|rate', policy[2] / 2)
    end
  end
  return limit
end
local function answer_estimate()
  return tonumber(redis.call('HGET', sizer, model .. '|answer_tokens')) or policy[6]
end
"""

# KEYS: sizer. ARGV: model, size, fallbacks, mean answer tokens (0: unknown), then the policy.
_RECORD = """
local sizer, model = KEYS[1], ARGV[1]
local size, fallbacks, answer = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local policy = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
                tonumber(ARGV[9]), tonumber(ARGV[10])}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if answer > 0 then
  local old = tonumber(redis.call('HGET', sizer, model .. '|answer_tokens')) or answer
  redis.call('HSET', sizer, model .. '|answer_tokens', old + policy[4] * (answer - old))
end
if size < 2 then return 0 end
local limit = tonumber(redis.call('HGET', sizer, model .. '|limit')) or policy[1]
local rate = tonumber(redis.call('HGET', sizer, model .. '|rate')) or 0
rate = rate + policy[4] * (fallbacks / size - rate)
if rate > policy[2] and limit > 1 then
  limit = math.max(1, math.floor(limit / 2))
  rate = policy[2] / 2
  redis.call('HSET', sizer, model .. '|shrunk_at', now)
elseif rate < policy[3] and limit < policy[1] then
  limit = limit + 1
end
redis.call('HSET', sizer, model .. '|limit', limit, model .. '|rate', rate)
return limit
"""


class Sizer:
    """Records batch outcomes into the shared per-model limit (on the collector's loop)."""

    def __init__(self, client: aioredis.Redis, policy: SizerPolicy) -> None:
        self.policy = policy
        self._record = client.register_script(_RECORD)

    async def record(self, model: str, size: int, fallbacks: int, answer_tokens: float) -> int:
        """Fold one batch into the model's history; returns the model's new limit."""
        args = [model, size, fallbacks, answer_tokens, *self.policy.args()]
        return int(await self._record(keys=[SIZER], args=args))


def read_sizer(client: redis.Redis) -> dict[str, dict[str, float]]:
    """``{model: {limit, rate, shrunk_at, answer_tokens}}`` for stats and tests."""
    out: dict[str, dict[str, float]] = {}
    for raw_field, raw_value in client.hgetall(SIZER).items():
        text = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        model, _, name = text.rpartition("|")
        out.setdefault(model, {})[name] = float(raw_value)
    return out
