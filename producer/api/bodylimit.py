"""The body size limit, checked before anything reads or parses a body.

A declared ``Content-Length`` over the limit is refused at once; a body sent without one is
counted as it arrives and refused as soon as it passes the limit, so no more than the limit is
ever held in memory.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError


def too_large(limit: int) -> str:
    return f"request body is larger than {limit} bytes (COALESCE_API_MAX_BODY_BYTES)"


class BodyLimit:
    """ASGI middleware: 413 in OpenAI's shape for a body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = ApiError(413, too_large(self.max_bytes), code="body_too_large").response()
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI lets an HTTPException from the body read through to the handlers.
                    raise HTTPException(413, too_large(self.max_bytes))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
