"""``coalesce bench cost``: the workload's shape, and a tiny run through the whole pipeline."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from worker.dev.bench.cost import VARIANTS, _kinds, run_cost_bench
from worker.dev.workload import cost_mix, support_policy
from worker.tokens import count_tokens

_INTENTS = {
    "cancel_order": "I want to cancel order {n}, can you help?",
    "track_refund": "where is my refund? I asked for it {n} days ago",
    "reset_password": "I forgot my password, how do I reset it, attempt {n}",
}


def _data_dir(tmp_path: Path) -> Path:
    """A few dozen rows in the layout of shared/data (Bitext CSV, Natural Questions JSONL)."""
    with (tmp_path / "bitext_customer_support_train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "intent", "entity_type", "entity_value"])
        for intent, text in _INTENTS.items():
            for n in range(40):
                entity = ("order_id", str(1000 + n % 5)) if intent == "cancel_order" else ("", "")
                writer.writerow([text.format(n=n), intent, *entity])
    with (tmp_path / "nq_open_dev.jsonl").open("w") as handle:
        for n in range(60):
            handle.write(json.dumps({"question": f"who won the cup in {1900 + n}", "answer": []}))
            handle.write("\n")
    return tmp_path


def test_mix_has_repeats_paraphrases_and_factual_questions(tmp_path: Path) -> None:
    data = _data_dir(tmp_path)
    mix = cost_mix(data, 120, seed=1)
    assert mix == cost_mix(data, 120, seed=1)  # deterministic per seed
    kinds = _kinds([item for item, _ in mix], [label for _, label in mix])
    assert sum(kinds.values()) == 120
    assert all(kinds[kind] > 0 for kind in ("new", "paraphrase", "repeat", "factual"))
    factual = [item.prompt for item, label in mix if label.startswith("factual:")]
    assert len(set(factual)) == len(factual)  # distinct
    support = [item for item, label in mix if label.startswith("support:")]
    assert {item.system for item in support} == {support_policy()}
    assert count_tokens(support_policy()) >= 1500  # long enough for provider prompt caching
    assert Counter(item.model for item in support).keys() == {"gpt-4o-mini"}


def test_mix_refuses_more_than_the_data_holds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not enough"):
        cost_mix(_data_dir(tmp_path), 2000, seed=1)


def test_tiny_run_bills_less_than_baseline_and_matches_the_provider(tmp_path: Path) -> None:
    lines: list[str] = []
    results = run_cost_bench(
        _data_dir(tmp_path),
        requests=40,
        rate=40.0,
        latency_ms=50.0,
        variants=tuple(v for v in VARIANTS if v.name in ("caches on", "caches off")),
        out=lines.append,
    )
    on = results[0]
    for measured in results:
        assert measured.failed == 0
        assert measured.wrong == 0
        totals = measured.totals
        assert totals.requests == 40  # every request has its ledger row
        assert totals.upstream_calls == measured.fake_calls
        assert measured.fake_bill_usd is not None
        assert abs(totals.upstream_billed_usd - measured.fake_bill_usd) < 0.005  # to the cent
        assert 0 < totals.billed_nano < totals.baseline_nano
        assert sum(s.requests for s in measured.by_source.values()) == 40
    assert sum(on.totals.by_source.get(s, 0) for s in ("cache", "semantic", "dedup")) > 0
    text = "\n".join(lines)
    assert "caches on" in text and "caches off" in text and "target:" in text
