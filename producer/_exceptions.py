"""Every error coalesce raises, in one tree.

CoalesceError
├── ConfigError            a setting is missing or invalid (raised at start-up)
├── InvalidRequest         bad input, raised before anything is enqueued (also a ValueError)
├── RequestFailed          the worker gave up on a request; the message says why
│   └── RequestTimeout     no answer arrived within the caller's timeout
└── UpstreamError          the model API failed after bounded retries
    ├── UpstreamTimeout    connect/read timeout or the request's deadline passed
    ├── UpstreamRateLimited  429 that outlasted the retry budget
    ├── UpstreamStatusError  a 4xx/5xx answer that retrying did not fix
    └── UpstreamBadResponse  a 2xx body that is not a chat completion
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
