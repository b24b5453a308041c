"""The one place that talks HTTP to the model API (any OpenAI-compatible ``/chat/completions``).

``Upstream`` wraps a single pooled ``httpx.AsyncClient``, bounds the calls in flight with a
semaphore, retries what is worth retrying (429, 408, 5xx, connection problems, timeouts and
malformed 2xx bodies) with capped exponential backoff and full jitter, honours ``Retry-After``
and an absolute ``deadline``, and turns every failure into one of the ``UpstreamError``
subclasses from ``producer._exceptions``.

Privacy: the API key never appears in a log line, an exception message or a repr, and log
lines carry only status codes, attempt numbers and waits, never message contents.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

import httpx

from producer._exceptions import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStatusError,
    UpstreamTimeout,
)

__all__ = ["Completion", "RetryPolicy", "Upstream", "parse_retry_after"]

logger = logging.getLogger("coalesce.upstream")

_MAX_DETAIL_CHARS = 300
_REDACTED = "***"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a failed upstream call."""

    attempts: int = 5  # total tries, including the first
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    max_retry_after_s: float = 30.0  # a longer Retry-After fails with UpstreamRateLimited

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if min(self.base_delay_s, self.max_delay_s, self.max_retry_after_s) < 0:
            raise ValueError("RetryPolicy delays must not be negative")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Backoff before retry number ``attempt + 1`` (``attempt`` is 0 after the first try).

        Exponential backoff with full jitter: uniform(0, min(max_delay_s, base * 2**attempt)).
        """
        exponent = min(max(attempt, 0), 60)  # 2**60 already dwarfs any sane max_delay_s
        cap = min(self.max_delay_s, self.base_delay_s * 2.0**exponent)
        return rng.uniform(0.0, cap)


@dataclass(frozen=True)
class Completion:
    """The parts of a chat completion the worker needs."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    model: str


_Kind = Literal["status", "rate_limited", "timeout", "network", "bad_response"]


@dataclass(frozen=True)
class _Failure:
    """A retryable outcome of one try."""

    kind: _Kind
    detail: str  # safe to show: never the API key, never prompt text we sent
    status: int = 0
    retry_after: float | None = None

    @property
    def label(self) -> str:
        """Short description for log lines (no upstream-provided text)."""
        if self.kind in ("status", "rate_limited"):
            return f"status {self.status}"
        if self.kind == "bad_response":
            return "malformed response"
        return self.detail.split(":", 1)[0]


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


def _token_count(usage: Any, field: str) -> int:
    value = usage.get(field) if isinstance(usage, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def _parse_completion(response: httpx.Response, requested_model: str) -> Completion | _Failure:
    """Read a 2xx body; anything that is not a chat completion is a retryable failure."""
    try:
        body = response.json()
    except ValueError:
        return _Failure("bad_response", "body is not JSON", response.status_code)
    if not isinstance(body, dict):
        return _Failure("bad_response", "body is not a JSON object", response.status_code)
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        return _Failure(
            "bad_response", "no choices[0].message.content string", response.status_code
        )
    assert isinstance(choice, dict)
    finish = choice.get("finish_reason")
    model = body.get("model")
    usage = body.get("usage")
    return Completion(
        text=text,
        prompt_tokens=_token_count(usage, "prompt_tokens"),
        completion_tokens=_token_count(usage, "completion_tokens"),
        finish_reason=finish if isinstance(finish, str) else "unknown",
        model=model if isinstance(model, str) and model else requested_model,
    )


def _error_detail(response: httpx.Response) -> str:
    """The upstream's own error message (``{"error": {"message": ...}}`` and kin), or its text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        if not isinstance(message, str):
            message = body.get("message", body.get("detail"))
    if not isinstance(message, str):
        message = response.text if body is None else str(body)
    message = " ".join(message.split())
    if len(message) > _MAX_DETAIL_CHARS:
        message = message[: _MAX_DETAIL_CHARS - 3] + "..."
    return message or response.reason_phrase or "no error message"


def _plural(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class Upstream:
    """Async client for an OpenAI-compatible chat completions API.

    One instance owns one pooled ``httpx.AsyncClient``; use it as an async context manager or
    call ``aclose()``. ``calls`` counts HTTP requests sent and ``retries`` counts re-tries.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        concurrency: int = 16,
        retry: RetryPolicy = RetryPolicy(),  # frozen, so a shared default is safe
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = base_url.rstrip("/")
        self._url = f"{self.base_url}/chat/completions"
        self._api_key = api_key or None
        self._timeout_s = timeout_s
        self._concurrency = concurrency
        self.retry = retry
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._semaphore: asyncio.Semaphore | None = None
        self._semaphore_loop: asyncio.AbstractEventLoop | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            transport=transport,
        )
        self.calls = 0
        self.retries = 0

    def __repr__(self) -> str:
        auth = "yes" if self._api_key else "no"
        return f"Upstream(base_url={self.base_url!r}, auth={auth}, concurrency={self._concurrency})"

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def chat(
        self,
        *,
        model: str,
        messages: list[dict[str, str]],
        temperature: float = 0.0,
        max_tokens: int | None = None,
        deadline: float | None = None,
    ) -> Completion:
        """One chat completion, retried per ``self.retry``; raises an ``UpstreamError``.

        ``deadline`` is an absolute ``time.monotonic()`` value: no try or wait starts that
        would pass it, and each try is cut off at it (``UpstreamTimeout``).
        """
        payload: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        attempts = self.retry.attempts
        failure: _Failure | None = None
        for attempt in range(attempts):
            if failure is not None:
                await self._wait_before_retry(failure, attempt, deadline)
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                raise UpstreamTimeout(f"request deadline passed before attempt {attempt + 1}")
            outcome = await self._try_once(payload, model, attempt, deadline)
            if isinstance(outcome, Completion):
                return outcome
            failure = outcome
        assert failure is not None
        raise self._exhausted(failure, attempts)

    # -- one try -----------------------------------------------------------------------------

    def _get_semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._semaphore_loop is not loop:
            self._semaphore = asyncio.Semaphore(self._concurrency)
            self._semaphore_loop = loop
        return self._semaphore

    def _try_timeout(self, deadline: float | None) -> httpx.Timeout:
        limit = self._timeout_s
        remaining = _remaining(deadline)
        if remaining is not None:
            limit = max(0.001, min(limit, remaining))
        return httpx.Timeout(limit, connect=min(5.0, limit))

    async def _try_once(
        self, payload: dict[str, Any], model: str, attempt: int, deadline: float | None
    ) -> Completion | _Failure:
        """Send one request (waiting for a free slot first) and classify what came back."""
        try:
            async with asyncio.timeout(_remaining(deadline)), self._get_semaphore():
                self.calls += 1
                response = await self._client.post(
                    self._url, json=payload, timeout=self._try_timeout(deadline)
                )
        except httpx.TimeoutException as exc:
            return _Failure("timeout", type(exc).__name__)
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
            return _Failure("network", f"{type(exc).__name__}: {self._redact(str(exc))}")
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {self._redact(str(exc))}"
            raise UpstreamError(f"upstream request failed: {detail}") from exc
        except TimeoutError:
            raise UpstreamTimeout(f"request deadline passed during attempt {attempt + 1}") from None
        return self._classify(response, model)

    def _classify(self, response: httpx.Response, model: str) -> Completion | _Failure:
        """Completion, retryable failure, or raise for a status that retrying will not fix."""
        status = response.status_code
        if 200 <= status < 300:
            return _parse_completion(response, model)
        detail = self._redact(_error_detail(response))
        if status == 429:
            return _Failure("rate_limited", detail, status, parse_retry_after(response.headers))
        if status >= 500 or status == 408:
            return _Failure("status", detail, status)
        raise UpstreamStatusError(f"upstream returned {status}: {detail}", status)

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, _REDACTED)
        return text

    # -- between tries -----------------------------------------------------------------------

    def _wait_for(self, failure: _Failure, attempt: int) -> float:
        """Seconds to wait before try number ``attempt + 1`` (``attempt`` tries were made)."""
        retry_after = failure.retry_after if failure.kind == "rate_limited" else None
        if retry_after is None:
            return self.retry.delay(attempt - 1, self._rng)
        if retry_after > self.retry.max_retry_after_s:
            raise UpstreamRateLimited(
                f"upstream returned 429 with Retry-After {retry_after:g}s, more than the "
                f"{self.retry.max_retry_after_s:g}s limit, after {_plural(attempt)}"
            )
        return retry_after

    async def _wait_before_retry(
        self, failure: _Failure, attempt: int, deadline: float | None
    ) -> None:
        wait = self._wait_for(failure, attempt)
        remaining = _remaining(deadline)
        if remaining is not None and wait >= remaining:
            raise UpstreamTimeout(
                f"request deadline would pass during the {wait:.2f}s wait after "
                f"{failure.label} on attempt {attempt}"
            )
        self.retries += 1
        logger.info(
            "upstream %s on attempt %d/%d; retrying in %.2fs",
            failure.label,
            attempt,
            self.retry.attempts,
            wait,
        )
        await self._sleep(wait)

    @staticmethod
    def _exhausted(failure: _Failure, attempts: int) -> UpstreamError:
        tries = _plural(attempts)
        if failure.kind == "rate_limited":
            return UpstreamRateLimited(f"upstream returned 429 after {tries}: {failure.detail}")
        if failure.kind == "timeout":
            return UpstreamTimeout(f"upstream timed out ({failure.detail}) after {tries}")
        if failure.kind == "bad_response":
            return UpstreamBadResponse(
                f"upstream returned a malformed response after {tries}: {failure.detail}"
            )
        if failure.kind == "network":
            return UpstreamError(f"could not reach upstream after {tries}: {failure.detail}")
        return UpstreamStatusError(
            f"upstream returned {failure.status} after {tries}: {failure.detail}", failure.status
        )
