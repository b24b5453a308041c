"""Settling budgets on the worker: a request's reservation becomes what it was billed.

The producer reserved an estimate against every budget rule the request matched
(``producer/_budget.py``, which also states the overshoot bound). Once the request's ledger
row is written, :func:`settle_budget` (or :meth:`BudgetKeeper.hook`) runs one script that
takes the reservation out of ``reserved``, adds the billed cost to ``spent`` (0 for a cache
or dedup hit), updates the scope's running average (the next estimate), and reports the
soft limits crossed for the first time this period. Each one is logged as a warning (scope,
period and amounts; never prompt text) and POSTed to ``COALESCE_BUDGET_WEBHOOK`` from a
daemon thread, off the request's path.

The rules come with the reservation, so a worker settles correctly even without
``COALESCE_BUDGETS`` of its own; its own rules are used only when there is no reservation (it
ran out, or the producer had no rules). Spend counts in the period the request was accepted
in. A worker whose settings hold no rules settles only while a producer has reserved in the
last ten minutes (the ``coalesce:budget:on`` marker, checked at most every few seconds), so
nothing is spent on budgets when nobody uses them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import redis

from producer import Request, Settings, get_settings
from producer._budget import (
    ACTIVE,
    AVG_TTL_MS,
    AVG_WINDOW,
    DUE,
    KEEP_MS,
    NANO,
    PERIOD_GRACE_S,
    RESERVATIONS,
    SWEEP_LUA,
    Rule,
    parse_rules,
    period_span,
    resets_text,
    to_nano,
    usd_text,
)

log = logging.getLogger("coalesce.budgets")

WEBHOOK_TIMEOUT_S = 5.0
ACTIVE_CHECK_S = 5.0

Clock = Callable[[], float]
Post = Callable[[str, dict[str, object]], None]

# KEYS: reservations hash, due set, then (period key, average key) per fallback rule.
# ARGV: task id, now ms, keep ms, billed nano (-1: unpriced), average window, average ttl ms,
#       then per fallback rule (soft or -1, counter expiry at ms, label, hard or -1).
# Returns the soft limits crossed now, flat: label, spent, soft, hard, ...
_SETTLE_LUA = (
    SWEEP_LUA
    + """
local now = tonumber(ARGV[2])
local billed = tonumber(ARGV[4])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local holds, held = {}, false
if raw then
  local rec = cjson.decode(raw)
  holds, held = rec.r, rec.x == 0
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  for i = 1, (#KEYS - 2) / 2 do
    local a = 7 + 4 * (i - 1)
    holds[i] = {KEYS[1 + 2 * i], KEYS[2 + 2 * i], 0, tonumber(ARGV[a]), tonumber(ARGV[a + 1]),
                ARGV[a + 2], tonumber(ARGV[a + 3])}
  end
end
local crossed, averaged = {}, {}
for _, r in ipairs(holds) do
  local key = r[1]
  if held then unreserve(key, r[3]) end
  if billed >= 0 then
    local spent = redis.call('HINCRBY', key, 'spent', int(billed))
    redis.call('HINCRBY', key, 'requests', 1)
    if r[4] >= 0 and spent >= r[4] and redis.call('HSETNX', key, 'soft', 1) == 1 then
      table.insert(crossed, r[6]); table.insert(crossed, int(spent))
      table.insert(crossed, int(r[4])); table.insert(crossed, int(r[7]))
    end
    if not averaged[r[2]] then
      averaged[r[2]] = true
      local v = redis.call('HMGET', r[2], 'avg', 'n')
      local n = (tonumber(v[2]) or 0) + 1
      local avg = tonumber(v[1]) or billed
      avg = avg + (billed - avg) / math.min(n, tonumber(ARGV[5]))
      redis.call('HSET', r[2], 'avg', string.format('%.3f', avg), 'n', n)
      redis.call('PEXPIRE', r[2], ARGV[6])
    end
  else
    redis.call('HINCRBY', key, 'unpriced', 1)
  end
  if redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, math.max(r[5] - now, 60000))
  end
end
sweep(KEYS[1], KEYS[2], now, tonumber(ARGV[3]))
return crossed
"""
)


@dataclass(frozen=True)
class Crossing:
    """A soft limit reached for the first time in its period."""

    rule: str  # label: "tenant:acme/day"
    spent_usd: float
    soft_usd: float
    hard_usd: float | None

    @property
    def scope(self) -> str:
        return self.rule.rpartition("/")[0]

    @property
    def period(self) -> str:
        return self.rule.rpartition("/")[2]

    def message(self, now: float) -> str:
        scope, period = self.scope, self.period
        who = "all tenants together" if scope == "global" else scope.replace(":", " ", 1)
        adjective = "daily" if period == "day" else "monthly"
        _, _, end = period_span(period, now)
        return (
            f"budget soft limit crossed: {who} spent {usd_text(to_nano(self.spent_usd))} of "
            f"{'the global' if scope == 'global' else 'its'} "
            f"{usd_text(to_nano(self.soft_usd))} {adjective} soft limit; "
            f"{resets_text(period, end)}"
        )

    def payload(self, now: float) -> dict[str, object]:
        """The webhook's JSON body."""
        tag, start, end = period_span(self.period, now)
        return {
            "event": "budget.soft_limit_crossed",
            "scope": self.scope,
            "period": self.period,
            "period_key": tag,
            "period_start": _iso(start),
            "resets_at": _iso(end),
            "spent_usd": self.spent_usd,
            "soft_usd": self.soft_usd,
            "hard_usd": self.hard_usd,
            "message": self.message(now),
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def post_json(url: str, body: dict[str, object]) -> None:
    """POST ``body``; failures are logged (the warning was logged already)."""
    try:
        reply = httpx.post(url, json=body, timeout=WEBHOOK_TIMEOUT_S)
        reply.raise_for_status()
    except httpx.HTTPError as exc:
        log.warning("budget webhook failed: %s", type(exc).__name__)


class BudgetKeeper:
    """One per worker process: settles requests, warns and calls the webhook on soft limits."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        rules: tuple[Rule, ...] = (),
        webhook: str | None = None,
        clock: Clock = time.time,
        post: Post = post_json,
    ) -> None:
        self.client = client
        self.rules = rules
        self.webhook = webhook
        self.clock = clock
        self.post = post
        self._settle = client.register_script(_SETTLE_LUA)
        self._checked_at = -ACTIVE_CHECK_S
        self._active = False
        self._unpriced_warned: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> BudgetKeeper:
        return cls(client, rules=parse_rules(settings.budgets), webhook=settings.budget_webhook)

    def active(self) -> bool:
        """Whether settling can matter: own rules, or a producer reserved lately."""
        if self.rules:
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at < ACTIVE_CHECK_S:
                return self._active
            self._checked_at = now
        found = bool(self.client.exists(ACTIVE))
        self._active = found
        return found

    def settle(
        self,
        task_id: str,
        tenant: str | None,
        tags: Mapping[str, str] | None,
        billed_usd: float | None,
        model: str,
    ) -> list[Crossing]:
        """Move the request's reservation to ``spent`` (``billed_usd`` None: unpriced, counted
        apart); the soft limits crossed for the first time this period (already reported)."""
        if not self.active():
            return []
        now = self.clock()
        keys: list[str] = [RESERVATIONS, DUE]
        billed = -1 if billed_usd is None else max(0, to_nano(billed_usd))
        args: list[str | int] = [task_id, int(now * 1000), KEEP_MS, billed, AVG_WINDOW, AVG_TTL_MS]
        for rule in self.rules:
            if rule.matches(tenant, tags or {}):
                _, _, end = rule.span(now)
                keys += [rule.key(now), rule.avg_key()]
                args += [
                    _nano(rule.soft_usd),
                    int((end + PERIOD_GRACE_S) * 1000),
                    rule.label,
                    _nano(rule.hard_usd),
                ]
        reply = self._settle(keys=keys, args=args)
        if billed_usd is None and model not in self._unpriced_warned:
            self._unpriced_warned.add(model)
            log.warning("budgets: model %s has no price; its requests add $0 to spend", model)
        crossings = [
            Crossing(
                _text(reply[i]),
                int(reply[i + 1]) / NANO,
                int(reply[i + 2]) / NANO,
                None if int(reply[i + 3]) < 0 else int(reply[i + 3]) / NANO,
            )
            for i in range(0, len(reply), 4)
        ]
        for crossing in crossings:
            self._report(crossing, now)
        return crossings

    def hook(self, task_id: str, request: Request, billed_usd: float | None) -> None:
        """``Books``' budget hook: settle one answered request."""
        self.settle(task_id, request.tenant, request.tags, billed_usd, request.model)

    def _report(self, crossing: Crossing, now: float) -> None:
        log.warning("%s", crossing.message(now))
        if self.webhook:
            body = crossing.payload(now)
            url = self.webhook
            threading.Thread(
                target=self.post, args=(url, body), name="coalesce-budget-webhook", daemon=True
            ).start()


_keepers: dict[int, BudgetKeeper] = {}
_keepers_lock = threading.Lock()


def settle_budget(
    client: redis.Redis,
    task_id: str,
    tenant: str | None,
    tags: Mapping[str, str] | None,
    billed_usd: float | None,
    model: str,
    *,
    settings: Settings | None = None,
) -> list[Crossing]:
    """Settle one request's budgets with this process' keeper for ``client`` (see the module
    docstring). Call it once per request after its answer: hits with ``billed_usd=0``,
    unpriced models with None."""
    with _keepers_lock:
        keeper = _keepers.get(id(client))
        if keeper is None or keeper.client is not client:
            keeper = BudgetKeeper.from_settings(settings or get_settings(), client)
            _keepers[id(client)] = keeper
    return keeper.settle(task_id, tenant, tags, billed_usd, model)


def _nano(usd: float | None) -> int:
    return -1 if usd is None else to_nano(usd)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
