"""Prices per model: pydantic's genai-prices snapshot, with a user overrides file on top.

Why genai-prices: a maintained table (providers, historic prices, cache-read rates) that ships
offline in the wheel, instead of a hand-kept dict that goes stale. Why overrides: private
deployments, fine-tunes and negotiated rates are in no public table.

A model with no price is *unpriced*: ``price`` and ``cost`` return None and a warning is logged
once per model. It is never counted as $0 (LiteLLM issue 36999).

Money is computed with ``Decimal`` and handed out as integer nano-dollars (``cost_nano``) so
the ledger can add thousands of calls without float drift; ``cost`` is the same in USD.
"""

from __future__ import annotations

import json
import logging
import threading
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from genai_prices import types as gp_types
from genai_prices.data_snapshot import get_snapshot

log = logging.getLogger(__name__)

NANO_PER_USD = 1_000_000_000
_PER_M = Decimal(1_000_000)


@dataclass(frozen=True)
class Price:
    """USD per million tokens; cached input is the provider's prompt-cache read rate."""

    input_per_m: float
    output_per_m: float
    cached_input_per_m: float
    source: str  # "genai-prices" | "override"


@dataclass(frozen=True)
class _Rates:
    """Exact rates behind a ``Price``; ``model_price`` keeps genai-prices' tiers when it has any."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    source: str
    model_price: gp_types.ModelPrice | None = None
    tiered: bool = False  # long-context tiers: genai-prices computes the cost (cliff rules)

    def price(self) -> Price:
        return Price(float(self.input), float(self.output), float(self.cached_input), self.source)


class PriceFileError(ValueError):
    """The overrides file cannot be read; the message names the file and the bad entry."""


def _decimal(value: object, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PriceFileError(f"{where} must be a number (USD per million tokens)")
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        raise PriceFileError(f"{where} must be a number (USD per million tokens)") from None
    if not number.is_finite() or number < 0:
        raise PriceFileError(f"{where} must be a non-negative number")
    return number


def load_overrides(path: str) -> dict[str, _Rates]:
    """``{"model": {"input": .., "output": .., "cached_input": ..}}`` from JSON or TOML.

    ``cached_input`` defaults to ``input`` (no discount); model names match case-insensitively.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        raw: Any = tomllib.loads(text) if file.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise PriceFileError(f"cannot read prices file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise PriceFileError(f"prices file {path} must map model names to prices")
    rates: dict[str, _Rates] = {}
    for model, entry in raw.items():
        where = f"{path}: {model}"
        if not isinstance(entry, dict) or "input" not in entry or "output" not in entry:
            raise PriceFileError(f"{where} needs 'input' and 'output' (USD per million tokens)")
        unknown = set(entry) - {"input", "output", "cached_input"}
        if unknown:
            raise PriceFileError(f"{where}: unknown fields {sorted(unknown)}")
        price_in = _decimal(entry["input"], f"{where}.input")
        cached = entry.get("cached_input", entry["input"])
        rates[model.lower()] = _Rates(
            input=price_in,
            output=_decimal(entry["output"], f"{where}.output"),
            cached_input=_decimal(cached, f"{where}.cached_input"),
            source="override",
        )
    return rates


def _base(value: Decimal | gp_types.TieredPrices | None) -> Decimal | None:
    return value.base if isinstance(value, gp_types.TieredPrices) else value


def _snapshot_rates(model: str, when: datetime) -> _Rates | None:
    """The model's prices at ``when`` in the bundled snapshot, or None when it has none.

    ``provider/model`` names (LiteLLM style) are tried with the prefix as the provider.
    """
    snapshot = get_snapshot()
    provider_id, _, bare = model.partition("/")
    attempts = [(model, None)] + ([(bare, provider_id)] if bare else [])
    for ref, provider in attempts:
        try:
            _, info = snapshot.find_provider_model(ref, None, provider, None)
        except LookupError:
            continue
        prices = info.get_prices(when)
        price_in, price_out = _base(prices.input_mtok), _base(prices.output_mtok)
        if price_in is None or price_out is None:
            return None
        cached = _base(prices.cache_read_mtok)
        values = (prices.input_mtok, prices.output_mtok, prices.cache_read_mtok)
        return _Rates(
            input=price_in,
            output=price_out,
            cached_input=price_in if cached is None else cached,
            source="genai-prices",
            model_price=prices,
            tiered=any(isinstance(v, gp_types.TieredPrices) for v in values),
        )
    return None


def _to_nano(usd: Decimal) -> int:
    return int((usd * NANO_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def _day(when: float | None) -> datetime:
    """Prices change by date: lookups are cached per UTC day of the call."""
    stamp = datetime.now(UTC) if when is None else datetime.fromtimestamp(when, UTC)
    return stamp.replace(hour=12, minute=0, second=0, microsecond=0)


class PriceBook:
    """Prices by model name; thread-safe (worker task threads share one)."""

    def __init__(self, overrides: dict[str, _Rates] | None = None) -> None:
        self._overrides = dict(overrides or {})
        self._cache: dict[tuple[str, datetime], _Rates | None] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, overrides_path: str | None = None) -> PriceBook:
        """The genai-prices snapshot (offline) with the overrides file, when given, on top."""
        return cls(load_overrides(overrides_path) if overrides_path else None)

    def _rates(self, model: str, when: float | None) -> _Rates | None:
        override = self._overrides.get(model.lower())
        if override is not None:
            return override
        key = (model, _day(when))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        rates = _snapshot_rates(model, key[1])
        with self._lock:
            self._cache[key] = rates
            if rates is None and model not in self._warned:
                self._warned.add(model)
                log.warning(
                    "no price for model %r: its calls are recorded as unpriced, not $0; "
                    "add it to the prices file (COALESCE_PRICES_FILE)",
                    model[:100],
                )
        return rates

    def price(self, model: str, when: float | None = None) -> Price | None:
        """The model's price at ``when`` (epoch seconds; now when None); None = unpriced."""
        rates = self._rates(model, when)
        return None if rates is None else rates.price()

    def cost_nano(
        self, model: str, prompt: int, completion: int, cached: int, when: float | None = None
    ) -> int | None:
        """Cost in integer nano-dollars (None = unpriced).

        ``cached`` tokens are part of ``prompt`` (OpenAI usage) and priced at the cache-read
        rate; long-context tiers from genai-prices apply as that package defines them.
        """
        rates = self._rates(model, when)
        if rates is None:
            return None
        cached = max(0, min(cached, prompt))
        if rates.tiered and rates.model_price is not None:
            usage = gp_types.Usage(
                input_tokens=prompt, cache_read_tokens=cached, output_tokens=completion
            )
            return _to_nano(rates.model_price.calc_price(usage)["total_price"])
        usd = (
            (prompt - cached) * rates.input
            + cached * rates.cached_input
            + completion * rates.output
        ) / _PER_M
        return _to_nano(usd)

    def cost(
        self, model: str, prompt: int, completion: int, cached: int, when: float | None = None
    ) -> float | None:
        """Cost in USD (None = unpriced); exact to the nano-dollar, see ``cost_nano``."""
        nano = self.cost_nano(model, prompt, completion, cached, when)
        return None if nano is None else nano / NANO_PER_USD
