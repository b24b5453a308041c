"""Cost ledger: prices (genai-prices + overrides), durable Redis ledger, reports with charts.

Modules: ``prices`` (PriceBook), ``records`` (rows, tag bounds, savings by lever), ``store``
(Ledger in Redis, Totals), ``report`` (table, JSON, daily report), ``html`` (page with SVG).
"""

from __future__ import annotations

from .prices import Price, PriceBook, PriceFileError
from .records import (
    LEVERS,
    CallRecord,
    RequestRecord,
    bounded_tags,
    levers_for,
    split_usd,
)
from .store import Ledger, Totals

__all__ = [
    "LEVERS",
    "CallRecord",
    "Ledger",
    "Price",
    "PriceBook",
    "PriceFileError",
    "RequestRecord",
    "Totals",
    "bounded_tags",
    "levers_for",
    "split_usd",
]
