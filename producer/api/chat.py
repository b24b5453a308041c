"""``POST /v1/chat/completions``: admit, enqueue through AsyncClient.chat, answer like OpenAI.

Order of checks: body size (middleware), body shape (FastAPI), key, per-key limits, the
producer's validation (inside ``chat``, before anything is enqueued). A request that got a
2xx was answered; one that waited past ``COALESCE_API_TIMEOUT_S`` gets a 504 naming its task
id, and ``GET /v1/chat/completions/{id}`` fetches the answer later.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from .._exceptions import CoalesceError, RequestTimeout
from .auth import authenticate
from .controls import controls
from .errors import ApiError, from_exception
from .keys import Caller
from .limits import PREFIX, Slot
from .ports import ChatTicket
from .replies import completion, headers
from .schemas import ChatCompletion, ChatCompletionRequest, ErrorBody
from .state import ApiState, get_state
from .streaming import Budget, stream_reply

router = APIRouter(tags=["chat"])
OWNER_PREFIX = PREFIX + "owner:"  # task id -> tenant, for fetching a timed-out answer later
PENDING_RETRY_S = 2


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ErrorBody, "description": "OpenAI error shape"} for status in statuses
    }


CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A chat completion, or with stream=true server-sent chunk events",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "headers": {
            name: {"schema": {"type": "string"}, "description": text}
            for name, text in {
                "x-coalesce-source": "batched, single, dedup, cache, semantic or passthrough",
                "x-coalesce-similarity": "a semantic cache hit's similarity (only then)",
                "x-coalesce-batch-size": "questions in the upstream call",
                "x-coalesce-cost-usd": "this request's share of the call's cost",
                "x-request-id": "the task id",
            }.items()
        },
    },
    **_errors(400, 401, 403, 404, 413, 422, 429, 500, 502, 503, 504),
}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=CHAT_RESPONSES,
    summary="Create a chat completion (batched or passed through)",
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    caller: Annotated[Caller, Depends(authenticate)],
) -> Response:
    state = get_state(request)
    # The body as the app sent it (``body`` vouches for its shape): numbers keep their type
    # and every field this version does not know goes upstream untouched.
    fields = dict(await request.json())
    if "tenant" in fields:
        raise ApiError(400, "tenant: set by the API key, not by the body", param="tenant")
    messages, model = fields.pop("messages"), fields.pop("model")
    stream = bool(fields.pop("stream", None))
    cache, tags = controls(request.headers, fields)
    include_usage = stream and bool((fields.get("stream_options") or {}).get("include_usage"))
    slot = await state.limiter.acquire(caller)
    try:
        ticket = await state.client.chat(
            messages,
            model=model,
            tenant=caller.tenant,
            stream=stream,
            cache=cache,
            tags=tags,
            **fields,
        )
    except BaseException as exc:
        await slot.release()
        if isinstance(exc, CoalesceError):
            raise from_exception(exc) from None
        raise
    budget = Budget(state.settings.api_timeout_s)
    if stream:
        try:
            return await stream_reply(ticket, include_usage=include_usage, budget=budget, slot=slot)
        except ApiError as exc:
            await _note_timeout(state, exc, ticket.id, caller)
            raise
    return await _answer(state, ticket, caller, budget, slot)


async def _answer(
    state: ApiState, ticket: ChatTicket, caller: Caller, budget: Budget, slot: Slot
) -> Response:
    try:
        answer = await budget.within(ticket.get(timeout=budget.left()), ticket.id)
    except Exception as exc:  # every failure is an OpenAI-shaped reply naming the task
        error = from_exception(exc, ticket.id)
        await _note_timeout(state, error, ticket.id, caller)
        return error.response()
    finally:
        await slot.release()
    return JSONResponse(completion(answer, ticket.id), headers=headers(answer, ticket.id))


async def _note_timeout(state: ApiState, error: ApiError, task_id: str, caller: Caller) -> None:
    """After a 504, remember whose request this is, so only its tenant can fetch it later."""
    if error.status != 504:
        return
    ttl = state.settings.result_expires_s
    with contextlib.suppress(RedisError, OSError):  # best effort: the 504 goes out regardless
        await state.redis.set(OWNER_PREFIX + task_id, caller.tenant, ex=ttl)


@router.get(
    "/v1/chat/completions/{completion_id}",
    response_model=ChatCompletion,
    responses=_errors(401, 404, 500, 502, 503),
    summary="Fetch the answer of a request that timed out (504) earlier",
)
async def get_chat_completion(
    completion_id: str, request: Request, caller: Annotated[Caller, Depends(authenticate)]
) -> Response:
    state = get_state(request)
    task_id = completion_id.removeprefix("chatcmpl-")
    owner = await state.redis.get(OWNER_PREFIX + task_id) if len(task_id) <= 100 else None
    if owner is None or _text(owner) != caller.tenant:
        message = f"no retrievable request {completion_id[:100]}"
        raise ApiError(404, message, param="completion_id")
    ticket = state.client.ticket(task_id)
    try:
        answer = await ticket.get(timeout=0.05)
    except RequestTimeout:
        message = f"request {task_id} has no answer yet; try again"
        raise ApiError(404, message, code="not_ready", retry_after_s=PENDING_RETRY_S) from None
    except CoalesceError as exc:
        raise from_exception(exc, task_id) from None
    return JSONResponse(completion(answer, task_id), headers=headers(answer, task_id))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
