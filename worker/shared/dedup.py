"""Dedup on identical keys across every worker: one leader asks, followers share its answer.

A *delivery* is one run of one task (``<task id>:<worker>:<nonce>``), so two deliveries of the
same task id (a redelivery while the first still runs) are two parties here: the second
follows the first instead of asking upstream again. Records, under ``coalesce:dd:<key>:``:

- ``claim``    the leading delivery, with a short TTL its thread keeps refreshing; if its
               process dies the claim lapses and a follower takes over.
- ``answer``   the finished answer, kept ``dedup_ttl_s`` for repeats and redeliveries.
- ``waiters``  ``<delivery>|<inbox>`` of each follower; settling pushes the outcome to every
               follower's process inbox (:mod:`worker.shared.inbox`), so no follower holds a
               Redis connection while it waits.
- ``plan``     set by the leader when the caches apply to it: the exact-cache key and TTL its
               answer is stored under (none for ``no_store``); the ``answer`` record is then
               not kept, since the cache serves later repeats.

Settling happens in :mod:`worker.shared.settle`, together with the leader's own delivery.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

import redis

from producer import Answer, UpstreamError
from producer._keys import DEDUP_PREFIX

PREFIX = DEDUP_PREFIX
# How a stored outcome with an answer begins; the settle script cuts the answer out after it.
ANSWER_PREFIX = '{"answer": '


def answer_key(key: str) -> str:
    return f"{PREFIX}{key}:answer"


def claim_key(key: str) -> str:
    return f"{PREFIX}{key}:claim"


def waiters_key(key: str) -> str:
    return f"{PREFIX}{key}:waiters"


def plan_key(key: str) -> str:
    """What the leader's settling stores, and where (worker.cache.policy.Plan, as text)."""
    return f"{PREFIX}{key}:plan"


# Leads when nobody holds the claim (or we already do: a retried call is harmless); otherwise
# registers as a follower in the same step, so the leader cannot settle in between unseen.
# A Lua function, so the worker's entry script (claim, then join the window) can share it.
CLAIM_LUA = """
local function dedup_claim(answer_key, claim_key, waiters_key, delivery, inbox, ttl, waiters_ttl,
                           read)
  if read then
    local answer = redis.call('GET', answer_key)
    if answer then return 'answer', answer end
  end
  local holder = redis.call('GET', claim_key)
  if (not holder) or holder == delivery then
    redis.call('SET', claim_key, delivery, 'PX', ttl)
    return 'leader', ''
  end
  redis.call('SADD', waiters_key, delivery .. '|' .. inbox)
  redis.call('PEXPIRE', waiters_key, waiters_ttl)
  return 'follower', holder
end
"""

# KEYS: answer, claim, waiters. ARGV: delivery, inbox, claim ttl ms, waiters ttl ms.
_CLAIM = (
    CLAIM_LUA
    + """
local role, payload = dedup_claim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                                  true)
return {role, payload}
"""
)

# KEYS: claim, waiters. ARGV: delivery, claim ttl ms, waiters ttl ms. Extends the claim only
# while we still hold it, and the waiters set with it.
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    role: Literal["leader", "follower", "answer"]
    answer: Answer | None = None


@dataclass(frozen=True)
class Outcome:
    """What a settled request resolves to: an answer, or why there is none."""

    answer: Answer | None = None
    error: str | None = None
    kind: str = "RequestFailed"
    # Set when the settle script also stored the answer as the leading task's Celery result
    # (worker.shared.results); never part of the stored outcome itself.
    result_stored: bool = dataclasses.field(default=False, compare=False)

    def with_result_stored(self) -> Outcome:
        return dataclasses.replace(self, result_stored=True)

    @classmethod
    def failed(cls, exc: BaseException) -> Outcome:
        """Why ``exc`` left a request without an answer: its upstream kind, else RequestFailed."""
        kind = type(exc).__name__ if isinstance(exc, UpstreamError) else "RequestFailed"
        return cls(error=str(exc) or type(exc).__name__, kind=kind)

    def dump(self) -> str:
        if self.answer is not None:
            return f"{ANSWER_PREFIX}{json.dumps(self.answer.model_dump())}}}"
        return json.dumps({"error": self.error, "kind": self.kind})

    @classmethod
    def load(cls, payload: bytes | str) -> Outcome:
        data = json.loads(payload)
        if "answer" in data:
            return cls(answer=Answer.model_validate(data["answer"]))
        return cls(error=str(data.get("error")), kind=str(data.get("kind", "RequestFailed")))


class Dedup:
    """The claim side of dedup; every call is one script round trip."""

    def __init__(self, client: redis.Redis, *, claim_ttl_s: float = 15.0) -> None:
        self.claim_ttl_ms = int(claim_ttl_s * 1000)
        self.waiters_ttl_ms = self.claim_ttl_ms * 4
        self._claim = client.register_script(_CLAIM)
        self._refresh = client.register_script(_REFRESH)

    def claim(self, key: str, delivery: str, inbox: str) -> Claim:
        role, payload = self._claim(
            keys=[answer_key(key), claim_key(key), waiters_key(key)],
            args=[delivery, inbox, self.claim_ttl_ms, self.waiters_ttl_ms],
        )
        role = role.decode() if isinstance(role, bytes) else str(role)
        if role == "answer":
            return Claim("answer", Outcome.load(payload).answer)
        return Claim("leader" if role == "leader" else "follower")

    def refresh(self, key: str, delivery: str) -> bool:
        return bool(
            self._refresh(
                keys=[claim_key(key), waiters_key(key)],
                args=[delivery, self.claim_ttl_ms, self.waiters_ttl_ms],
            )
        )
