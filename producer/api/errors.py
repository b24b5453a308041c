"""Errors in OpenAI's shape, so the official SDKs raise the exception they would raise there.

Every failure leaves the API as ``{"error": {"message", "type", "param", "code"}}`` with the
status the SDKs map (400, 401, 403, 404, 413, 422, 429, 500, 502, 503, 504). Messages name the
problem and never quote prompt text or keys. A hard budget's refusal is a 429 of its own type,
``budget_exceeded``, which the SDKs are told not to retry.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._core import cause_chain
from .._exceptions import (
    BrokerUnavailable,
    BudgetExceeded,
    CoalesceError,
    InvalidRequest,
    RequestFailed,
    RequestTimeout,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamTimeout,
)

log = logging.getLogger("coalesce.api")

# The ``type`` OpenAI writes for each status.
TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}
UPSTREAM_RETRY_AFTER_S = 5  # what a client is told after the upstream's 429s outlasted retries
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
_STATUS = re.compile(r"(?:rejected [^(]*\(|upstream returned )(\d{3})\b")


class ApiError(Exception):
    """A reply the API gives instead of an answer; ``body()`` is OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        kind: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.kind = kind  # the body's ``type`` when not the status' usual one
        self.should_retry = should_retry  # ``x-should-retry``, which the OpenAI SDKs obey
        self.request_id: str | None = None

    def body(self) -> dict[str, Any]:
        usual = TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request")
        kind = self.kind or usual
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def headers(self) -> dict[str, str]:
        found = {"x-request-id": self.request_id} if self.request_id else {}
        if self.should_retry is not None:
            found["x-should-retry"] = "true" if self.should_retry else "false"
        if self.retry_after_s is None:
            return found
        wait = max(self.retry_after_s, 0.0)
        found["retry-after"] = str(math.ceil(wait))
        found["retry-after-ms"] = str(math.ceil(wait * 1000))
        return found

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**self.headers(), **(extra_headers or {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_exception(exc: BaseException, task_id: str | None = None) -> ApiError:
    """The reply for an error the producer raised while enqueueing or waiting; with a task id
    it carries ``x-request-id`` too."""
    error = _reply_for(exc, task_id)
    if task_id is not None:
        error.request_id = task_id
    return error


def _reply_for(exc: BaseException, task_id: str | None) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    for error in cause_chain(exc):
        mapped = _map_known(error, task_id)
        if mapped is not None:
            return mapped
    if isinstance(exc, RequestFailed):
        return _from_reason(str(exc), task_id)
    log.error("unexpected %s while serving request %s", type(exc).__name__, task_id)
    return ApiError(500, "internal error; the server log has the details", code="internal_error")


def _map_known(exc: BaseException, task_id: str | None) -> ApiError | None:
    """The reply for one exception of the producer's tree, or None if it is not one of them."""
    if isinstance(exc, InvalidRequest):
        text = str(exc).removeprefix("invalid request: ")
        found = _FIELD.match(text)
        return ApiError(400, text, param=found.group(1) if found else None)
    if isinstance(exc, BrokerUnavailable | RedisError):
        log.warning("Redis unavailable: %s: %s", type(exc).__name__, exc)
        return ApiError(503, "the queue is unavailable; try again shortly", retry_after_s=1)
    if isinstance(exc, RequestTimeout):
        return ApiError(504, timeout_message(task_id), code="timeout")
    if isinstance(exc, BudgetExceeded):
        return budget_error(exc)
    if isinstance(exc, UpstreamError):
        return _upstream(exc)
    return None


def budget_error(exc: BudgetExceeded) -> ApiError:
    """429 ``budget_exceeded`` until the period resets: Retry-After says when, and
    ``x-should-retry: false`` keeps the SDKs from retrying into the same refusal."""
    wait = exc.resets_at - time.time() if exc.resets_at else None
    return ApiError(
        429,
        str(exc),
        code="budget_exceeded",
        kind="budget_exceeded",
        retry_after_s=wait if wait is not None and wait > 0 else None,
        should_retry=False,
    )


def timeout_message(task_id: str | None) -> str:
    """504's message: the task keeps running, and its id retrieves the answer later."""
    return (
        f"no answer within the server's timeout; request {task_id} is still being answered "
        f"and can be retrieved with GET /v1/chat/completions/{task_id}"
    )


def _upstream(exc: UpstreamError) -> ApiError:
    reason = f"the model API failed: {exc}"
    if isinstance(exc, UpstreamRejected):
        status = exc.status_code if exc.status_code in (400, 413, 422) else 400
        return ApiError(status, f"the model API refused this request: {exc}", code=exc.code)
    if isinstance(exc, UpstreamRateLimited):
        return ApiError(
            429, reason, code="upstream_rate_limited", retry_after_s=UPSTREAM_RETRY_AFTER_S
        )
    if isinstance(exc, UpstreamTimeout):
        return ApiError(504, reason, code="upstream_timeout")
    if isinstance(exc, UpstreamStatusError) and exc.status_code in (403, 404):
        return ApiError(exc.status_code, reason, code="upstream_" + str(exc.status_code))
    return ApiError(502, reason, code="upstream_error")  # bad bodies, broken streams, 5xx, 401


_BY_NAME: dict[str, tuple[int, str | None]] = {
    "InvalidRequest": (400, None),
    "UpstreamRejected": (400, "upstream_rejected"),
    "UpstreamRateLimited": (429, "upstream_rate_limited"),
    "UpstreamTimeout": (504, "upstream_timeout"),
    "UpstreamError": (502, "upstream_error"),
    "UpstreamStatusError": (502, "upstream_error"),
    "UpstreamBadResponse": (502, "upstream_error"),
    "UpstreamStreamBroken": (502, "upstream_error"),
}


def _from_reason(reason: str, task_id: str | None) -> ApiError:
    """A stored failure known only by its text (``request X failed: <Type>: <why>``)."""
    _, _, rest = reason.partition(" failed: ")
    name, _, why = rest.partition(": ")
    status, code = _BY_NAME.get(name, (500, "request_failed"))
    said = _STATUS.search(why)
    kept = {"UpstreamRejected": (413, 422), "UpstreamStatusError": (403, 404)}.get(name, ())
    if said and int(said.group(1)) in kept:
        status = int(said.group(1))
    retry = UPSTREAM_RETRY_AFTER_S if status == 429 else None
    message = f"request {task_id} failed: {why or rest or reason}"
    return ApiError(status, message, code=code, retry_after_s=retry)


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation errors as one 400 naming each field, without quoting any value."""
    problems: list[str] = []
    first: str | None = None
    for err in exc.errors():
        where = field_path(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            problems.append("body: is not valid JSON")
            first = first or "body"
            continue
        problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
        first = first or where or "body"
    return ApiError(400, "; ".join(problems) or "invalid request body", param=first)


def field_path(loc: Any) -> str:
    """``("body", "messages", 2, "content")`` as ``messages[2].content``."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def install(app: FastAPI) -> None:
    """Route every error the app can raise through OpenAI's shape."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        messages = {404: f"no route {request.url.path}", 405: "method not allowed"}
        message = messages.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message).response(dict(exc.headers or {}))

    async def coalesce_error(request: Request, exc: Exception) -> Response:
        return from_exception(exc).response()

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal error", code="internal_error").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(CoalesceError, coalesce_error)
    app.add_exception_handler(RedisError, coalesce_error)
    app.add_exception_handler(Exception, unexpected)
