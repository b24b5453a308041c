"""``GET /v1/models``, ``/healthz`` and ``/readyz``.

Readiness asks Redis two cheap questions: ``PING``, and ``CLIENT LIST TYPE normal`` for a
connection whose last command was ``BRPOP``: that is how a Celery worker on the Redis
transport waits for tasks (it re-issues it at least once a second), and its connection goes
away with the process. No remote-control round trip to the workers is made.
"""

from __future__ import annotations

import time
from typing import Annotated

import httpx
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from .auth import authenticate
from .chat import _errors
from .errors import ApiError
from .keys import Caller
from .schemas import Health, ModelCard, ModelList, Readiness
from .state import ApiState, get_state

router = APIRouter()
MODELS_TTL_S = 60.0  # the upstream's model list is asked at most this often per process
UPSTREAM_MODELS_TIMEOUT_S = 10.0


@router.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis or the workers are missing"}},
    tags=["health"],
    summary="Redis answers and a worker is consuming",
)
async def readyz(request: Request) -> JSONResponse:
    verdict = await readiness(get_state(request).redis)
    status = 200 if verdict.status == "ready" else 503
    return JSONResponse(verdict.model_dump(), status_code=status)


async def readiness(redis: aioredis.Redis) -> Readiness:
    try:
        await redis.ping()
    except (aioredis.RedisError, OSError) as exc:
        return Readiness(status="not ready", redis=False, workers=False, reason=type(exc).__name__)
    try:
        clients = await redis.client_list(_type="normal")
    except (aioredis.RedisError, OSError) as exc:
        reason = f"cannot list Redis clients ({type(exc).__name__})"
        return Readiness(status="not ready", redis=True, workers=False, reason=reason)
    if any(client.get("cmd") == "brpop" for client in clients):
        return Readiness(status="ready", redis=True, workers=True)
    return Readiness(status="not ready", redis=True, workers=False, reason="no worker consuming")


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=_errors(401, 502),
    tags=["models"],
    summary="The models the upstream offers, or those configured",
)
async def list_models(request: Request, _: Annotated[Caller, Depends(authenticate)]) -> ModelList:
    ids = await model_ids(get_state(request))
    return ModelList(data=[ModelCard(id=model) for model in ids])


@router.get(
    "/v1/models/{model}",
    response_model=ModelCard,
    responses=_errors(401, 404, 502),
    tags=["models"],
    summary="One model, if it is offered",
)
async def get_model(
    model: str, request: Request, _: Annotated[Caller, Depends(authenticate)]
) -> ModelCard:
    if model not in await model_ids(get_state(request)):
        raise ApiError(404, f"model {model[:200]!r} is not offered", param="model")
    return ModelCard(id=model)


async def model_ids(state: ApiState) -> list[str]:
    """``COALESCE_API_MODELS`` if set, else the upstream's list (cached for a minute)."""
    configured = [name.strip() for name in state.settings.api_models.split(",") if name.strip()]
    if configured:
        return configured
    now = time.monotonic()
    if state.models is not None and now - state.models[0] < MODELS_TTL_S:
        return state.models[1]
    ids = await _fetch(state)
    state.models = (now, ids)
    return ids


async def _fetch(state: ApiState) -> list[str]:
    settings = state.settings
    headers = {}
    if settings.upstream_api_key is not None:
        headers["authorization"] = f"Bearer {settings.upstream_api_key.get_secret_value()}"
    try:
        reply = await state.http.get(
            f"{settings.upstream_url}/models", headers=headers, timeout=UPSTREAM_MODELS_TIMEOUT_S
        )
        reply.raise_for_status()
        data = reply.json()["data"]
        return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        message = f"the model API's model list is unavailable ({type(exc).__name__})"
        raise ApiError(502, message, code="upstream_error") from None
