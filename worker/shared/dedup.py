"""Dedup on identical keys across every worker, with Redis atomics.

Per key there is at most one *leader* (the request that asks upstream) at a time; the
others are *followers* that wait for its answer. Records, all under ``coalesce:dd:<key>:``:

- ``claim``   the leader's task id, with a short TTL the leader keeps refreshing; if the
              leader's process dies the claim lapses and a follower takes over.
- ``answer``  the finished answer, kept ``dedup_ttl_s`` so a repeat moments later, or a
              redelivered copy of the same task, gets the same text.
- ``waiters`` task ids of followers; the leader pushes the outcome to each one's inbox.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

import redis

from producer import Answer

PREFIX = "coalesce:dd:"
INBOX = "coalesce:inbox:"

# KEYS: answer, claim. ARGV: task id, claim ttl ms. Returns {role, payload}.
_CLAIM = """
local answer = redis.call('GET', KEYS[1])
if answer then return {'answer', answer} end
local holder = redis.call('GET', KEYS[2])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'leader', ''}
end
return {'follower', holder}
"""

# KEYS: claim, waiters, answer. ARGV: task id, outcome json, answer ttl ms (0: don't keep),
# inbox prefix, inbox ttl ms. Releases the claim and hands the outcome to every waiter.
_SETTLE = """
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
local waiters = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
for _, id in ipairs(waiters) do
  redis.call('RPUSH', ARGV[4] .. id, ARGV[2])
  redis.call('PEXPIRE', ARGV[4] .. id, ARGV[5])
end
return #waiters
"""

# KEYS: claim, waiters. ARGV: task id, claim ttl ms, waiters ttl ms. Extends the claim only
# while we still hold it, and the waiters set with it, so a long-running leader's followers
# are still registered when it settles.
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
    """What a follower learns: the leader's answer, or why it failed."""

    answer: Answer | None = None
    error: str | None = None


class Dedup:
    def __init__(
        self, client: redis.Redis, *, answer_ttl_s: float, claim_ttl_s: float = 15.0
    ) -> None:
        self._redis = client
        self.answer_ttl_ms = int(answer_ttl_s * 1000)
        self.claim_ttl_ms = int(claim_ttl_s * 1000)
        self.waiters_ttl_ms = self.claim_ttl_ms * 4
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)
        self._refresh = client.register_script(_REFRESH)

    @staticmethod
    def _keys(key: str) -> tuple[str, str, str]:
        return PREFIX + key + ":answer", PREFIX + key + ":claim", PREFIX + key + ":waiters"

    def claim(self, key: str, task_id: str) -> Claim:
        answer_key, claim_key, _ = self._keys(key)
        role, payload = self._claim(keys=[answer_key, claim_key], args=[task_id, self.claim_ttl_ms])
        role = role.decode() if isinstance(role, bytes) else role
        if role == "answer":
            return Claim("answer", _outcome(payload).answer)
        return Claim("leader" if role == "leader" else "follower")

    def refresh(self, key: str, task_id: str) -> bool:
        _, claim_key, waiters_key = self._keys(key)
        return bool(
            self._refresh(
                keys=[claim_key, waiters_key],
                args=[task_id, self.claim_ttl_ms, self.waiters_ttl_ms],
            )
        )

    def publish(self, key: str, task_id: str, answer: Answer) -> None:
        """Store the answer for repeats, release the claim and wake every follower."""
        self._settle_with(key, task_id, {"answer": answer.model_dump()}, self.answer_ttl_ms)

    def fail(self, key: str, task_id: str, error: str) -> None:
        """Release the claim and pass the failure on; a failure is never kept for repeats."""
        self._settle_with(key, task_id, {"error": error}, 0)

    def _settle_with(self, key: str, task_id: str, outcome: dict[str, object], ttl_ms: int) -> None:
        answer_key, claim_key, waiters_key = self._keys(key)
        self._settle(
            keys=[claim_key, waiters_key, answer_key],
            args=[task_id, json.dumps(outcome), ttl_ms, INBOX, 60_000],
        )

    def wait(self, key: str, task_id: str, deadline: float) -> Outcome | None:
        """Wait as a follower; None means the leader vanished and the caller should re-claim."""
        answer_key, claim_key, waiters_key = self._keys(key)
        inbox = INBOX + task_id
        self._redis.sadd(waiters_key, task_id)
        self._redis.pexpire(waiters_key, self.waiters_ttl_ms)
        stored = self._redis.get(answer_key)  # the leader may have settled before we registered
        if stored is not None:
            return _outcome(stored)
        while (remaining := deadline - time.monotonic()) > 0:
            popped = self._redis.blpop([inbox], timeout=min(remaining, 2.0))
            if popped is not None:
                return _outcome(popped[1])
            if not self._redis.exists(claim_key):
                stored = self._redis.get(answer_key)
                return None if stored is None else _outcome(stored)
        return Outcome(error="timed out waiting for an identical request in flight")


def _outcome(payload: bytes | str) -> Outcome:
    data = json.loads(payload)
    if "answer" in data:
        return Outcome(answer=Answer.model_validate(data["answer"]))
    return Outcome(error=str(data["error"]))
