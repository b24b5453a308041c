"""The FastAPI application: routes, error shapes, the body limit and per-process state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from .._settings import Settings, get_settings
from . import chat, errors, meta
from .bodylimit import BodyLimit
from .keys import KeyTable, load_keys
from .limits import Limiter
from .ports import ChatClient
from .state import ApiState, redis_for

ClientFactory = Callable[[Settings], ChatClient]


def default_client(settings: Settings) -> ChatClient:
    """The producer's AsyncClient: one listener for every request this process waits on."""
    from .._async_client import AsyncClient

    return AsyncClient(settings=settings)


def create_app(
    settings: Settings | None = None,
    *,
    client_factory: ClientFactory = default_client,
    keys: KeyTable | None = None,
) -> FastAPI:
    """The app; ConfigError at once (naming the variable) if no key is configured."""
    settings = settings or get_settings()
    keys = keys if keys is not None else load_keys(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_for(settings)
        state = ApiState(
            settings=settings,
            keys=keys,
            client=client_factory(settings),
            redis=redis,
            limiter=Limiter(redis, settings),
            http=httpx.AsyncClient(),
        )
        app.state.coalesce = state
        try:
            yield
        finally:
            await state.aclose()

    app = FastAPI(
        title="coalesce",
        summary="An OpenAI-compatible front door: requests are batched, deduplicated or "
        "passed through, and answered like OpenAI answers them.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(chat.router)
    app.include_router(meta.router)
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    return app
