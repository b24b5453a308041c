"""Reports from a real ledger: table, JSON keys, HTML charts, and the daily report."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from test_ledger import batch, hit

from worker.ledger import Ledger
from worker.ledger.report import parse_duration, run_report, write_daily_report, yesterday
from worker.ledger.store import HOUR


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    ledger = Ledger(conn)
    now = time.time()
    for hours_ago in (20, 12, 5, 1):
        ts = now - hours_ago * HOUR
        ledger.record(*batch(ts, cached=1024, tags=[{"feature": "support"}] * 3))
        ledger.record(
            *batch(ts + 60, tenant="globex", size=4, fallback=1600 if hours_ago == 5 else 0)
        )
        ledger.record([], [hit(ts + 90, "cache"), hit(ts + 95, "semantic"), hit(ts + 99, "dedup")])
    yield conn
    conn.close()


def report(client: redis.Redis, **kwargs: Any) -> str:
    lines: list[str] = []
    options: dict[str, Any] = {
        "since_s": 24 * HOUR,
        "by": None,
        "as_json": False,
        "html_path": None,
    }
    run_report(client, **{**options, **kwargs}, out=lines.append)
    return "\n".join(lines)


def test_json_has_the_promised_keys(client: redis.Redis) -> None:
    data = json.loads(report(client, as_json=True, by="tenant"))
    for key in (
        "billed_usd", "baseline_usd", "prompt_tokens", "completion_tokens", "cached_tokens",
        "upstream_calls", "requests", "unpriced_calls", "levers",
    ):  # fmt: skip
        assert key in data, key
    assert data["requests"] == 4 * (3 + 4 + 3) and data["upstream_calls"] == 4 * 2 + 1
    assert data["cached_tokens"] == 4 * 1024
    assert set(data["levers"]) == {"batching", "prompt_cache", "cache", "semantic", "dedup"}
    saved = data["baseline_usd"] - data["billed_usd"]
    assert sum(data["levers"].values()) == pytest.approx(saved, abs=1e-9)
    assert set(data["breakdown"]) == {"acme", "globex"}
    assert sum(b["requests"] for b in data["breakdown"].values()) == data["requests"]
    assert len(data["series"]) >= 24


def test_table_shows_billed_baseline_saved_and_levers(client: redis.Redis) -> None:
    text = report(client, by="tag:feature")
    for word in ("billed", "baseline", "saved", "Batching", "Provider prompt cache", "Exact cache"):
        assert word in text
    assert "support" in text and "%" in text


def test_html_has_both_charts_with_labels(client: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    text = report(client, html_path=str(path), by="model")
    assert f"wrote {path}" in text
    page = path.read_text()
    assert page.count("<svg") == 2
    for label in (
        "Cumulative spend against baseline", "Billed", "Baseline (one call per request",
        "Time (UTC)", "Savings by lever", "Batching (shared prompt)", "Semantic cache",
        "Cost added", "gpt-4o-mini",
    ):  # fmt: skip
        assert label in page, label
    assert "<script" not in page and "src=" not in page and "<link" not in page


def test_daily_report_to_files_and_webhook(client: redis.Redis, tmp_path: Path) -> None:
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["content-length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        today = datetime.now(UTC).date()
        url = f"http://127.0.0.1:{server.server_port}/hook"
        target = tmp_path / "reports" / "{date}.json"
        write_daily_report(client, day=today, path=str(target), webhook=url)
        write_daily_report(client, day=today, path=str(tmp_path / "day.html"), webhook=None)
    finally:
        server.shutdown()
    data = json.loads((tmp_path / "reports" / f"{today.isoformat()}.json").read_text())
    assert data["requests"] > 0 and "levers" in data
    assert received and received[0]["date"] == today.isoformat()
    assert received[0]["billed_usd"] == data["billed_usd"]
    assert (tmp_path / "day.html").read_text().count("<svg") == 2
    assert yesterday(datetime(2026, 3, 1, 0, 30, tzinfo=UTC)) == date(2026, 2, 28)


def test_parse_duration() -> None:
    assert parse_duration("24h") == 86400 and parse_duration("30m") == 1800
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90") == 90
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")


def test_a_lever_that_cost_money_is_drawn_left_of_zero() -> None:
    from worker.ledger.html import _COST, _SAVED, levers_chart
    from worker.ledger.store import Totals

    totals = Totals(baseline_nano=10**9, billed_nano=9 * 10**8)
    totals.levers_nano = {"batching": -5 * 10**7, "cache": 15 * 10**7}
    svg = levers_chart(totals)
    assert f'fill="{_COST}"' in svg and f'fill="{_SAVED}"' in svg
    assert "-$0.0500 (-5.0%)" in svg and "$0.1500 (15.0%)" in svg


def test_cumulative_spend_is_drawn_at_each_buckets_end() -> None:
    """Spend made during 14:00-15:00 shows at 15:00, from zero at the first bucket's start."""
    import re

    from worker.ledger.html import _BILLED, spend_chart
    from worker.ledger.store import Totals

    start = datetime(2026, 12, 5, 13, tzinfo=UTC).timestamp()
    quiet, busy = Totals(), Totals(baseline_nano=10**9, billed_nano=2 * 10**8)
    svg = spend_chart([(start, quiet), (start + HOUR, busy)], HOUR)
    billed = re.search(f'points="([^"]+)" fill="none" stroke="{_BILLED}"', svg)
    assert billed is not None
    ys = [float(point.split(",")[1]) for point in billed.group(1).split()]
    assert len(ys) == 3 and ys[0] == ys[1] > ys[2]  # 13:00 and 14:00 at zero, 15:00 above
    assert ">13:00<" in svg and ">15:00<" in svg
