"""Per-key limits shared by every API process: requests per minute and requests in flight.

One Lua script decides both atomically on Redis's clock, so any number of API processes
enforce one budget per key. Requests per minute is a GCRA (a token bucket holding a minute's
worth): one key per API key, no log of timestamps. In-flight slots live in a sorted set scored
by their expiry, so a slot a dead process never released lapses after ``API_TIMEOUT_S`` plus a
margin; every live exit path releases its slot at once.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

from .._settings import Settings
from .errors import ApiError
from .keys import Caller
from .tickbatch import TickBatcher

log = logging.getLogger("coalesce.api")

PREFIX = "coalesce:api:"
SLOT_MARGIN_S = 30.0  # a slot outlives the server's timeout by this much before it lapses
IN_FLIGHT_RETRY_S = 1.0

# KEYS: rate key, in-flight set. ARGV: rpm, max in flight, slot id, slot ttl ms.
# Returns {0, 0} (admitted), {1, wait ms} (in flight full) or {2, wait ms} (rate).
ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= cap then return {1, 0} end
end
if rpm > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then tat = now end
  local new_tat = tat + 60000 / rpm
  if new_tat - 60000 > now then return {2, math.ceil(new_tat - 60000 - now)} end
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
end
if cap > 0 then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
end
return {0, 0}
"""


@dataclass
class Slot:
    """An admitted request; ``release()`` frees its in-flight place (idempotent)."""

    limiter: Limiter | None
    key_id: str
    slot_id: str
    released: bool = False

    async def release(self) -> None:
        if self.released or self.limiter is None:
            return
        self.released = True
        try:
            await self.limiter.release(self)
        except (aioredis.RedisError, OSError) as exc:  # it lapses on its own; see the module
            log.warning("could not release an in-flight slot (%s); it lapses", type(exc).__name__)


class Limiter:
    """Admits a request under its key's limits or raises a 429 ApiError with Retry-After."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.rpm = settings.api_rpm
        self.max_in_flight = settings.api_max_in_flight
        self.slot_ttl_ms = int((settings.api_timeout_s + SLOT_MARGIN_S) * 1000)
        self._batch = TickBatcher(redis)

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.max_in_flight > 0

    async def acquire(self, caller: Caller) -> Slot:
        """A slot for one request of ``caller``; 429 if its key is over a limit."""
        if not self.enabled:
            return Slot(None, caller.key_id, "")
        slot_id = secrets.token_hex(8)
        keys = [PREFIX + "rate:" + caller.key_id, PREFIX + "inflight:" + caller.key_id]
        args: list[str | int] = [self.rpm, self.max_in_flight, slot_id, self.slot_ttl_ms]
        # EVAL, not EVALSHA: Redis caches the compiled script, and a restart needs no reload.
        verdict, wait_ms = await self._batch.run(lambda pipe: pipe.eval(ACQUIRE, 2, *keys, *args))
        if int(verdict) == 1:
            raise ApiError(
                429,
                f"too many requests in flight for this key (limit {self.max_in_flight}, "
                "COALESCE_API_MAX_IN_FLIGHT)",
                code="too_many_requests_in_flight",
                retry_after_s=IN_FLIGHT_RETRY_S,
            )
        if int(verdict) == 2:
            raise ApiError(
                429,
                f"rate limit reached for this key ({self.rpm} requests per minute, "
                "COALESCE_API_RPM)",
                code="rate_limit_exceeded",
                retry_after_s=int(wait_ms) / 1000,
            )
        return Slot(self if self.max_in_flight > 0 else None, caller.key_id, slot_id)

    async def release(self, slot: Slot) -> None:
        key = PREFIX + "inflight:" + slot.key_id
        await self._batch.run(lambda pipe: pipe.zrem(key, slot.slot_id))
