"""The durable ledger in Redis, shared by every worker: raw rows plus hourly and daily rollups.

Layout (all keys under ``coalesce:ledger:``):

- ``raw:calls`` and ``raw:requests``: streams of JSON rows (``r`` field), trimmed on every
  write to ``raw_ttl_s`` (``XADD MINID ~``). They keep each call's timestamp and tokens, so
  the ledger can be priced again, and answer queries that filter on two dimensions at once
  (a row is found when it was written less than an hour after its timestamp).
- ``h:<hour start>:<dim>`` and ``d:<day start>:<dim>``: hashes of integer counters, kept
  ``rollup_ttl_s`` (hourly) and ``daily_ttl_s`` (daily, longer). ``dim`` is ``all``,
  ``tenant``, ``model``, ``source`` or ``tag:<name>``; a field is ``<value>|<metric>``. Calls
  roll up under ``all``, ``tenant`` and ``model`` (a call has no source or tags).

Money is in integer nano-dollars throughout (see ``records``), so sums are exact. A rollup
bucket counts towards a time range when it overlaps it: range queries have the resolution of
an hour (a day for ranges older than the hourly rollups).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from .records import CallRecord, RequestRecord, bounded_tags, to_nano, to_usd

PREFIX = "coalesce:ledger:"
RAW_CALLS = PREFIX + "raw:calls"
RAW_REQUESTS = PREFIX + "raw:requests"
HOUR = 3600
DAY = 86400
DEFAULT_RAW_TTL_S = 7 * DAY
DEFAULT_ROLLUP_TTL_S = 90 * DAY
DEFAULT_DAILY_TTL_S = 400 * DAY
# Raw stream ids come from Redis' clock when a row is written; a row's ``ts`` is its call's
# start, so a read looks this far outside [since, until) in ids (clock skew, slow calls).
_RAW_EARLY_S = 300
_RAW_LATE_S = HOUR
_SCAN_CHUNK = 1000

DIMS = ("tenant", "model", "source")


@dataclass
class Totals:
    """Sums over a set of ledger rows; money fields are nano-dollars, with USD properties.

    ``billed``/``baseline``/``levers`` and the token counts add up the requests' shares
    (priced requests only for money); the ``upstream_*`` fields add up the calls themselves,
    as the provider bills them (0 in a breakdown by source or tag: calls carry neither).
    """

    requests: int = 0
    unpriced_requests: int = 0
    billed_nano: int = 0
    baseline_nano: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    levers_nano: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, int] = field(default_factory=dict)
    upstream_calls: int = 0
    unpriced_calls: int = 0
    upstream_errors: int = 0
    upstream_billed_nano: int = 0
    upstream_prompt_tokens: int = 0
    upstream_completion_tokens: int = 0
    upstream_cached_tokens: int = 0
    upstream_items: int = 0  # sum of batch sizes
    upstream_latency_ms: int = 0

    @property
    def billed_usd(self) -> float:
        return to_usd(self.billed_nano)

    @property
    def baseline_usd(self) -> float:
        return to_usd(self.baseline_nano)

    @property
    def saved_usd(self) -> float:
        return to_usd(self.baseline_nano - self.billed_nano)

    @property
    def saved_pct(self) -> float:
        """Share of the baseline saved, in percent (0 with no baseline)."""
        if self.baseline_nano <= 0:
            return 0.0
        return 100.0 * (self.baseline_nano - self.billed_nano) / self.baseline_nano

    @property
    def levers(self) -> dict[str, float]:
        return {name: to_usd(nano) for name, nano in sorted(self.levers_nano.items())}

    @property
    def upstream_billed_usd(self) -> float:
        return to_usd(self.upstream_billed_nano)

    def add(self, other: Totals) -> None:
        for name, value in vars(other).items():
            if isinstance(value, dict):
                mine: dict[str, int] = getattr(self, name)
                for key, count in value.items():
                    mine[key] = mine.get(key, 0) + count
            else:
                setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``coalesce report --json`` (USD rounded to the nano-dollar)."""
        calls = self.upstream_calls
        return {
            "billed_usd": self.billed_usd,
            "baseline_usd": self.baseline_usd,
            "saved_usd": self.saved_usd,
            "saved_pct": round(self.saved_pct, 2),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "upstream_calls": calls,
            "requests": self.requests,
            "unpriced_calls": self.unpriced_calls,
            "unpriced_requests": self.unpriced_requests,
            "levers": self.levers,
            "requests_by_source": dict(sorted(self.by_source.items())),
            "upstream": {
                "billed_usd": self.upstream_billed_usd,
                "prompt_tokens": self.upstream_prompt_tokens,
                "completion_tokens": self.upstream_completion_tokens,
                "cached_tokens": self.upstream_cached_tokens,
                "errors": self.upstream_errors,
                "mean_batch_size": round(self.upstream_items / calls, 2) if calls else 0.0,
                "mean_latency_s": round(self.upstream_latency_ms / calls / 1000, 3)
                if calls
                else 0.0,
            },
        }


# --- metrics: the counters one row adds -----------------------------------------------------

_REQUEST_METRICS = {
    "req": "requests",
    "unpriced_req": "unpriced_requests",
    "billed": "billed_nano",
    "base": "baseline_nano",
    "pt": "prompt_tokens",
    "ct": "completion_tokens",
    "cached": "cached_tokens",
}
_CALL_METRICS = {
    "calls": "upstream_calls",
    "unpriced_calls": "unpriced_calls",
    "errors": "upstream_errors",
    "c_billed": "upstream_billed_nano",
    "c_pt": "upstream_prompt_tokens",
    "c_ct": "upstream_completion_tokens",
    "c_cached": "upstream_cached_tokens",
    "c_items": "upstream_items",
    "c_lat_ms": "upstream_latency_ms",
}
_METRICS = {**_REQUEST_METRICS, **_CALL_METRICS}
_LEVER = "lv:"
_SOURCE = "src:"


def _request_counters(row: RequestRecord) -> dict[str, int]:
    counters = {
        "req": 1,
        "pt": row.prompt_tokens,
        "ct": row.completion_tokens,
        "cached": row.cached_tokens,
        _SOURCE + row.source: 1,
    }
    if row.billed_usd is None or row.baseline_usd is None:
        counters["unpriced_req"] = 1
        return counters
    counters["billed"] = to_nano(row.billed_usd)
    counters["base"] = to_nano(row.baseline_usd)
    for lever, usd in row.levers.items():
        counters[_LEVER + lever] = to_nano(usd)
    return counters


def _call_counters(row: CallRecord) -> dict[str, int]:
    counters = {
        "calls": 1,
        "c_pt": row.prompt_tokens,
        "c_ct": row.completion_tokens,
        "c_cached": row.cached_tokens,
        "c_items": row.batch_size,
        "c_lat_ms": round(row.latency_s * 1000),
    }
    if row.outcome != "ok":
        counters["errors"] = 1
    if row.cost_usd is None:
        counters["unpriced_calls"] = 1
    else:
        counters["c_billed"] = to_nano(row.cost_usd)
    return counters


def _request_dims(row: RequestRecord) -> list[tuple[str, str]]:
    dims = [("all", ""), ("tenant", row.tenant), ("model", row.model), ("source", row.source)]
    dims += [(f"tag:{name}", value) for name, value in bounded_tags(row.tags).items()]
    return dims


def _call_dims(row: CallRecord) -> list[tuple[str, str]]:
    return [("all", ""), ("tenant", row.tenant), ("model", row.model)]


def _apply(totals: Totals, metric: str, value: int) -> None:
    if metric.startswith(_LEVER):
        name = metric[len(_LEVER) :]
        totals.levers_nano[name] = totals.levers_nano.get(name, 0) + value
    elif metric.startswith(_SOURCE):
        name = metric[len(_SOURCE) :]
        totals.by_source[name] = totals.by_source.get(name, 0) + value
    elif metric in _METRICS:
        attr = _METRICS[metric]
        setattr(totals, attr, getattr(totals, attr) + value)


# One script call per ``record``: a pipeline of HINCRBYs cost ~20 us of client CPU each (a
# 16-request batch touches ~400 counters); one EVALSHA carries them all, the counters as one
# JSON argument (values as strings: Lua numbers would lose integers above 1e14).
# KEYS: raw calls stream, raw requests stream, then the rollup hashes.
# ARGV: min stream id, #calls, #requests, the rows, then [[ttl, [field, value, ...]], ...].
_RECORD_LUA = """
local min_id = ARGV[1]
local i = 4
for _ = 1, tonumber(ARGV[2]) do
  redis.call('XADD', KEYS[1], 'MINID', '~', min_id, '*', 'r', ARGV[i]); i = i + 1
end
for _ = 1, tonumber(ARGV[3]) do
  redis.call('XADD', KEYS[2], 'MINID', '~', min_id, '*', 'r', ARGV[i]); i = i + 1
end
local hashes = cjson.decode(ARGV[i])
for k = 3, #KEYS do
  local spec = hashes[k - 2]
  local fields = spec[2]
  for j = 1, #fields, 2 do
    redis.call('HINCRBY', KEYS[k], fields[j], fields[j + 1])
  end
  redis.call('EXPIRE', KEYS[k], spec[1])
end
return 0
"""


def _bucket(ts: float, size: int) -> int:
    return int(ts // size) * size


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Ledger:
    """Records calls and requests; answers totals, breakdowns and time series.

    One ``record`` is one round trip to Redis (one script call), whatever the number of rows;
    the first call after Redis lost its scripts takes two (EVALSHA, then EVAL).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        raw_ttl_s: int = DEFAULT_RAW_TTL_S,
        rollup_ttl_s: int = DEFAULT_ROLLUP_TTL_S,
        daily_ttl_s: int | None = None,
    ) -> None:
        self.client = client
        self.raw_ttl_s = raw_ttl_s
        self.rollup_ttl_s = rollup_ttl_s
        self.daily_ttl_s = max(rollup_ttl_s, daily_ttl_s or DEFAULT_DAILY_TTL_S)
        self._record_script = client.register_script(_RECORD_LUA)

    # --- writing ----------------------------------------------------------------------------

    def record(self, calls: Sequence[CallRecord], requests: Sequence[RequestRecord]) -> None:
        """Append the rows and add them to the rollups, in one round trip (a Lua script)."""
        if not calls and not requests:
            return
        sums: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for call in calls:
            self._add(sums, call.ts, _call_dims(call), _call_counters(call))
        for request in requests:
            self._add(sums, request.ts, _request_dims(request), _request_counters(request))
        min_id = f"{max(0, int((time.time() - self.raw_ttl_s) * 1000))}-0"
        keys: list[str] = [RAW_CALLS, RAW_REQUESTS]
        hashes: list[tuple[int, list[str]]] = []
        for key, counters in sums.items():
            keys.append(key)
            ttl = self.rollup_ttl_s if key.startswith(PREFIX + "h:") else self.daily_ttl_s
            flat = [
                part for name, value in counters.items() if value for part in (name, str(value))
            ]
            hashes.append((ttl, flat))
        args: list[str | int] = [min_id, len(calls), len(requests)]
        args += [call.to_json() for call in calls]
        args += [request.to_json() for request in requests]
        args.append(json.dumps(hashes, separators=(",", ":")))
        self._record_script(keys=keys, args=args)

    @staticmethod
    def _add(
        sums: dict[str, dict[str, int]],
        ts: float,
        dims: list[tuple[str, str]],
        counters: dict[str, int],
    ) -> None:
        keys = (f"{PREFIX}h:{_bucket(ts, HOUR)}:", f"{PREFIX}d:{_bucket(ts, DAY)}:")
        for dim, value in dims:
            for prefix in keys:
                target = sums[prefix + dim]
                for metric, count in counters.items():
                    target[f"{value}|{metric}"] += count

    # --- reading rollups --------------------------------------------------------------------

    def _oldest(self) -> float:
        """Nothing older is kept: ranges are clipped here so a huge range stays cheap."""
        return time.time() - self.daily_ttl_s - DAY

    def _granularity(self, since: float, span: float) -> int:
        """Hourly while the hourly rollups reach back far enough and the range is short."""
        hourly_from = time.time() - self.rollup_ttl_s + HOUR
        return HOUR if since >= hourly_from and span <= 31 * DAY else DAY

    def _read(
        self, dim: str, since: float, until: float, size: int
    ) -> Iterator[tuple[int, dict[Any, Any]]]:
        """(bucket start, hash) for every ``size`` bucket overlapping [since, until)."""
        since = max(since, self._oldest())
        starts = list(range(_bucket(since, size), int(until) + 1, size))
        starts = [s for s in starts if s + size > since and s < until]
        kind = "h" if size == HOUR else "d"
        pipe = self.client.pipeline(transaction=False)
        for start in starts:
            pipe.hgetall(f"{PREFIX}{kind}:{start}:{dim}")
        yield from zip(starts, pipe.execute(), strict=True)

    @staticmethod
    def _fold(hashes: Iterable[dict[Any, Any]], only: str | None = None) -> dict[str, Totals]:
        """Per dimension value, the totals in ``hashes`` (``only``: that value alone)."""
        out: dict[str, Totals] = {}
        for data in hashes:
            for raw_field, raw_value in data.items():
                value, _, metric = _decode(raw_field).rpartition("|")
                if only is not None and value != only:
                    continue
                _apply(out.setdefault(value, Totals()), metric, int(raw_value))
        return out

    def query(
        self,
        *,
        since: float,
        until: float | None = None,
        tenant: str | None = None,
        model: str | None = None,
        source: str | None = None,
        tag: tuple[str, str] | None = None,
    ) -> Totals:
        """Totals over [since, until) (epoch seconds), optionally for one tenant/model/source/tag.

        One filter reads the rollups; two or more read the raw rows (kept ``raw_ttl_s``).
        """
        until = time.time() if until is None else until
        filters = [("tenant", tenant), ("model", model), ("source", source)]
        if tag is not None:
            filters.append((f"tag:{tag[0]}", tag[1]))
        active = [(dim, value) for dim, value in filters if value is not None]
        if len(active) > 1:
            return self._scan_totals(since, until, dict(active))
        dim, value = active[0] if active else ("all", "")
        size = self._granularity(since, until - since)
        hashes = (data for _, data in self._read(dim, since, until, size))
        return self._fold(hashes, only=value).get(value, Totals())

    def breakdown(self, *, since: float, until: float | None = None, by: str) -> dict[str, Totals]:
        """Totals per value of ``by``: ``tenant``, ``model``, ``source`` or ``tag:NAME``."""
        if by not in DIMS and not (by.startswith("tag:") and len(by) > 4):
            raise ValueError("by must be tenant, model, source or tag:NAME")
        until = time.time() if until is None else until
        size = self._granularity(since, until - since)
        folded = self._fold(data for _, data in self._read(by, since, until, size))
        return dict(sorted(folded.items(), key=lambda item: -item[1].baseline_nano))

    def series(
        self, *, since: float, until: float | None = None, bucket_s: int
    ) -> list[tuple[float, Totals]]:
        """Totals per ``bucket_s`` bucket, empty ones included, oldest first (for charts).

        Multiples of an hour read the rollups; smaller buckets read the raw rows.
        """
        if bucket_s <= 0:
            raise ValueError("bucket_s must be positive")
        until = time.time() if until is None else until
        since = max(since, self._oldest())
        buckets = {s: Totals() for s in range(_bucket(since, bucket_s), int(until) + 1, bucket_s)}
        buckets = {s: t for s, t in buckets.items() if s + bucket_s > since and s < until}
        if bucket_s % HOUR:
            for row in self._scan(RAW_REQUESTS, since, until):
                _fold_request(buckets.setdefault(_bucket(row.ts, bucket_s), Totals()), row)
            for call in self._scan_calls(since, until):
                _fold_call(buckets.setdefault(_bucket(call.ts, bucket_s), Totals()), call)
        else:
            size = DAY if bucket_s % DAY == 0 else HOUR
            size = max(size, self._granularity(since, 0))
            for start, data in self._read("all", since, until, size):
                target = buckets.setdefault(_bucket(start, bucket_s), Totals())
                target.add(self._fold([data], only="").get("", Totals()))
        return sorted((float(start), totals) for start, totals in buckets.items())

    # --- reading raw rows -------------------------------------------------------------------

    def _raw(self, key: str, since: float, until: float) -> Iterator[bytes | str]:
        low = f"{max(0, int((since - _RAW_EARLY_S) * 1000))}-0"
        high = f"{int((until + _RAW_LATE_S) * 1000)}-18446744073709551615"
        while True:
            entries: Any = self.client.xrange(key, low, high, count=_SCAN_CHUNK)
            for _, fields in entries:
                yield fields.get(b"r") or fields["r"]  # bytes, or str with decode_responses
            if len(entries) < _SCAN_CHUNK:
                return
            low = "(" + _decode(entries[-1][0])

    def _scan(self, key: str, since: float, until: float) -> Iterator[RequestRecord]:
        for raw in self._raw(key, since, until):
            row = RequestRecord.from_json(raw)
            if since <= row.ts < until:
                yield row

    def _scan_calls(self, since: float, until: float) -> Iterator[CallRecord]:
        for raw in self._raw(RAW_CALLS, since, until):
            row = CallRecord.from_json(raw)
            if since <= row.ts < until:
                yield row

    def calls(self, *, since: float, until: float | None = None) -> list[CallRecord]:
        """The raw call rows in [since, until), e.g. to price the ledger again."""
        return list(self._scan_calls(since, time.time() if until is None else until))

    def requests(self, *, since: float, until: float | None = None) -> list[RequestRecord]:
        """The raw request rows in [since, until)."""
        return list(self._scan(RAW_REQUESTS, since, time.time() if until is None else until))

    def _scan_totals(self, since: float, until: float, filters: dict[str, str]) -> Totals:
        totals = Totals()
        for row in self._scan(RAW_REQUESTS, since, until):
            if all(value == dict(_request_dims(row)).get(dim) for dim, value in filters.items()):
                _fold_request(totals, row)
        if not any(dim == "source" or dim.startswith("tag:") for dim in filters):
            for call in self._scan_calls(since, until):
                if all(value == dict(_call_dims(call)).get(dim) for dim, value in filters.items()):
                    _fold_call(totals, call)
        return totals


def _fold_request(totals: Totals, row: RequestRecord) -> None:
    for metric, value in _request_counters(row).items():
        _apply(totals, metric, value)


def _fold_call(totals: Totals, row: CallRecord) -> None:
    for metric, value in _call_counters(row).items():
        _apply(totals, metric, value)
