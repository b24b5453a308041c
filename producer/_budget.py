"""Spend budgets: rules from ``COALESCE_BUDGETS``, and reserving spend when a request is accepted.

A rule is ``{"scope": "global" | "tenant:<name>" | "tag:<key>=<value>", "period": "day" |
"month", "soft_usd": float | null, "hard_usd": float | null}``. Periods are UTC calendar days
and months, and every counter's key carries its period (``coalesce:budget:<scope id>:2025-06-01``
or ``...:2025-06``) and expires a little after it, so budgets reset on the boundary by
construction: no job has to reset them.

Accepting a request (:meth:`Budgets.reserve`, one Lua script for all the rules it matches):
if ``spent + reserved + estimate`` would pass the hard limit of ANY of them, it raises
:class:`BudgetExceeded` and reserves nothing; otherwise it adds ``estimate`` to each rule's
``reserved``. The estimate is the scope's running average billed cost per request (kept by
the workers when they settle, cache hits at 0), or ``DEFAULT_ESTIMATE_USD`` before any data,
so the producer needs no prices. The worker settles the request (``worker/ledger/budgets.py``):
the reservation leaves ``reserved`` and the billed cost enters ``spent``.

Overshoot bound. A request is admitted only while ``spent + reserved + estimate <= hard``, so
a rule's final spend can pass its hard limit by at most the sum, over the requests accepted
but not yet settled at that moment, of ``actual cost - estimate`` (for N concurrent
requests, about N x (actual - estimate); nothing when costs match their scope's average).
Two more terms, both bounded: a reservation held longer than ``hold_s`` (a long queue) is
released and its request then adds its whole cost when it settles; and a model without a
price adds nothing to ``spent`` (the worker counts it as ``unpriced`` and warns).

Redis layout (``coalesce:budget:``): ``<scope id>:<period>`` hash (``spent``, ``reserved`` in
integer nano-dollars, ``requests``, ``unpriced``, ``soft`` once the soft limit fired);
``avg:<scope id>`` hash (``avg`` nano-dollars, ``n``); ``res`` hash task id -> reservation JSON
and ``res:due`` sorted set (when each reservation is released if never settled: every script
sweeps a few due ones, so an abandoned request cannot hold spend forever); ``on``, a marker
telling workers that budgets are in use.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from ._exceptions import BudgetExceeded, ConfigError
from ._models import Request
from ._settings import Settings

PREFIX = "coalesce:budget:"
RESERVATIONS = PREFIX + "res"  # hash: task id -> reservation JSON
DUE = PREFIX + "res:due"  # sorted set: task id -> ms when it is released (or forgotten)
ACTIVE = PREFIX + "on"  # set while producers reserve: workers settle only then
ACTIVE_MS = 600_000
NANO = 1_000_000_000
DEFAULT_ESTIMATE_USD = 0.001  # a request's estimate before its scope has any settled cost
AVG_WINDOW = 100  # the running average weighs about the last 100 requests
AVG_TTL_MS = 62 * 86_400_000  # a scope's average outlives a monthly period
KEEP_MS = 86_400_000  # a released reservation's record stays a day, for a late settle
PERIOD_GRACE_S = 2 * 86_400  # counters outlive their period (late settles, reading them)
HOLD_MARGIN_S = 60.0
ENV = "COALESCE_BUDGETS"
PERIODS = ("day", "month")
_FIELDS = {"scope", "period", "soft_usd", "hard_usd"}
_TAG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
_MAX_NAME = 200

Clock = Callable[[], float]


@dataclass(frozen=True)
class Rule:
    """One budget rule; money in USD (None: no such limit)."""

    scope: str
    period: str
    soft_usd: float | None = None
    hard_usd: float | None = None

    @property
    def scope_id(self) -> str:
        """The scope as it appears in keys: a hash, so names never reach key patterns."""
        return hashlib.sha256(self.scope.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """``tenant:acme/day``: names the rule in records, logs and the webhook."""
        return f"{self.scope}/{self.period}"

    def matches(self, tenant: str | None, tags: Mapping[str, str]) -> bool:
        kind, _, target = self.scope.partition(":")
        if kind == "global":
            return True
        if kind == "tenant":
            return tenant == target
        key, _, value = target.partition("=")
        return tags.get(key) == value

    def who(self) -> str:
        """How messages name the scope: ``tenant acme``, ``tag feature=x``, ``global``."""
        kind, _, target = self.scope.partition(":")
        return "global" if kind == "global" else f"{kind} {target}"

    def span(self, now: float) -> tuple[str, float, float]:
        """This rule's period at ``now``: its key suffix, start and end (epoch seconds)."""
        return period_span(self.period, now)

    def key(self, now: float) -> str:
        return f"{PREFIX}{self.scope_id}:{self.span(now)[0]}"

    def avg_key(self) -> str:
        return f"{PREFIX}avg:{self.scope_id}"


@dataclass(frozen=True)
class Hold:
    """What one reservation holds against one rule."""

    rule: str  # the rule's label
    estimate_usd: float


@dataclass(frozen=True)
class Reservation:
    task_id: str
    holds: tuple[Hold, ...]


# --- rules ---------------------------------------------------------------------------------


def parse_rules(text: str) -> tuple[Rule, ...]:
    """Rules from ``COALESCE_BUDGETS`` (JSON, or ``@path`` to a JSON file); ConfigError naming
    the variable and the rule's index when one is wrong."""
    text = text.strip()
    if not text:
        return ()
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{ENV}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{ENV}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ConfigError(f'{ENV}: must be a JSON list of rules like {{"scope": "global", ...}}')
    rules: list[Rule] = []
    seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(data):
        try:
            rule = _rule(item)
        except ValueError as exc:
            raise ConfigError(f"{ENV}: rule {index}: {exc}") from None
        first = seen.setdefault((rule.scope, rule.period), index)
        if first != index:
            raise ConfigError(
                f"{ENV}: rule {index}: repeats rule {first} ({rule.scope}, {rule.period}); "
                "put soft_usd and hard_usd in one rule"
            )
        rules.append(rule)
    return tuple(rules)


def _rule(item: object) -> Rule:
    if not isinstance(item, dict):
        raise ValueError("must be an object with scope, period, soft_usd and hard_usd")
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(_FIELDS))})")
    scope = _scope(item.get("scope"))
    period = item.get("period")
    if period not in PERIODS:
        raise ValueError("period must be 'day' or 'month'")
    soft, hard = _usd(item, "soft_usd"), _usd(item, "hard_usd")
    if soft is None and hard is None:
        raise ValueError("set soft_usd, hard_usd or both")
    if soft is not None and soft <= 0:
        raise ValueError("soft_usd must be greater than 0")
    if soft is not None and hard is not None and soft > hard:
        raise ValueError("soft_usd must not exceed hard_usd")
    return Rule(scope, str(period), soft, hard)


def _scope(scope: object) -> str:
    if not isinstance(scope, str):
        raise ValueError("scope must be 'global', 'tenant:<name>' or 'tag:<key>=<value>'")
    kind, colon, target = scope.partition(":")
    if scope == "global":
        return scope
    if kind == "tenant" and colon and 0 < len(target) <= _MAX_NAME:
        return scope
    key, eq, value = target.partition("=")
    if kind == "tag" and eq and _TAG_KEY.fullmatch(key) and 0 < len(value) <= 64:
        return scope
    raise ValueError(
        f"scope {scope[:80]!r} is not 'global', 'tenant:<name>' or 'tag:<key>=<value>'"
    )


def _usd(item: Mapping[str, Any], name: str) -> float | None:
    value = item.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number of USD or null")
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return float(value)


# --- periods and money ---------------------------------------------------------------------


def period_span(period: str, now: float) -> tuple[str, float, float]:
    """The UTC day or month holding ``now``: (``2025-06-01`` or ``2025-06``, start, end)."""
    moment = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        tag = start.strftime("%Y-%m-%d")
        end = start.timestamp() + 86_400
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        tag = start.strftime("%Y-%m")
        following = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        end = following.timestamp()
    return tag, start.timestamp(), end


def to_nano(usd: float) -> int:
    return round(usd * NANO)


def usd_text(nano: float) -> str:
    """``$10.02``; under a dollar four decimals (``$0.0012``), and tiny amounts all they need
    (``$0.000015``)."""
    usd = nano / NANO
    if usd >= 1 or usd == 0:
        return f"${usd:,.2f}"
    if usd >= 0.0001:
        return f"${usd:.4f}"
    return f"${usd:.9f}".rstrip("0")


def resets_text(period: str, end: float) -> str:
    if period == "day":
        return "resets at 00:00 UTC"
    return f"resets at 00:00 UTC on {datetime.fromtimestamp(end, UTC):%Y-%m-%d}"


def refusal(rule: Rule, spent: int, reserved: int, estimate: int, now: float) -> BudgetExceeded:
    """The error for a request ``rule`` refused, naming the scope, the period and the reset."""
    assert rule.hard_usd is not None
    hard = to_nano(rule.hard_usd)
    _, _, end = rule.span(now)
    adjective = "daily" if rule.period == "day" else "monthly"
    held = f" (+ {usd_text(reserved)} held by requests in flight)" if reserved else ""
    limit = f"{usd_text(hard)} {adjective} hard limit"
    if rule.scope == "global":
        text = f"all tenants together spent {usd_text(spent)}{held} of the global {limit}"
    else:
        text = f"{rule.who()} spent {usd_text(spent)}{held} of its {limit}"
    if spent + reserved <= hard:
        text += f"; this request (about {usd_text(estimate)}) would pass it"
    message = f"budget exceeded: {text}; {resets_text(rule.period, end)}"
    return BudgetExceeded(message, rule.scope, rule.period, end)


# --- Redis scripts -------------------------------------------------------------------------

# Shared by every budget script: release reservations whose hold ran out (a request never
# settled: lost, failed, or still queued), a few per call, and forget released ones a day on.
SWEEP_LUA = """
local function int(x) return string.format('%d', x) end
local function unreserve(key, est)
  if redis.call('EXISTS', key) == 1 then
    if redis.call('HINCRBY', key, 'reserved', int(-est)) < 0 then
      redis.call('HSET', key, 'reserved', 0)
    end
  end
end
local function sweep(hkey, zkey, now, keep)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, 16)) do
    local raw = redis.call('HGET', hkey, id)
    if raw then
      local rec = cjson.decode(raw)
      if rec.x == 0 then
        for _, r in ipairs(rec.r) do unreserve(r[1], r[3]) end
        rec.x = 1
        redis.call('HSET', hkey, id, cjson.encode(rec))
        redis.call('ZADD', zkey, now + keep, id)
      else
        redis.call('HDEL', hkey, id)
        redis.call('ZREM', zkey, id)
      end
    else
      redis.call('ZREM', zkey, id)
    end
  end
end
"""

# KEYS: reservations hash, due set, active marker, then (period key, average key) per rule.
# ARGV: task id, now ms, hold ms, keep ms, default estimate, active ms, then per rule
#       (hard or -1, soft or -1, period key ttl ms, counter expiry at ms, label).
# Returns {1, estimates...} or {0, refusing rule (1-based), spent, reserved, estimate}.
_RESERVE_LUA = (
    SWEEP_LUA
    + """
local now = tonumber(ARGV[2])
sweep(KEYS[1], KEYS[2], now, tonumber(ARGV[4]))
redis.call('SET', KEYS[3], 1, 'PX', ARGV[6])
local n = (#KEYS - 3) / 2
local est = {}
for i = 1, n do
  local pkey, akey = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local a = 7 + 5 * (i - 1)
  local avg = tonumber(redis.call('HGET', akey, 'avg') or '')
  est[i] = avg and math.floor(avg + 0.5) or tonumber(ARGV[5])
  local hard = tonumber(ARGV[a])
  if hard >= 0 then
    local v = redis.call('HMGET', pkey, 'spent', 'reserved')
    local spent, reserved = tonumber(v[1]) or 0, tonumber(v[2]) or 0
    if spent + reserved + est[i] > hard then
      return {0, i, int(spent), int(reserved), int(est[i])}
    end
  end
end
local holds = {}
for i = 1, n do
  local pkey, akey = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local a = 7 + 5 * (i - 1)
  redis.call('HINCRBY', pkey, 'reserved', int(est[i]))
  redis.call('PEXPIRE', pkey, ARGV[a + 2])
  holds[i] = {pkey, akey, est[i], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3]), ARGV[a + 4],
              tonumber(ARGV[a])}
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({r = holds, x = 0}))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
local out = {1}
for i = 1, n do out[i + 1] = int(est[i]) end
return out
"""
)

# KEYS: reservations hash, due set. ARGV: now ms, keep ms, task ids...
_RELEASE_LUA = (
    SWEEP_LUA
    + """
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local rec = cjson.decode(raw)
    if rec.x == 0 then
      for _, r in ipairs(rec.r) do unreserve(r[1], r[3]) end
    end
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
sweep(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]))
return 0
"""
)


@dataclass(frozen=True)
class Usage:
    """A rule's counters in one period (USD)."""

    rule: Rule
    period: str
    spent_usd: float
    reserved_usd: float
    requests: int
    unpriced: int
    soft_fired: bool


class Budgets:
    """The producer's side: reserve spend when a request is accepted, release it if not sent.

    One script call per request (a submission's requests go in one pipeline). Build it only
    when rules exist (:meth:`from_settings` returns None otherwise): no Redis cost without
    budgets.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        client: redis.Redis,
        *,
        hold_s: float = 240.0,
        clock: Clock = time.time,
    ) -> None:
        self.rules = tuple(rules)
        self.client = client
        self.hold_s = hold_s
        self.clock = clock
        self._by_label = {rule.label: rule for rule in self.rules}
        self._reserve = client.register_script(_RESERVE_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    @classmethod
    def from_settings(
        cls, settings: Settings, client: redis.Redis, *, clock: Clock = time.time
    ) -> Budgets | None:
        """None when ``COALESCE_BUDGETS`` holds no rules; ConfigError if it is invalid.

        A reservation is held as long as a request can take to be answered: the visibility
        timeout (a lost delivery comes back) plus the request timeout, plus a margin.
        """
        rules = parse_rules(settings.budgets)
        if not rules:
            return None
        hold = settings.visibility_timeout_s + settings.request_timeout_s + HOLD_MARGIN_S
        return cls(rules, client, hold_s=hold, clock=clock)

    def matching(self, tenant: str | None, tags: Mapping[str, str] | None) -> list[Rule]:
        return [rule for rule in self.rules if rule.matches(tenant, tags or {})]

    def reserve(
        self, task_id: str, tenant: str | None, tags: Mapping[str, str] | None = None
    ) -> Reservation | None:
        """Hold spend for one request; BudgetExceeded (nothing held) if a hard limit refuses.

        None when no rule matches the request (no Redis call).
        """
        return self.reserve_many([(task_id, tenant, tags)])[0]

    def reserve_many(
        self, items: Sequence[tuple[str, str | None, Mapping[str, str] | None]]
    ) -> list[Reservation | None]:
        """All of a submission's requests or none: one refused releases the others' holds."""
        now = self.clock()
        pipe = self.client.pipeline(transaction=False)
        asked: list[tuple[int, str, list[Rule]]] = []
        for index, (task_id, tenant, tags) in enumerate(items):
            rules = self.matching(tenant, tags)
            if rules:
                keys, args = self._reserve_args(task_id, rules, now)
                self._reserve(keys=keys, args=args, client=pipe)
                asked.append((index, task_id, rules))
        found: list[Reservation | None] = [None] * len(items)
        if not asked:
            return found
        replies = pipe.execute()
        refused: BudgetExceeded | None = None
        for (index, task_id, rules), reply in zip(asked, replies, strict=True):
            if int(reply[0]) == 1:
                holds = tuple(
                    Hold(rule.label, int(est) / NANO)
                    for rule, est in zip(rules, reply[1:], strict=True)
                )
                found[index] = Reservation(task_id, holds)
            elif refused is None:
                rule = rules[int(reply[1]) - 1]
                refused = refusal(rule, int(reply[2]), int(reply[3]), int(reply[4]), now)
        if refused is not None:
            self.release([r.task_id for r in found if r is not None])
            raise refused
        return found

    def reserve_requests(self, items: Sequence[tuple[str, Request]]) -> list[Reservation | None]:
        """:meth:`reserve_many` for ``(task id, request)`` pairs (``Core.send``)."""
        return self.reserve_many(
            [(task_id, request.tenant, request.tags) for task_id, request in items]
        )

    def _reserve_args(
        self, task_id: str, rules: Sequence[Rule], now: float
    ) -> tuple[list[str], list[str | int | float]]:
        keys = [RESERVATIONS, DUE, ACTIVE]
        args: list[str | int | float] = [
            task_id,
            int(now * 1000),
            int(self.hold_s * 1000),
            KEEP_MS,
            to_nano(DEFAULT_ESTIMATE_USD),
            ACTIVE_MS,
        ]
        for rule in rules:
            _, _, end = rule.span(now)
            keys += [rule.key(now), rule.avg_key()]
            until_ms = int((end + PERIOD_GRACE_S) * 1000)
            args += [
                _nano_or_none(rule.hard_usd),
                _nano_or_none(rule.soft_usd),
                max(1000, until_ms - int(now * 1000)),
                until_ms,
                rule.label,
            ]
        return keys, args

    def release(self, task_ids: Sequence[str]) -> None:
        """Give back the holds of requests that were not enqueued after all."""
        if task_ids:
            args: list[str | int] = [int(self.clock() * 1000), KEEP_MS, *task_ids]
            self._release(keys=[RESERVATIONS, DUE], args=args)

    def release_quietly(
        self, task_ids: Sequence[str], attempt: Callable[[Callable[[], None]], None] | None = None
    ) -> None:
        """Best effort (Redis may be the reason they were not sent): an unreleased hold runs
        out after ``hold_s`` anyway."""
        with suppress(redis.RedisError, OSError, RuntimeError):
            if attempt is None:
                self.release(task_ids)
            else:
                attempt(lambda: self.release(task_ids))

    def usage(self, rule: Rule, now: float | None = None) -> Usage:
        """``rule``'s counters in the period holding ``now`` (default: the clock's now)."""
        now = self.clock() if now is None else now
        raw = self.client.hmget(rule.key(now), "spent", "reserved", "requests", "unpriced", "soft")
        spent, reserved, requests, unpriced = (int(v or 0) for v in raw[:4])
        return Usage(
            rule, rule.span(now)[0], spent / NANO, reserved / NANO, requests, unpriced, bool(raw[4])
        )


def _nano_or_none(usd: float | None) -> int:
    return -1 if usd is None else to_nano(usd)
