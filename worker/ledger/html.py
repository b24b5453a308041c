"""The report as one self-contained HTML page: summary, two inline SVG charts, tables.

No scripts, fonts or stylesheets are fetched: the page is mailed, archived and opened offline.
Charts: cumulative spend against the baseline over time (the gap is what was saved), and
savings by lever as horizontal bars (a lever that cost money, such as fallback re-asks
against batching, shows as a bar to the left of zero).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from html import escape
from itertools import accumulate

from .store import Totals

WIDTH = 760
_FONT = "font-family:system-ui,-apple-system,'DejaVu Sans',Arial,sans-serif"
_BILLED = "#2563eb"
_BASELINE = "#6b7280"
_SAVED = "#16a34a"
_COST = "#dc2626"
LEVER_LABELS = {
    "batching": "Batching (shared prompt)",
    "dedup": "Dedup (in flight)",
    "cache": "Exact cache",
    "semantic": "Semantic cache",
    "prompt_cache": "Provider prompt cache",
    "routing": "Routing",
    "compression": "Compression",
    "other": "Other (token estimate)",
}


def money(usd: float) -> str:
    """$ with enough decimals for small bills ($0.0123) and commas for big ones."""
    sign = "-" if usd < 0 else ""
    usd = abs(usd)
    if usd >= 100:
        return f"{sign}${usd:,.2f}"
    if usd >= 1:
        return f"{sign}${usd:,.3f}"
    return f"{sign}${usd:.4f}"


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round axis values from 0 to at least ``high`` (1-2-5 steps)."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def tick_label(value: float, step: float) -> str:
    """An axis value with just the decimals its step needs ($0.05, $0.025, $1,500)."""
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-9:
        decimals += 1
    return f"${value:,.{decimals}f}"


def _time_label(ts: float, bucket_s: int, span_s: float) -> str:
    t = time.gmtime(ts)
    if bucket_s >= 86400:
        return time.strftime("%b %d", t)
    if span_s > 86400:
        return time.strftime("%b %d %H:%M", t)
    return time.strftime("%H:%M", t)


def _text(
    x: float,
    y: float,
    text: str,
    *,
    anchor: str = "middle",
    size: int = 12,
    color: str = "#111827",
    weight: str = "normal",
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
        f'fill="{color}" font-weight="{weight}">{escape(text)}</text>'
    )


def _legend(items: Sequence[tuple[str, str, bool]], x: float, y: float) -> str:
    """A row of (colour, label, dashed) keys starting at (x, y)."""
    parts: list[str] = []
    for color, label, dashed in items:
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        parts.append(
            f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 24:.1f}" y2="{y - 4:.1f}" '
            f'stroke="{color}" stroke-width="3"{dash}/>'
        )
        parts.append(_text(x + 30, y, label, anchor="start", size=13))
        x += 42 + 7.5 * len(label)
    return "".join(parts)


def spend_chart(series: Sequence[tuple[float, Totals]], bucket_s: int) -> str:
    """Cumulative billed and baseline USD over time, the saved gap shaded.

    Each point is the total at the end of its bucket, from zero at the first bucket's start,
    so spend never shows before the hour (or day) it happened in.
    """
    height, left, right, top, bottom = 340, 78, 24, 66, 56
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    times: list[float] = []
    billed: list[float] = []
    baseline: list[float] = []
    if series:
        times = [series[0][0], *(start + bucket_s for start, _ in series)]
        billed = list(accumulate((t.billed_usd for _, t in series), initial=0.0))
        baseline = list(accumulate((t.baseline_usd for _, t in series), initial=0.0))
    ticks = nice_ticks(max([*baseline, *billed, 0.0]))
    top_value = ticks[-1]
    n = len(times)

    def px(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def py(value: float) -> float:
        return top + plot_h - plot_h * value / top_value

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="Spend against baseline" '
        f'style="{_FONT}">',
        _text(
            left,
            20,
            "Cumulative spend against baseline (USD)",
            anchor="start",
            size=15,
            weight="bold",
        ),
    ]
    for value in ticks:
        y = py(value)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{WIDTH - right}" y2="{y:.1f}" stroke="#e5e7eb"/>'
        )
        out.append(_text(left - 8, y + 4, tick_label(value, ticks[1]), anchor="end"))
    span = (times[-1] - times[0]) if n else 0.0
    label_every = max(1, math.ceil(n / 8))
    for i, when in enumerate(times):
        if i % label_every == 0 or i == n - 1:
            x = px(i)
            out.append(
                f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" '
                f'y2="{top + plot_h + 5}" stroke="#374151"/>'
            )
            out.append(_text(x, top + plot_h + 20, _time_label(when, bucket_s, span)))
    out.append(_text(left + plot_w / 2, height - 10, "Time (UTC)", size=13))
    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{WIDTH - right}" y2="{top + plot_h}" '
        'stroke="#374151"/>'
    )
    if n:
        upper = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(baseline))
        lower = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in reversed(list(enumerate(billed))))
        out.append(f'<polygon points="{upper} {lower}" fill="{_SAVED}" fill-opacity="0.15"/>')
        out.append(
            f'<polyline points="{upper}" fill="none" stroke="{_BASELINE}" '
            'stroke-width="2.5" stroke-dasharray="6 4"/>'
        )
        line = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(billed))
        out.append(f'<polyline points="{line}" fill="none" stroke="{_BILLED}" stroke-width="3"/>')
    legend = [
        (_BILLED, "Billed", False),
        (_BASELINE, "Baseline (one call per request, no cache)", True),
    ]
    out.append(_legend(legend, left, 46))
    out.append("</svg>")
    return "".join(out)


def levers_chart(totals: Totals) -> str:
    """Savings by lever as horizontal bars from a zero line, with USD and % of baseline."""
    levers = sorted(totals.levers.items(), key=lambda item: -item[1])
    row_h, top, label_w, value_w = 34, 48, 190, 170
    height = top + max(1, len(levers)) * row_h + 40
    plot_l, plot_r = label_w + 10, WIDTH - value_w
    low = min([0.0, *(v for _, v in levers)])
    high = max([0.0, *(v for _, v in levers)])
    span = (high - low) or 1.0
    zero = plot_l + (plot_r - plot_l) * (-low / span)

    def width(value: float) -> float:
        return (plot_r - plot_l) * abs(value) / span

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="Savings by lever" '
        f'style="{_FONT}">',
        _text(
            10, 20, "Savings by lever (USD, % of baseline)", anchor="start", size=15, weight="bold"
        ),
    ]
    baseline = totals.baseline_usd
    for row, (name, value) in enumerate(levers):
        y = top + row * row_h
        label = LEVER_LABELS.get(name, name)
        out.append(_text(label_w, y + row_h / 2 + 4, label, anchor="end", size=13))
        x = zero if value >= 0 else zero - width(value)
        color = _SAVED if value >= 0 else _COST
        out.append(
            f'<rect x="{x:.1f}" y="{y + 6}" width="{max(width(value), 1):.1f}" '
            f'height="{row_h - 12}" fill="{color}" rx="2"/>'
        )
        pct = f" ({100 * value / baseline:.1f}%)" if baseline > 0 else ""
        out.append(_text(plot_r + 10, y + row_h / 2 + 4, money(value) + pct, anchor="start"))
    if not levers:
        out.append(_text(WIDTH / 2, top + row_h / 2, "No savings recorded in this period"))
    bottom = top + max(1, len(levers)) * row_h
    out.append(
        f'<line x1="{zero:.1f}" y1="{top - 4}" x2="{zero:.1f}" y2="{bottom + 4}" stroke="#374151"/>'
    )
    out.append(_text(zero, bottom + 18, "$0"))
    legend = [(_SAVED, "Saved", False), (_COST, "Cost added (e.g. fallback re-asks)", False)]
    out.append(_legend(legend, plot_l, bottom + 36))
    out.append("</svg>")
    return "".join(out)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _breakdown_rows(breakdown: Mapping[str, Totals]) -> list[list[str]]:
    return [
        [
            key or "(none)",
            f"{t.requests:,}",
            money(t.billed_usd),
            money(t.baseline_usd),
            money(t.saved_usd),
            f"{t.saved_pct:.1f}%",
        ]
        for key, t in breakdown.items()
    ]


_CSS = """
body{font-family:system-ui,-apple-system,'DejaVu Sans',Arial,sans-serif;margin:24px auto;
max-width:820px;color:#111827;background:#fff}
h1{font-size:22px;margin:0 0 4px} .sub{color:#4b5563;margin:0 0 18px}
.cards{display:flex;gap:12px;margin:0 0 20px;flex-wrap:wrap}
.card{border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px} .card span{color:#4b5563;font-size:13px}
section{margin:0 0 26px} table{border-collapse:collapse;width:100%;font-size:14px}
th,td{border-bottom:1px solid #e5e7eb;padding:6px 8px;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f9fafb}
.warn{color:#b45309}
"""


def render_html(
    totals: Totals,
    breakdown: Mapping[str, Totals] | None,
    series: Sequence[tuple[float, Totals]],
    *,
    bucket_s: int,
    title: str,
    period: str,
    by: str | None = None,
) -> str:
    """The whole page; every value is escaped, nothing is fetched."""
    cards = [
        (money(totals.billed_usd), "billed"),
        (money(totals.baseline_usd), "baseline"),
        (f"{money(totals.saved_usd)} ({totals.saved_pct:.1f}%)", "saved"),
        (f"{totals.requests:,} / {totals.upstream_calls:,}", "requests / upstream calls"),
    ]
    card_html = "".join(
        f'<div class="card"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in cards
    )
    warn = ""
    if totals.unpriced_calls or totals.unpriced_requests:
        warn = (
            f'<p class="warn">{totals.unpriced_calls} upstream calls and '
            f"{totals.unpriced_requests} requests used models with no price: they are "
            "left out of the dollar figures (never counted as $0).</p>"
        )
    tokens = _table(
        [
            [
                f"{totals.prompt_tokens:,}",
                f"{totals.cached_tokens:,}",
                f"{totals.completion_tokens:,}",
                money(totals.upstream_billed_usd),
            ]
        ],
        ["prompt tokens", "of which cached", "completion tokens", "upstream bill"],
    )
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1><p class='sub'>{escape(period)}</p>",
        f"<div class='cards'>{card_html}</div>{warn}",
        f"<section>{spend_chart(series, bucket_s)}</section>",
        f"<section>{levers_chart(totals)}</section>",
        f"<section><h2>Tokens</h2>{tokens}</section>",
    ]
    if breakdown and by:
        header = [by, "requests", "billed", "baseline", "saved", "saved %"]
        table = _table(_breakdown_rows(breakdown), header)
        parts.append(f"<section><h2>By {escape(by)}</h2>{table}</section>")
    parts.append("</body></html>")
    return "".join(parts)
