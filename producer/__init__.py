"""What an app imports to use coalesce: the client, its records and its errors."""

from ._async_client import AsyncClient, AsyncTicket
from ._cache_admin import CacheStats
from ._client import Client, Ticket, build_request
from ._exceptions import (
    BrokerUnavailable,
    BudgetExceeded,
    CoalesceError,
    ConfigError,
    InvalidRequest,
    RequestFailed,
    RequestTimeout,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamStatusError,
    UpstreamTimeout,
)
from ._keys import request_key
from ._models import Answer, CacheControl, Request, Source
from ._settings import Settings, get_settings, load_settings
from ._validate import validate_request

__all__ = [
    "Answer",
    "AsyncClient",
    "AsyncTicket",
    "BrokerUnavailable",
    "BudgetExceeded",
    "CacheControl",
    "CacheStats",
    "Client",
    "CoalesceError",
    "ConfigError",
    "InvalidRequest",
    "Request",
    "RequestFailed",
    "RequestTimeout",
    "Settings",
    "Source",
    "Ticket",
    "UpstreamBadResponse",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "build_request",
    "get_settings",
    "load_settings",
    "request_key",
    "validate_request",
]
