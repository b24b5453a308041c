"""The one place that talks HTTP to the model API (any OpenAI-compatible ``/chat/completions``).

``Upstream.chat`` and ``Upstream.chat_stream`` retry what is worth retrying (429, 408, 5xx,
connection problems, timeouts, malformed 2xx bodies) with capped exponential backoff and full
jitter, honouring ``Retry-After``, for as long as the caller's absolute deadline allows
(``policy``); they keep the calls in flight under an AIMD limit that finds what the provider
can take (``limiter``); and they turn every failure into an ``UpstreamError`` from
``producer._exceptions``: ``UpstreamRejected`` (400/413/422) means "this input was refused",
``UpstreamStreamBroken`` a stream that broke after text was delivered.

Privacy: the API key never appears in a log line, an exception message or a repr, and log
lines carry only status codes, attempt numbers and waits, never message contents.
"""

from producer._exceptions import UpstreamRejected, UpstreamStreamBroken

from .client import REJECTED_STATUSES, Upstream
from .limiter import AdaptiveLimit
from .policy import DEFAULT_ATTEMPTS, RetryPolicy, parse_retry_after
from .responses import Completion

__all__ = [
    "DEFAULT_ATTEMPTS",
    "REJECTED_STATUSES",
    "AdaptiveLimit",
    "Completion",
    "RetryPolicy",
    "Upstream",
    "UpstreamRejected",
    "UpstreamStreamBroken",
    "parse_retry_after",
]
