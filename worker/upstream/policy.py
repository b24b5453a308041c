"""How long to keep retrying and how long to wait between tries."""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

# Tries when neither a deadline nor ``RetryPolicy.attempts`` bounds them.
DEFAULT_ATTEMPTS = 5


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for retryable failures; the caller's deadline, not a count, bounds the tries.

    ``attempts`` (total tries, including the first) is an optional extra cap: None means "until
    the deadline", and ``DEFAULT_ATTEMPTS`` when there is no deadline either.
    """

    attempts: int | None = None
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    max_retry_after_s: float = 30.0  # a longer Retry-After gives up at once

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1 (or None)")
        if min(self.base_delay_s, self.max_delay_s, self.max_retry_after_s) < 0:
            raise ValueError("RetryPolicy delays must not be negative")

    def max_tries(self, deadline: float | None) -> int | None:
        """The cap on tries for one call; None when only the deadline bounds them."""
        if self.attempts is not None:
            return self.attempts
        return DEFAULT_ATTEMPTS if deadline is None else None

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Backoff before retry number ``attempt + 1`` (``attempt`` is 0 after the first try).

        Full jitter (uniform(0, min(max_delay_s, base * 2**attempt))) spreads out the retries
        of calls that failed together, so they do not hit the provider again in one burst.
        """
        exponent = min(max(attempt, 0), 60)  # 2**60 already dwarfs any sane max_delay_s
        cap = min(self.max_delay_s, self.base_delay_s * 2.0**exponent)
        return rng.uniform(0.0, cap)


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait according to ``retry-after-ms`` or ``Retry-After``; None if absent/bad.

    ``Retry-After`` may be delta-seconds or an HTTP date; a date in the past means 0.
    """
    millis = _parse_seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _parse_seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, delta)


def _parse_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
