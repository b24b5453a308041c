"""A fake OpenAI-compatible chat completions server for tests, the demo and benchmarks.

It answers deterministically (see :func:`expected_answer`), so a test can check that every answer
reached the caller that asked for it, and it misbehaves on demand (latency, noisy or incomplete
batched replies, 500s, malformed bodies, 429s, a bounded queue), so the worker's recovery paths
run against real HTTP rather than mocks. Knobs can be changed live through ``POST /config``.

It never logs prompt contents or request headers: uvicorn's access log is off in :func:`serve`
and the app itself logs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from worker.batching.prompt import BATCH_INSTRUCTIONS
from worker.tokens import chat_prompt_tokens, count_tokens, truncate_tokens

__all__ = [
    "MODEL_IDS",
    "FakeConfig",
    "count_tokens",
    "create_app",
    "expected_answer",
    "group_system",
    "prompt_tokens",
    "serve",
    "split_batch",
]

MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "fake-1")

_PROBABILITIES = ("noise", "drop", "error_rate", "malformed_rate")
_NON_NEGATIVE = ("latency_ms", "latency_per_token_ms", "rate_limit", "max_concurrency")
_INT_FIELDS = frozenset({"max_concurrency", "seed"})


@dataclass
class FakeConfig:
    """Knobs of the fake provider; the defaults make a perfect, instant, unlimited one."""

    latency_ms: float = 0
    latency_per_token_ms: float = 0
    noise: float = 0.0
    drop: float = 0.0
    error_rate: float = 0.0
    malformed_rate: float = 0.0
    rate_limit: float = 0.0
    max_concurrency: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


# --- token counting -----------------------------------------------------------------------------


def prompt_tokens(contents: list[str]) -> int:
    """Prompt tokens the way OpenAI bills chat messages: content plus 4 per message, plus 3."""
    return chat_prompt_tokens([{"content": text} for text in contents])


def _truncate(content: str, max_tokens: int | None) -> tuple[str, int, str]:
    """(content, completion tokens, finish_reason) after applying the caller's ``max_tokens``."""
    tokens = count_tokens(content)
    if max_tokens is not None and tokens > max_tokens:
        return truncate_tokens(content, max_tokens), max_tokens, "length"
    return content, tokens, "stop"


# --- deterministic answers ----------------------------------------------------------------------

_WORDS = (
    "river", "stone", "light", "quiet", "garden", "signal", "paper", "window",
    "morning", "number", "silver", "market", "engine", "forest", "bridge", "winter",
    "simple", "careful", "bright", "steady", "measure", "travel", "gather", "follow",
    "change", "build", "carry", "notice", "harbor", "letter", "summer", "valley",
    "copper", "circle", "pattern", "season", "shelter", "question", "reason", "moment",
    "balance", "orbit", "thread", "canvas", "meadow", "anchor", "lantern", "compass",
    "the", "of", "and", "with", "under", "across", "between", "through",
    "every", "small", "large", "early", "late", "open", "clear", "warm",
)  # fmt: skip


def _byte_stream(seed: bytes) -> Iterator[int]:
    """An endless, platform-independent stream of pseudo-random bytes derived from ``seed``."""
    counter = 0
    while True:
        yield from hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1


def _sentence(stream: Iterator[int], count: int, end: str = ".") -> str:
    words = [_WORDS[next(stream) % len(_WORDS)] for _ in range(count)]
    for index in range(count - 1):
        if next(stream) % 9 == 0:
            words[index] += ","
    words[0] = words[0].capitalize()
    return " ".join(words) + end


def expected_answer(model: str, system: str | None, question: str) -> str:
    """The answer the fake gives to ``question``, alone or inside a batch; unique per input.

    It starts with ``ans-<10 hex>`` so tests can tell answers apart; about one in five is a
    sentence followed by a short numbered list, because real answers span lines too.
    """
    key = json.dumps([model, system or None, question.strip()])
    digest = hashlib.sha256(key.encode()).digest()
    stream = _byte_stream(digest)
    head = f"ans-{digest.hex()[:10]}"
    words = 5 + next(stream) % 35  # 6..40 words counting the head
    if next(stream) % 5:
        return f"{head} {_sentence(stream, words)}"
    lines = [f"{head} {_sentence(stream, max(3, words // 2), end=':')}"]
    for number in range(1, 3 + next(stream) % 2):
        lines.append(f"{number}. {_sentence(stream, 2 + next(stream) % 5)}")
    return "\n".join(lines)


# --- batched prompts ----------------------------------------------------------------------------

_MARKER_RE = re.compile(r"=== Q(\d+) (\S+) ===")
_END_RE = re.compile(r"=== END (\S+) ===")


def split_batch(text: str) -> list[tuple[int, str]] | None:
    """The (label, question) pairs of a batched prompt, or None when ``text`` is a plain prompt.

    Only markers carrying the first marker's nonce count, like the worker's own parser.
    """
    questions: list[tuple[int, list[str]]] = []
    nonce: str | None = None
    for line in text.split("\n"):
        marker = _MARKER_RE.fullmatch(line.strip())
        if nonce is None:
            if marker:
                nonce = marker.group(2)
                questions.append((int(marker.group(1)), []))
            continue
        if marker and marker.group(2) == nonce:
            questions.append((int(marker.group(1)), []))
            continue
        end = _END_RE.fullmatch(line.strip())
        if end and end.group(1) == nonce:
            return [(label, "\n".join(body).strip()) for label, body in questions]
        questions[-1][1].append(line)
    return None


def group_system(system: str | None) -> str | None:
    """The group's own system prompt inside a batch system message (None when it had none)."""
    suffix = "\n\n" + BATCH_INSTRUCTIONS
    if system is None or system == BATCH_INSTRUCTIONS:
        return None
    if system.endswith(suffix):
        return system[: -len(suffix)] or None
    return system


# --- reply shapes -------------------------------------------------------------------------------

_LABELS = {
    "canonical": "A{n}: {text}",
    "bold": "**A{n}:** {text}",
    "answer": "Answer {n}: {text}",
    "bracket": "A[{n}]: {text}",
    "heading": "### A{n}\n{text}",
}
_PREAMBLES = (
    "Sure! Here are the answers:",
    "Here are the answers to your questions.",
    "Of course. Answering each question in turn:",
)
_SIGNOFFS = (
    "Let me know if you need anything else!",
    "I hope this helps.",
    "Feel free to ask if anything is unclear.",
)


@dataclass(frozen=True)
class _Shape:
    """How a batched reply is laid out; the default is the canonical one the prompt asks for."""

    label: str = "canonical"
    preamble: str | None = None
    signoff: str | None = None
    order: tuple[int, ...] | None = None
    gap: str = "\n"


def _pick_shape(rng: random.Random, count: int) -> _Shape:
    """A random mix of shapes real models produce; never identical to the canonical layout."""
    label = rng.choice(list(_LABELS))
    preamble = rng.choice(_PREAMBLES) if rng.random() < 0.4 else None
    signoff = rng.choice(_SIGNOFFS) if rng.random() < 0.4 else None
    order = _shuffled(rng, count) if count > 1 and rng.random() < 0.3 else None
    gap = "\n\n" if rng.random() < 0.5 else "\n"
    if label == "canonical" and preamble is None and signoff is None and order is None:
        label = rng.choice([name for name in _LABELS if name != "canonical"])
    return _Shape(label, preamble, signoff, order, gap)


def _shuffled(rng: random.Random, count: int) -> tuple[int, ...]:
    order = list(range(count))
    rng.shuffle(order)
    if order == sorted(order):
        order = order[1:] + order[:1]
    return tuple(order)


def _render(answers: list[tuple[int, str]], shape: _Shape) -> str:
    if shape.order is not None:
        answers = [answers[index] for index in shape.order]
    template = _LABELS[shape.label]
    body = shape.gap.join(template.format(n=label, text=text) for label, text in answers)
    if shape.preamble:
        body = f"{shape.preamble}\n{body}"
    if shape.signoff:
        body = f"{body}\n\n{shape.signoff}"
    return body


# --- requests and replies -----------------------------------------------------------------------


class _BadRequest(ValueError):
    """The request body is not a chat completion request we can answer (HTTP 400)."""


@dataclass(frozen=True)
class _ChatRequest:
    model: str
    system: str | None
    prompt: str
    prompt_tokens: int
    max_tokens: int | None


@dataclass(frozen=True)
class _Reply:
    content: str
    finish_reason: str
    completion_tokens: int
    questions: int = 1
    batched: bool = False
    noisy: bool = False
    dropped: bool = False


def _content_text(content: object) -> str:
    """Message content as text: a string, or the text parts of an OpenAI content-part list."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(part for part in parts if isinstance(part, str))
    raise _BadRequest("message content must be a string or an array of content parts")


def _message(message: object) -> tuple[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _BadRequest("each message must be an object with a string 'role'")
    return message["role"], _content_text(message.get("content"))


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest("'max_tokens' must be a positive integer")
    return int(value)


def _parse_chat(body: object) -> _ChatRequest:
    """Validate a chat completion request; messages never appear in the error text."""
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _BadRequest("'messages' must be a non-empty array")
    if body.get("stream"):
        raise _BadRequest("streaming is not supported by the fake")
    messages = [_message(item) for item in raw]
    users = [text for role, text in messages if role == "user"]
    if not users:
        raise _BadRequest("'messages' must contain a user message")
    systems = [text for role, text in messages if role in ("system", "developer")]
    return _ChatRequest(
        model=model,
        system="\n\n".join(systems) or None,
        prompt=users[-1],
        prompt_tokens=prompt_tokens([text for _, text in messages]),
        max_tokens=_max_tokens(body),
    )


def _roll(rng: random.Random, probability: float) -> bool:
    return probability > 0 and rng.random() < probability


def _build_reply(rng: random.Random, config: FakeConfig, chat: _ChatRequest) -> _Reply:
    """The completion for ``chat``; all random choices happen here, before any await."""
    batch = split_batch(chat.prompt)
    if batch is None:
        answer = expected_answer(chat.model, chat.system, chat.prompt)
        content, tokens, finish = _truncate(answer, chat.max_tokens)
        return _Reply(content, finish, tokens)
    system = group_system(chat.system)
    answers = [(label, expected_answer(chat.model, system, text)) for label, text in batch]
    dropped = bool(answers) and _roll(rng, config.drop)
    if dropped:
        del answers[rng.randrange(len(answers))]
    noisy = _roll(rng, config.noise)
    shape = _pick_shape(rng, len(answers)) if noisy else _Shape()
    content, tokens, finish = _truncate(_render(answers, shape), chat.max_tokens)
    return _Reply(content, finish, tokens, len(batch), True, noisy, dropped)


def _completion_body(chat: _ChatRequest, reply: _Reply) -> dict[str, Any]:
    message = {"role": "assistant", "content": reply.content}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
        ],
        "usage": {
            "prompt_tokens": chat.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": chat.prompt_tokens + reply.completion_tokens,
        },
    }


def _malformed(kind: str, body: dict[str, Any]) -> Response:
    """A 200 whose body is not a chat completion, as flaky gateways sometimes send."""
    if kind == "oops":
        return JSONResponse({"oops": True})
    text = json.dumps(body)
    return Response(text[: len(text) // 2], media_type="application/json")


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- live state ---------------------------------------------------------------------------------


class _TokenBucket:
    """Requests-per-second limit with burst max(1, rate); a rate of 0 means unlimited."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> int:
        """0 when the call may go ahead, else the whole seconds to wait before retrying (>= 1)."""
        if self.rate <= 0:
            return 0
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0
        return max(1, math.ceil((1 - self.tokens) / self.rate))


class _Gate:
    """At most ``limit`` calls in progress (0 = unlimited); the rest wait, like a provider queue.

    A live limit change builds a new semaphore for calls that arrive afterwards; calls already
    holding the old one release that one. The counters change without awaits, so no lock.
    """

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit) if limit > 0 else None
        self.in_flight = 0
        self.max_in_flight = 0

    def resize(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit) if limit > 0 else None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        semaphore = self.semaphore
        if semaphore is not None:
            await semaphore.acquire()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            if semaphore is not None:
                semaphore.release()


@dataclass
class _Stats:
    calls: int = 0
    batched_calls: int = 0
    questions: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    rate_limited: int = 0
    malformed: int = 0
    bad_requests: int = 0
    noisy: int = 0
    dropped: int = 0
    calls_by_model: dict[str, int] = field(default_factory=dict)


class _State:
    """Everything one app instance shares between requests: config, randomness, counters."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = dataclasses.replace(config)
        self.rng = random.Random(config.seed)
        self.lock = asyncio.Lock()
        self.stats = _Stats()
        self.gate = _Gate(config.max_concurrency)
        self.bucket = _TokenBucket(config.rate_limit)

    def reconfigure(self, changes: dict[str, Any]) -> None:
        """Apply ``changes``; a new seed restarts the random sequence, a new rate refills."""
        old, self.config = self.config, dataclasses.replace(self.config, **changes)
        if "seed" in changes:
            self.rng = random.Random(self.config.seed)
        if "rate_limit" in changes:
            self.bucket = _TokenBucket(self.config.rate_limit)
        if self.config.max_concurrency != old.max_concurrency:
            self.gate.resize(self.config.max_concurrency)

    async def bump(self, counter: str) -> None:
        async with self.lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    async def record(self, chat: _ChatRequest, reply: _Reply) -> None:
        async with self.lock:
            stats = self.stats
            stats.calls += 1
            stats.batched_calls += reply.batched
            stats.questions += reply.questions
            stats.prompt_tokens += chat.prompt_tokens
            stats.completion_tokens += reply.completion_tokens
            stats.noisy += reply.noisy
            stats.dropped += reply.dropped
            stats.calls_by_model[chat.model] = stats.calls_by_model.get(chat.model, 0) + 1

    async def snapshot(self) -> dict[str, Any]:
        async with self.lock:
            snapshot = dataclasses.asdict(self.stats)
        snapshot.update(max_in_flight=self.gate.max_in_flight, in_flight=self.gate.in_flight)
        return snapshot

    async def reset(self) -> None:
        async with self.lock:
            self.stats = _Stats()
            self.gate.max_in_flight = self.gate.in_flight


# --- the chat route -----------------------------------------------------------------------------


async def _sleep_ms(milliseconds: float) -> None:
    if milliseconds > 0:
        await asyncio.sleep(milliseconds / 1000)


async def _chat(state: _State, request: Request) -> Response:
    """Validate, apply the rate limit, then answer inside the concurrency limit."""
    try:
        chat = _parse_chat(await request.json())
    except ValueError as exc:  # includes invalid JSON
        await state.bump("bad_requests")
        message = str(exc) if isinstance(exc, _BadRequest) else "the body is not valid JSON"
        return _error(400, message, "invalid_request_error")
    retry_after = state.bucket.take()
    if retry_after:
        await state.bump("rate_limited")
        headers = {"Retry-After": str(retry_after)}
        return _error(429, "Rate limit reached for requests", "rate_limit_error", headers)
    async with state.gate.slot():
        return await _answer(state, chat)


async def _answer(state: _State, chat: _ChatRequest) -> Response:
    """Draw every random decision first (keeps a seed's sequence stable), then wait and reply."""
    config, rng = state.config, state.rng
    if _roll(rng, config.error_rate):
        await _sleep_ms(config.latency_ms)
        await state.bump("errors")
        message = "The server had an error while processing your request."
        return _error(500, message, "server_error")
    malformed = rng.choice(("oops", "truncated")) if _roll(rng, config.malformed_rate) else None
    reply = _build_reply(rng, config, chat)
    await _sleep_ms(config.latency_ms + config.latency_per_token_ms * reply.completion_tokens)
    body = _completion_body(chat, reply)
    if malformed is not None:
        await state.bump("malformed")
        return _malformed(malformed, body)
    await state.record(chat, reply)
    return JSONResponse(body)


# --- the app ------------------------------------------------------------------------------------


def _config_changes(body: object) -> dict[str, Any]:
    """FakeConfig fields from a ``POST /config`` body, type-checked (bool is not a number)."""
    if not isinstance(body, dict):
        raise _BadRequest("the config must be a JSON object")
    known = {item.name for item in dataclasses.fields(FakeConfig)}
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if name not in known:
            raise _BadRequest(f"unknown config field {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _BadRequest(f"{name} must be a number")
        if name in _INT_FIELDS and not float(value).is_integer():
            raise _BadRequest(f"{name} must be an integer")
        changes[name] = int(value) if name in _INT_FIELDS else float(value)
    return changes


async def _set_config(state: _State, request: Request) -> Response:
    try:
        state.reconfigure(_config_changes(await request.json()))
    except ValueError as exc:  # bad JSON, bad field, or out of range (FakeConfig.__post_init__)
        message = str(exc) if isinstance(exc, _BadRequest) else "invalid config"
        return _error(400, message, "invalid_request_error")
    return JSONResponse(dataclasses.asdict(state.config))


def _models_body() -> dict[str, Any]:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "fakellm"} for m in MODEL_IDS]
    return {"object": "list", "data": data}


def create_app(config: FakeConfig) -> FastAPI:
    """A fresh fake provider; it copies ``config``, so change knobs through ``POST /config``."""
    state = _State(config)
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
        return JSONResponse(await state.snapshot())

    @app.post("/stats/reset")
    async def reset_stats() -> Response:
        await state.reset()
        return JSONResponse(await state.snapshot())

    @app.get("/config")
    async def get_config() -> Response:
        return JSONResponse(dataclasses.asdict(state.config))

    @app.post("/config")
    async def set_config(request: Request) -> Response:
        return await _set_config(state, request)

    return app


def serve(
    config: FakeConfig, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"
) -> None:
    """Run the fake until interrupted (blocking); the access log stays off by design."""
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, access_log=False)
