"""Every error coalesce raises, in one tree.

CoalesceError
├── ConfigError            a setting is missing or invalid (raised at start-up)
├── InvalidRequest         bad input, raised before anything is enqueued (also a ValueError)
├── BrokerUnavailable      Redis did not answer a submit within COALESCE_SUBMIT_RETRY_S
├── BudgetExceeded         a hard budget (COALESCE_BUDGETS) refused the request; nothing enqueued
├── RequestFailed          the worker gave up on a request; the message says why
│   └── RequestTimeout     no answer arrived within the caller's timeout
└── UpstreamError          the model API failed after bounded retries
    ├── UpstreamTimeout    connect/read timeout or the request's deadline passed
    ├── UpstreamRateLimited  429 that outlasted the retry budget
    ├── UpstreamStatusError  a 4xx/5xx answer that retrying did not fix (401/403/404: every request)
    │   └── UpstreamRejected   400/413/422: this input was refused (``.code``: content_filter, ...)
    ├── UpstreamBadResponse  a 2xx body that is not a chat completion
    └── UpstreamStreamBroken a stream broke after some text arrived (``.partial_text``)

Every exception here pickles with its attributes (Celery stores them).
"""

from __future__ import annotations


class CoalesceError(Exception):
    """Base class: catch this to catch anything coalesce raises on purpose."""


class ConfigError(CoalesceError):
    """A setting is missing or invalid; the message names the setting."""


class InvalidRequest(CoalesceError, ValueError):
    """A request was rejected before it was enqueued; the message names the field."""


class RequestFailed(CoalesceError):
    """The worker stored a failure for this request."""


class RequestTimeout(RequestFailed, TimeoutError):
    """No result arrived before the caller's timeout; the request may still be answered."""


class UpstreamError(CoalesceError):
    """The upstream model API could not produce an answer."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamRateLimited(UpstreamError):
    pass


class UpstreamStatusError(UpstreamError):
    def __init__(self, message: str, status_code: int = 0) -> None:
        super().__init__(message)
        self.status_code = status_code

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (type(self), (str(self), self.status_code))


class UpstreamBadResponse(UpstreamError):
    pass


class UpstreamRejected(UpstreamStatusError):
    """The provider refused this input (400, 413, 422): content filter, context length, ...

    It concerns this request, not the service, so a batch caller can split the batch to find
    the request at fault. ``code`` is the provider's error code when it gave one.
    """

    def __init__(self, message: str, status_code: int = 0, code: str | None = None) -> None:
        super().__init__(message, status_code)
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, int, str | None]]:  # type: ignore[override]
        return (type(self), (str(self), self.status_code, self.code))


class UpstreamStreamBroken(UpstreamError):
    """A streamed answer broke off after some of its text had been delivered.

    ``partial_text`` is what arrived; it is kept out of the message (and so out of logs and
    stored failure reasons) because it is answer text.
    """

    def __init__(self, message: str, partial_text: str = "") -> None:
        super().__init__(message)
        self.partial_text = partial_text

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (str(self), self.partial_text))


class BrokerUnavailable(CoalesceError):
    """Redis (broker and result store) could not take a request within the retry budget.

    The message names the Redis address (password masked) and the last connection problem,
    so the operator knows what to fix. ``enqueued`` holds the task ids a ``submit_many`` had
    already enqueued before giving up (``Client.ticket(id)`` still reaches them).
    """

    def __init__(self, message: str, enqueued: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.enqueued = enqueued

    def __reduce__(self) -> tuple[type, tuple[str, tuple[str, ...]]]:
        return (type(self), (str(self), self.enqueued))


class BudgetExceeded(CoalesceError):
    """A hard budget rule refused the request before it was enqueued (nothing was sent).

    The message names the scope, the period and when it resets, e.g. "budget exceeded: tenant
    acme spent $10.02 of its $10.00 daily hard limit; resets at 00:00 UTC". ``scope`` is the
    rule's scope (``"tenant:acme"``), ``period`` ``"day"`` or ``"month"``, and ``resets_at``
    the epoch second the period ends (the API's Retry-After).
    """

    def __init__(
        self, message: str, scope: str = "", period: str = "", resets_at: float = 0.0
    ) -> None:
        super().__init__(message)
        self.scope = scope
        self.period = period
        self.resets_at = resets_at

    def __reduce__(self) -> tuple[type, tuple[str, str, str, float]]:
        return (type(self), (str(self), self.scope, self.period, self.resets_at))
