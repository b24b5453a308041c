"""Reading what the provider sent: completions, error bodies and server-sent event streams.

Nothing here raises for a bad body: a body that is not what we asked for becomes a
``Failure``, which the client retries (a provider's hiccup is usually gone on the next try).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import httpx

_MAX_DETAIL_CHARS = 300


@dataclass(frozen=True)
class Completion:
    """The parts of a chat completion the worker needs."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    model: str
    cached_tokens: int = 0  # prompt tokens the provider served from its prompt cache


FailureKind = Literal["status", "rate_limited", "timeout", "network", "bad_response"]


@dataclass(frozen=True)
class Failure:
    """A retryable outcome of one try; ``detail`` never holds the API key or prompt text."""

    kind: FailureKind
    detail: str
    status: int = 0
    retry_after: float | None = None

    @property
    def label(self) -> str:
        """Short description for log lines (no provider-written text)."""
        if self.kind in ("status", "rate_limited"):
            return f"status {self.status}"
        if self.kind == "bad_response":
            return "malformed response"
        return self.detail.split(":", 1)[0]

    def summary(self, failures: int, elapsed_s: float) -> str:
        """What went wrong, e.g. ``upstream returned 429 on 37 attempts over 20.1 s: <why>``."""
        tries = f"{failures} attempt" if failures == 1 else f"{failures} attempts"
        span = f"on {tries} over {elapsed_s:.1f} s"
        if self.kind in ("status", "rate_limited"):
            return f"upstream returned {self.status} {span}: {self.detail}"
        if self.kind == "timeout":
            return f"upstream timed out ({self.detail}) {span}"
        if self.kind == "bad_response":
            return f"upstream returned a malformed response {span}: {self.detail}"
        return f"could not reach upstream {span}: {self.detail}"


def _token_count(usage: Any, field: str) -> int:
    value = usage.get(field) if isinstance(usage, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def usage_counts(usage: Any) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens from an OpenAI ``usage``; 0 for what is missing."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    return (
        _token_count(usage, "prompt_tokens"),
        _token_count(usage, "completion_tokens"),
        _token_count(details, "cached_tokens"),
    )


def parse_completion(response: httpx.Response, requested_model: str) -> Completion | Failure:
    """Read a 2xx JSON body; anything that is not a chat completion is a retryable failure."""
    try:
        body = response.json()
    except ValueError:
        return Failure("bad_response", "body is not JSON", response.status_code)
    if not isinstance(body, dict):
        return Failure("bad_response", "body is not a JSON object", response.status_code)
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str) or not isinstance(choice, dict):
        return Failure("bad_response", "no choices[0].message.content string", response.status_code)
    finish = choice.get("finish_reason")
    model = body.get("model")
    prompt, completion, cached = usage_counts(body.get("usage"))
    return Completion(
        text=text,
        prompt_tokens=prompt,
        completion_tokens=completion,
        finish_reason=finish if isinstance(finish, str) else "unknown",
        model=model if isinstance(model, str) and model else requested_model,
        cached_tokens=cached,
    )


def _shorten(message: str) -> str:
    message = " ".join(message.split())
    if len(message) > _MAX_DETAIL_CHARS:
        message = message[: _MAX_DETAIL_CHARS - 3] + "..."
    return message


def error_fields(body: Any) -> tuple[str | None, str | None]:
    """(message, code) from ``{"error": {"message", "code"}}`` and the shapes its kin use."""
    if not isinstance(body, dict):
        return None, None
    error = body.get("error")
    message: Any = None
    code: Any = None
    if isinstance(error, dict):
        message, code = error.get("message"), error.get("code")
    elif isinstance(error, str):
        message = error
    if not isinstance(message, str):
        message = body.get("message", body.get("detail"))
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    return (
        _shorten(message) if isinstance(message, str) else None,
        code[:100] if isinstance(code, str) and code else None,
    )


def provider_error(response: httpx.Response) -> tuple[str, str | None]:
    """The provider's own error message (or its body, shortened) and error code, if any."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message, code = error_fields(body)
    if message is None:
        message = _shorten(response.text if body is None else str(body))
    return message or response.reason_phrase or "no error message", code


class SseParser:
    """Server-sent events from raw body bytes, a network read at a time.

    Works on whole reads rather than line by line: a streamed reply is hundreds of small
    events, and per-line async iteration cost more CPU than the rest of the batch's handling.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        """The (event, data) pairs completed by ``data``; a partial event waits for more."""
        buffer = self._buffer + data
        if b"\r" in buffer:
            # CRLF and lone CR end lines too; a CR at the very end may be half of a CRLF.
            tail = b"\r" if buffer.endswith(b"\r") else b""
            body = buffer[: len(buffer) - len(tail)]
            buffer = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        *blocks, self._buffer = buffer.split(b"\n\n")
        return [event for block in blocks if (event := _sse_block(block)) is not None]

    def close(self) -> list[tuple[str, str]]:
        """The last event, if the body ended without a blank line after it."""
        block, self._buffer = self._buffer.replace(b"\r", b""), b""
        event = _sse_block(block)
        return [] if event is None else [event]


def _sse_block(block: bytes) -> tuple[str, str] | None:
    event = ""
    data: list[str] = []
    for line in block.decode("utf-8", errors="replace").split("\n"):
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
        elif name == "event":
            event = value.removeprefix(" ")
        # ":" comments (keep-alives), "id" and "retry" do not matter here
    return (event or "message", "\n".join(data)) if data else None


def read_event(event: str, data: str) -> dict[str, Any] | Failure | None:
    """One streamed event as its JSON object; None for the ``[DONE]`` marker."""
    if data.strip() == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        return Failure("bad_response", "stream event is not JSON")
    if not isinstance(chunk, dict):
        return Failure("bad_response", "stream event is not a JSON object")
    if event == "error" or "error" in chunk:
        message, code = error_fields(chunk)
        what = code or message or "no error message"
        return Failure("bad_response", f"error event in stream: {what}")
    return chunk


class StreamReader:
    """Collects one streamed chat completion from its ``chat.completion.chunk`` events."""

    def __init__(self, requested_model: str) -> None:
        self.parts: list[str] = []
        self.done = False  # saw ``data: [DONE]``
        self.finish_reason: str | None = None
        self._model = requested_model
        self._usage: tuple[int, int, int] = (0, 0, 0)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def complete(self) -> bool:
        """True once the stream said it was over; a stream cut before that is broken."""
        return self.done or self.finish_reason is not None

    def feed(self, event: str, data: str) -> str | Failure:
        """Take one event; returns its new text ("" for none) or a Failure for a bad event."""
        chunk = read_event(event, data)
        if chunk is None:
            self.done = True
            return ""
        if isinstance(chunk, Failure):
            return chunk
        self._take_meta(chunk)
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return ""
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self.finish_reason = finish
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and content:
            self.parts.append(content)
            return content
        return ""

    def _take_meta(self, chunk: dict[str, Any]) -> None:
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self._model = model
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage_counts(usage)

    def completion(self) -> Completion:
        prompt, completion, cached = self._usage
        return Completion(
            text=self.text,
            prompt_tokens=prompt,
            completion_tokens=completion,
            finish_reason=self.finish_reason or "unknown",
            model=self._model,
            cached_tokens=cached,
        )
