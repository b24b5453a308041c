"""What one API process holds for all its requests, built at start-up and closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis
from fastapi import Request

from .._settings import Settings
from .keys import KeyTable
from .limits import Limiter
from .ports import ChatClient

REDIS_CONNECTIONS = 64  # the limit script and readiness checks share these; requests queue


@dataclass
class ApiState:
    settings: Settings
    keys: KeyTable
    client: ChatClient
    redis: aioredis.Redis
    limiter: Limiter
    http: httpx.AsyncClient
    models: tuple[float, list[str]] | None = field(default=None)  # (fetched at, ids)

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.http.aclose()
        await self.redis.aclose()


def redis_for(settings: Settings) -> aioredis.Redis:
    """An asyncio Redis client whose pool makes callers wait rather than open more sockets."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=REDIS_CONNECTIONS, timeout=10, socket_connect_timeout=2
    )
    return aioredis.Redis(connection_pool=pool)


def get_state(request: Request) -> ApiState:
    state = getattr(request.app.state, "coalesce", None)
    if not isinstance(state, ApiState):
        raise RuntimeError("the API's state is not set up (lifespan did not run)")
    return state
