"""``coalesce report``: billed against baseline, saved by lever, as a table, JSON or HTML page.

Also the daily report (a Celery beat task calls ``write_daily_report`` for yesterday, UTC).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis

from .html import LEVER_LABELS, money, render_html
from .store import DAY, HOUR, Ledger, Totals

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": HOUR, "d": DAY, "w": 7 * DAY}


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``24h``, ``7d``, ``2w`` (a bare number is seconds)."""
    match = _DURATION_RE.fullmatch(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 24h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


@dataclass
class Report:
    """Everything one report shows, read from the ledger once."""

    since: float
    until: float
    by: str | None
    totals: Totals
    breakdown: dict[str, Totals] | None
    series: list[tuple[float, Totals]]
    bucket_s: int

    @property
    def period(self) -> str:
        fmt = "%Y-%m-%d %H:%M"
        start = time.strftime(fmt, time.gmtime(self.since))
        end = time.strftime(fmt, time.gmtime(self.until))
        return f"{start} to {end} UTC"


def _bucket_for(span_s: float) -> int:
    """Chart resolution: hourly up to three days, daily beyond."""
    return HOUR if span_s <= 3 * DAY else DAY


def build_report(ledger: Ledger, *, since: float, until: float, by: str | None) -> Report:
    bucket_s = _bucket_for(until - since)
    return Report(
        since=since,
        until=until,
        by=by,
        totals=ledger.query(since=since, until=until),
        breakdown=ledger.breakdown(since=since, until=until, by=by) if by else None,
        series=ledger.series(since=since, until=until, bucket_s=bucket_s),
        bucket_s=bucket_s,
    )


def _lever_lines(totals: Totals) -> list[str]:
    baseline = totals.baseline_usd
    lines = []
    for name, usd in sorted(totals.levers.items(), key=lambda item: -item[1]):
        pct = f"{100 * usd / baseline:6.1f}%" if baseline > 0 else ""
        lines.append(f"  {LEVER_LABELS.get(name, name):<28}{money(usd):>14} {pct}")
    return lines or ["  (none)"]


def render_table(
    totals: Totals,
    breakdown: Mapping[str, Totals] | None = None,
    *,
    by: str | None = None,
    title: str = "coalesce cost report",
) -> str:
    """The plain-text report: billed, baseline, saved and saved %, by lever, then by ``by``."""
    sources = ", ".join(f"{k} {v:,}" for k, v in sorted(totals.by_source.items()))
    lines = [
        title,
        f"  {'billed':<28}{money(totals.billed_usd):>14}",
        f"  {'baseline':<28}{money(totals.baseline_usd):>14}",
        f"  {'saved':<28}{money(totals.saved_usd):>14} {totals.saved_pct:6.1f}%",
        "saved by lever:",
        *_lever_lines(totals),
        f"requests {totals.requests:,}" + (f" ({sources})" if sources else ""),
        f"upstream calls {totals.upstream_calls:,} (errors {totals.upstream_errors:,}), "
        f"bill {money(totals.upstream_billed_usd)}",
        f"tokens: prompt {totals.prompt_tokens:,} (cached {totals.cached_tokens:,}), "
        f"completion {totals.completion_tokens:,}",
    ]
    if totals.unpriced_calls or totals.unpriced_requests:
        lines.append(
            f"UNPRICED: {totals.unpriced_calls:,} calls, {totals.unpriced_requests:,} requests "
            "(models with no price; left out of the dollar figures, not counted as $0)"
        )
    if breakdown and by:
        width = max([len(by), *(len(key) for key in breakdown)]) + 2
        lines.append("")
        header = f"{by:<{width}}{'requests':>10}{'billed':>14}{'baseline':>14}{'saved':>14}"
        lines.append(header + f"{'saved %':>9}")
        for key, t in breakdown.items():
            lines.append(
                f"{key or '(none)':<{width}}{t.requests:>10,}{money(t.billed_usd):>14}"
                f"{money(t.baseline_usd):>14}{money(t.saved_usd):>14}{t.saved_pct:>8.1f}%"
            )
    return "\n".join(lines)


def report_dict(report: Report) -> dict[str, Any]:
    data = report.totals.to_dict()
    data["since"] = datetime.fromtimestamp(report.since, UTC).isoformat()
    data["until"] = datetime.fromtimestamp(report.until, UTC).isoformat()
    if report.by and report.breakdown is not None:
        data["by"] = report.by
        data["breakdown"] = {key: t.to_dict() for key, t in report.breakdown.items()}
    data["series"] = [
        {
            "start": datetime.fromtimestamp(start, UTC).isoformat(),
            "billed_usd": t.billed_usd,
            "baseline_usd": t.baseline_usd,
            "requests": t.requests,
        }
        for start, t in report.series
    ]
    return data


def render_json(report: Report) -> str:
    """``--json``: the totals (billed_usd, baseline_usd, tokens, levers...), breakdown, series."""
    return json.dumps(report_dict(report), indent=2)


def report_html(report: Report, *, title: str = "coalesce cost report") -> str:
    return render_html(
        report.totals,
        report.breakdown,
        report.series,
        bucket_s=report.bucket_s,
        title=title,
        period=report.period,
        by=report.by,
    )


def run_report(
    client: redis.Redis,
    *,
    since_s: float,
    by: str | None,
    as_json: bool,
    html_path: str | None,
    out: Callable[[str], object] = print,
    now: float | None = None,
    rollup_ttl_s: int | None = None,
) -> None:
    """The body of ``coalesce report``: prints the table (or JSON); writes the page if asked."""
    until = time.time() if now is None else now
    ledger = Ledger(client) if rollup_ttl_s is None else Ledger(client, rollup_ttl_s=rollup_ttl_s)
    report = build_report(ledger, since=until - since_s, until=until, by=by)
    if html_path:
        Path(html_path).write_text(report_html(report), encoding="utf-8")
    if as_json:
        out(render_json(report))
    else:
        out(render_table(report.totals, report.breakdown, by=by, title=_title(report)))
        if html_path:
            out(f"wrote {html_path}")


def _title(report: Report) -> str:
    return f"coalesce cost report, {report.period}"


def write_daily_report(
    client: redis.Redis,
    *,
    day: date,
    path: str | None,
    webhook: str | None,
    by: str | None = "tenant",
    timeout_s: float = 10.0,
) -> None:
    """One UTC day's report: to ``path`` (HTML for .html/.htm, text for .txt, else JSON) and/or
    POSTed as JSON to ``webhook``; raises on a failed write or a non-2xx webhook answer so the
    scheduled task shows the failure."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    report = build_report(Ledger(client), since=start, until=start + DAY, by=by)
    title = f"coalesce cost report for {day.isoformat()}"
    if path:
        file = Path(path.replace("{date}", day.isoformat()))
        file.parent.mkdir(parents=True, exist_ok=True)
        suffix = file.suffix.lower()
        if suffix in (".html", ".htm"):
            text = report_html(report, title=title)
        elif suffix == ".txt":
            text = render_table(report.totals, report.breakdown, by=by, title=title)
        else:
            text = render_json(report)
        file.write_text(text, encoding="utf-8")
    if webhook:
        body = {"report": "coalesce-daily", "date": day.isoformat(), **report_dict(report)}
        httpx.post(webhook, json=body, timeout=timeout_s).raise_for_status()


def yesterday(now: datetime | None = None) -> date:
    """The UTC day before ``now``: what the daily job reports on."""
    return ((now or datetime.now(UTC)).astimezone(UTC) - timedelta(days=1)).date()
