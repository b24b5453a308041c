"""Prices (genai-prices snapshot, overrides, unpriced models) and the fake's prompt caching."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from genai_prices import types as gp_types
from genai_prices.data_snapshot import get_snapshot

from worker.dev.fakellm import FakeConfig, create_app
from worker.dev.fakellm.promptcache import MIN_PREFIX, STEP
from worker.ledger import PriceBook, PriceFileError
from worker.tokens import count_tokens

# --- prices -------------------------------------------------------------------------------------


def test_snapshot_price_and_cached_rate() -> None:
    book = PriceBook.load()
    price = book.price("gpt-4o-mini")
    assert price is not None and price.source == "genai-prices"
    assert (price.input_per_m, price.output_per_m, price.cached_input_per_m) == (0.15, 0.6, 0.075)
    # 976 uncached + 1024 cached input tokens and 100 output tokens, in nano-dollars.
    assert book.cost_nano("gpt-4o-mini", 2000, 100, 1024) == 976 * 150 + 1024 * 75 + 100 * 600
    assert book.cost("gpt-4o-mini", 2000, 100, 0) == pytest.approx(0.00036)
    cached = book.cost("gpt-4o", 10_000, 0, 10_000)
    full = book.cost("gpt-4o", 10_000, 0, 0)
    assert cached is not None and full is not None and cached == pytest.approx(full / 2)


def test_dated_names_and_provider_prefixes_match() -> None:
    book = PriceBook.load()
    assert book.price("gpt-4o-mini-2024-07-18") == book.price("gpt-4o-mini")
    assert book.price("openai/gpt-4o-mini") == book.price("gpt-4o-mini")


def _rates(info: gp_types.ModelInfo, when: datetime) -> tuple[Decimal | None, ...]:
    prices = info.get_prices(when)
    values = (prices.input_mtok, prices.output_mtok)
    return tuple(v.base if isinstance(v, gp_types.TieredPrices) else v for v in values)


def _dated_model() -> tuple[str, gp_types.ModelInfo, datetime]:
    """A (provider, model, date) from the snapshot whose input or output price changed."""
    for provider in get_snapshot().providers:
        for model in provider.models:
            if not isinstance(model.prices, list):
                continue
            for conditional in model.prices:
                constraint = conditional.constraint
                if isinstance(constraint, gp_types.StartDateConstraint):
                    day = constraint.start_date
                    start = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
                    before = _rates(model, start - timedelta(days=2))
                    if None not in before and before != _rates(model, start):
                        return provider.id, model, start
    pytest.skip("the genai-prices snapshot has no dated price change")


def test_prices_are_looked_up_at_the_call_time() -> None:
    provider, info, changed = _dated_model()
    book = PriceBook.load()
    ref = f"{provider}/{info.id}"
    seen = set()
    for when in (changed - timedelta(days=2), changed + timedelta(days=1)):
        price = book.price(ref, when.timestamp())
        assert price is not None
        got = (Decimal(str(price.input_per_m)), Decimal(str(price.output_per_m)))
        assert got == _rates(info, when)
        seen.add(got)
    assert len(seen) == 2


def test_overrides_win_and_default_cached_to_input(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    entries = {
        "gpt-4o-mini": {"input": 1, "output": 2, "cached_input": 0.5},
        "My-Finetune": {"input": "0.3", "output": 1.2},
    }
    path.write_text(json.dumps(entries))
    book = PriceBook.load(str(path))
    mini = book.price("gpt-4o-mini")
    assert mini is not None and mini.source == "override" and mini.input_per_m == 1
    assert book.cost_nano("gpt-4o-mini", 1000, 10, 400) == 600 * 1000 + 400 * 500 + 10 * 2000
    tuned = book.price("my-finetune")
    assert tuned is not None and tuned.cached_input_per_m == tuned.input_per_m == 0.3
    toml = tmp_path / "prices.toml"
    toml.write_text('["corp-llm"]\ninput = 2.0\noutput = 4.0\ncached_input = 0.2\n')
    corp = PriceBook.load(str(toml)).price("corp-llm")
    assert corp is not None and corp.cached_input_per_m == 0.2


@pytest.mark.parametrize(
    "content",
    ["not json", '["list"]', '{"m": {"input": 1}}', '{"m": {"input": -1, "output": 1}}',
     '{"m": {"input": 1, "output": 1, "batch": 0.5}}', '{"m": {"input": true, "output": 1}}'],
)  # fmt: skip
def test_bad_overrides_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(PriceFileError, match=r"prices\.json"):
        PriceBook.load(str(path))


def test_unpriced_model_is_none_and_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook.load()
    with caplog.at_level(logging.WARNING, logger="worker.ledger.prices"):
        assert book.price("no-such-model-xyz") is None
        assert book.cost("no-such-model-xyz", 100, 10, 0) is None
        assert book.cost_nano("no-such-model-xyz", 100, 10, 0) is None
    warnings = [r for r in caplog.records if "no-such-model-xyz" in r.getMessage()]
    assert len(warnings) == 1 and "unpriced" in warnings[0].getMessage()


# --- the fake upstream's prompt cache -----------------------------------------------------------

POLICY = " ".join(
    f"Policy rule {i}: refunds within thirty days need a receipt." for i in range(120)
)


@asynccontextmanager
async def fake(**knobs: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(FakeConfig(**knobs)))
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        yield client


async def ask(
    client: httpx.AsyncClient, question: str, *, system: str = POLICY, model: str = "gpt-4o-mini"
) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    response = await client.post(
        "/v1/chat/completions", json={"model": model, "messages": messages}
    )
    assert response.status_code == 200
    usage: dict[str, Any] = response.json()["usage"]
    return usage


async def test_fake_reports_cached_prefix_in_128_token_steps() -> None:
    assert count_tokens(POLICY) > MIN_PREFIX + STEP
    async with fake() as client:
        first = await ask(client, "Can I return shoes?")
        second = await ask(client, "What about a jacket bought last week?")
        other_model = await ask(client, "Can I return shoes?", model="gpt-4o")
        short = await ask(client, "hi", system="Be brief.")
        stats = (await client.get("/stats")).json()
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached % STEP == 0 and MIN_PREFIX <= cached <= second["prompt_tokens"]
    assert cached > count_tokens(POLICY) - STEP  # the whole shared system prompt, to 128 tokens
    assert other_model["prompt_tokens_details"] == {"cached_tokens": 0}  # caches are per model
    assert "prompt_tokens_details" not in short  # too short to cache: no details, as before
    usages = [first, second, other_model, short]
    assert stats["cached_tokens"] == cached
    assert stats["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert stats["completion_tokens"] == sum(u["completion_tokens"] for u in usages)
    mini = stats["tokens_by_model"]["gpt-4o-mini"]
    assert mini["cached_tokens"] == cached
    assert (
        mini["prompt_tokens"]
        == first["prompt_tokens"] + second["prompt_tokens"] + short["prompt_tokens"]
    )


async def test_fake_prompt_cache_can_be_turned_off_and_expires() -> None:
    async with fake(prompt_cache=False) as client:
        await ask(client, "one")
        assert "prompt_tokens_details" not in await ask(client, "two")
        assert (await client.post("/config", json={"prompt_cache": 1})).status_code == 400
        assert (await client.post("/config", json={"prompt_cache": True})).status_code == 200
        await ask(client, "three")
        assert (await ask(client, "four"))["prompt_tokens_details"]["cached_tokens"] > 0
    async with fake(prompt_cache_ttl_s=0) as client:
        await ask(client, "one")
        assert (await ask(client, "two"))["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_fake_streamed_usage_carries_cached_tokens() -> None:
    messages = [{"role": "system", "content": POLICY}, {"role": "user", "content": "q"}]
    body = {"model": "gpt-4o-mini", "messages": messages}
    async with fake() as client:
        await client.post("/v1/chat/completions", json=body)
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        response = await client.post("/v1/chat/completions", json=stream)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
    usage = json.loads(events[-1])["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= MIN_PREFIX


def test_tiered_prices_follow_genai_prices() -> None:
    """Long-context tiers are priced by genai-prices itself (all tokens at the tier rate)."""
    snapshot = get_snapshot()
    for provider in snapshot.providers:
        for model in provider.models:
            prices = model.prices if isinstance(model.prices, gp_types.ModelPrice) else None
            if prices is not None and isinstance(prices.input_mtok, gp_types.TieredPrices):
                tier = prices.input_mtok.tiers[0]
                ref = f"{provider.id}/{model.id}"
                usage = gp_types.Usage(input_tokens=tier.start + 10, output_tokens=5)
                expected = prices.calc_price(usage)["total_price"]
                got = PriceBook.load().cost_nano(ref, tier.start + 10, 5, 0)
                assert got == round(expected * 10**9)
                return
    pytest.skip("no tiered model in the snapshot")
