"""Who is calling: the API key from ``Authorization: Bearer`` (or an ``api-key`` header).

Only the bearer scheme is declared in the OpenAPI document (it is what the OpenAI SDKs send);
the ``api-key`` header, which Azure-style clients send, is accepted as well.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .keys import Caller
from .state import get_state

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The caller behind the presented key; 401 if it is missing or unknown."""
    if credentials is not None:
        presented: str | None = credentials.credentials
    else:
        presented = request.headers.get("api-key")
    caller = get_state(request).keys.find(presented)
    if caller is not None:
        return caller
    if not presented:
        message = "missing API key: send 'Authorization: Bearer <key>'"
        raise ApiError(401, message, code="missing_api_key")
    raise ApiError(401, "invalid API key", code="invalid_api_key")
