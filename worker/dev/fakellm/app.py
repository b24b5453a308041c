"""The fake provider's HTTP app: routes, refusals (400/429), latency, plain and streamed replies."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .config import BadRequest, FakeConfig, as_dict, config_changes
from .protocol import (
    DONE,
    ChatRequest,
    Chunks,
    Reply,
    completion_body,
    error,
    event,
    malformed,
    parse_chat,
)
from .replies import build_reply, roll
from .state import Pass, State

MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "fake-1")

FILTERED = "Your request was rejected as a result of our safety system."
_FAST_CHUNKS = 4  # a stream without per-token latency comes in this many larger chunks


class EventStream(StreamingResponse):
    """A server-sent event stream that frees its call's slot however the stream ends."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        headers = {"cache-control": "no-cache"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    await asyncio.sleep(max(0.0, delay))


def _mentions(word: str, texts: tuple[str, ...]) -> bool:
    """Whether any text holds ``word`` as a whole word, ignoring case."""
    word = word.strip()
    if not word:
        return False
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    return any(pattern.search(text) for text in texts)


# --- refusals -----------------------------------------------------------------------------------


def _refusal(state: State, chat: ChatRequest) -> Response | None:
    """A 400 or 429 for a valid request the provider still will not take, else None.

    Order: a refused stream, the content filter, then the rate limit; so a refused call
    spends no rate budget, and ``concurrency_limit`` is checked last, by the caller.
    """
    config = state.config
    if chat.stream and config.stream_mode == "reject":
        state.bump("bad_requests")
        return error(
            400,
            "stream is not supported",
            "invalid_request_error",
            code="unsupported_value",
            param="stream",
        )
    if _mentions(config.reject_word, chat.texts):
        state.bump("rejected")
        return error(400, FILTERED, "invalid_request_error", code="content_filter")
    retry_after = state.bucket.take()
    if retry_after:
        state.bump("rate_limited")
        headers = {"Retry-After": str(retry_after)}
        message = "Rate limit reached for requests"
        return error(429, message, "rate_limit_error", code="rate_limit_exceeded", headers=headers)
    return None


def _too_many(state: State) -> Response:
    state.bump("rate_limited", "concurrency_limited")
    limit = state.config.concurrency_limit
    wait = state.config.retry_after_ms
    headers = {"retry-after-ms": str(wait)} if wait > 0 else None
    message = f"Too many concurrent requests: this model takes {limit} at a time. Retry later."
    return error(429, message, "rate_limit_error", code="rate_limit_exceeded", headers=headers)


async def _chat(state: State, request: Request) -> Response:
    """Validate, refuse what the knobs refuse, then answer inside the concurrency limits."""
    try:
        body = await request.json()
        chat = parse_chat(body)
    except ValueError as exc:  # includes invalid JSON
        state.bump("bad_requests")
        message = str(exc) if isinstance(exc, BadRequest) else "the body is not valid JSON"
        return error(400, message, "invalid_request_error")
    state.remember(body)
    refusal = _refusal(state, chat)
    if refusal is not None:
        return refusal
    ticket = state.gate.admit(state.config.concurrency_limit)
    if ticket is None:
        return _too_many(state)
    response: Response | None = None
    try:
        await ticket.start()
        response = await _answer(state, chat, ticket)
        return response
    finally:
        if not isinstance(response, EventStream):  # a stream frees its slot when it ends
            ticket.release()


# --- answers ------------------------------------------------------------------------------------


async def _answer(state: State, chat: ChatRequest, ticket: Pass) -> Response:
    """Draw every random decision first (keeps a seed's sequence stable), then wait and reply."""
    config, rng = state.config, state.rng
    started = time.monotonic()
    if roll(rng, config.error_rate):
        await _sleep_until(started + config.latency_ms / 1000)
        state.bump("errors")
        message = "The server had an error while processing your request."
        return error(500, message, "server_error")
    broken = rng.choice(("oops", "truncated")) if roll(rng, config.malformed_rate) else None
    reply = state.cache_prompt(chat, build_reply(rng, config, chat))
    if chat.stream and config.stream_mode == "on":
        events = _events(state, config, chat, reply, broken, started)
        return EventStream(events, ticket.release)
    delay_ms = config.latency_ms + config.latency_per_token_ms * reply.completion_tokens
    await _sleep_until(started + delay_ms / 1000)
    body = completion_body(chat, reply)
    if broken is not None:
        state.bump("malformed")
        return malformed(broken, body)
    state.record(chat, reply)
    return JSONResponse(body)


def _schedule(pieces: tuple[str, ...], per_token_ms: float) -> list[tuple[float, str]]:
    """(milliseconds after the first content, text) per chunk: one per token, or a few."""
    if per_token_ms > 0:
        return [(index * per_token_ms, piece) for index, piece in enumerate(pieces)]
    size = max(1, math.ceil(len(pieces) / _FAST_CHUNKS))
    return [(0.0, "".join(pieces[i : i + size])) for i in range(0, len(pieces), size)]


async def _events(
    state: State,
    config: FakeConfig,
    chat: ChatRequest,
    reply: Reply,
    broken: str | None,
    started: float,
) -> AsyncIterator[bytes]:
    """The stream: first content after ``latency_ms``, then a chunk per token; a broken one
    is either a single non-chunk event or cut off halfway without a finish or ``[DONE]``."""
    chunks = Chunks(chat)
    first = started + config.latency_ms / 1000
    await _sleep_until(first)
    if broken == "oops":
        state.bump("malformed")
        yield event({"oops": True})
        yield DONE
        return
    schedule = _schedule(reply.pieces, config.latency_per_token_ms)
    cut = len(schedule) // 2 if broken == "truncated" else len(schedule)
    yield chunks.first(reply)
    for offset_ms, text in schedule[:cut]:
        await _sleep_until(first + offset_ms / 1000)
        if text:
            yield chunks.piece(reply, text)
    if broken is not None:
        state.bump("malformed")
        return
    state.record(chat, reply, streamed=True)
    yield chunks.delta({}, reply.finish_reason)
    if chat.include_usage:
        yield chunks.usage(reply)
    yield DONE


# --- the app ------------------------------------------------------------------------------------


async def _set_config(state: State, request: Request) -> Response:
    try:
        state.reconfigure(config_changes(await request.json()))
    except ValueError as exc:  # bad JSON, bad field, or out of range (FakeConfig.__post_init__)
        message = (
            "the body is not valid JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
        )
        return error(400, message, "invalid_request_error")
    return JSONResponse(as_dict(state.config))


def _models_body() -> dict[str, object]:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "fakellm"} for m in MODEL_IDS]
    return {"object": "list", "data": data}


def create_app(config: FakeConfig) -> FastAPI:
    """A fresh fake provider; it copies ``config``, so change knobs through ``POST /config``."""
    state = State(config)
    app = FastAPI(title="fakellm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fake = state

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _chat(state, request)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(_models_body())

    @app.get("/stats")
    async def stats() -> Response:
        return JSONResponse(state.snapshot())

    @app.post("/stats/reset")
    async def reset_stats() -> Response:
        state.reset()
        return JSONResponse(state.snapshot())

    @app.get("/debug/last")
    async def last_body() -> Response:
        """The last chat body received, as sent: tests check what reached the provider."""
        return JSONResponse({"body": state.bodies[-1] if state.bodies else None})

    @app.get("/debug/bodies")
    async def bodies() -> Response:
        return JSONResponse({"bodies": list(state.bodies)})

    @app.get("/config")
    async def get_config() -> Response:
        return JSONResponse(as_dict(state.config))

    @app.post("/config")
    async def set_config(request: Request) -> Response:
        return await _set_config(state, request)

    return app


def serve(
    config: FakeConfig, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"
) -> None:
    """Run the fake until interrupted (blocking); the access log stays off by design."""
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, access_log=False)
