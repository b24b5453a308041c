"""Passthrough replies: a chat completion kept whole, as the provider sent it.

A passthrough request's reply goes back to the app, so nothing may be lost: tool calls, a
refusal, logprobs, fields this version does not know. :class:`RawCompletion` keeps the body
beside the counts the worker bills by; :class:`ChunkAssembler` turns a stream of
``chat.completion.chunk`` objects into that same body while each chunk is relayed as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .responses import Completion, Failure, read_event, usage_counts


@dataclass(frozen=True)
class RawCompletion(Completion):
    """A completion with the provider's whole body (``chat.completion``) in ``body``."""

    body: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> dict[str, Any]:
        """The first choice's message (role, content, tool_calls, ...)."""
        choice = self.body["choices"][0]
        return dict(choice["message"])


def raw_from_body(body: Any, requested_model: str, status: int = 200) -> RawCompletion | Failure:
    """A RawCompletion from a decoded body; a body with no message is a retryable failure."""
    if not isinstance(body, dict):
        return Failure("bad_response", "body is not a JSON object", status)
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(message, dict):
        return Failure("bad_response", "no choices[0].message object", status)
    content = message.get("content")
    finish = choice.get("finish_reason")
    model = body.get("model")
    prompt, completion, cached = usage_counts(body.get("usage"))
    return RawCompletion(
        text=content if isinstance(content, str) else "",
        prompt_tokens=prompt,
        completion_tokens=completion,
        finish_reason=finish if isinstance(finish, str) else "unknown",
        model=model if isinstance(model, str) and model else requested_model,
        cached_tokens=cached,
        body=body,
    )


def parse_raw(response: httpx.Response, requested_model: str) -> RawCompletion | Failure:
    """Read a 2xx JSON body of a passthrough call."""
    try:
        body = response.json()
    except ValueError:
        return Failure("bad_response", "body is not JSON", response.status_code)
    return raw_from_body(body, requested_model, response.status_code)


def chunks_from_completion(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks a stream of ``body`` would have held: for a server that ignored ``stream``."""
    head = {
        "id": body.get("id", ""),
        "object": "chat.completion.chunk",
        "created": body.get("created", int(time.time())),
        "model": body.get("model", ""),
    }
    chunks = []
    for choice in body.get("choices", []):
        delta = {k: v for k, v in dict(choice.get("message") or {}).items() if v is not None}
        index = choice.get("index", 0)
        chunks.append(
            {**head, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}
        )
        finish = choice.get("finish_reason")
        chunks.append({**head, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]})
    if body.get("usage") is not None:
        chunks.append({**head, "choices": [], "usage": body["usage"]})
    return chunks


_PIECEWISE = frozenset({"content", "refusal"})


@dataclass
class _Choice:
    message: dict[str, Any] = field(default_factory=lambda: {"role": "assistant"})
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None


class ChunkAssembler:
    """Folds the chunks of one streamed completion into the body a plain call returns."""

    def __init__(self, requested_model: str) -> None:
        self.done = False  # saw ``data: [DONE]``
        self._choices: dict[int, _Choice] = {}
        self._head: dict[str, Any] = {"model": requested_model}
        self._usage: Any = None

    @property
    def complete(self) -> bool:
        return self.done or any(c.finish_reason is not None for c in self._choices.values())

    @property
    def text(self) -> str:
        """The first choice's content so far."""
        choice = self._choices.get(0)
        content = choice.message.get("content") if choice else None
        return content if isinstance(content, str) else ""

    def feed(self, event: str, data: str) -> dict[str, Any] | Failure | None:
        """Take one event: the chunk to relay, None for none (``[DONE]``), or a Failure."""
        chunk = read_event(event, data)
        if chunk is None:
            self.done = True
            return None
        if isinstance(chunk, Failure):
            return chunk
        for name in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if chunk.get(name) is not None:
                self._head[name] = chunk[name]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict):
                self._take(choice)
        return chunk

    def _take(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        state = self._choices.setdefault(index if isinstance(index, int) else 0, _Choice())
        if isinstance(choice.get("finish_reason"), str):
            state.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        for name, value in delta.items():
            if name == "tool_calls" and isinstance(value, list):
                for call in value:
                    _merge_call(state.calls, call)
            elif (
                name in _PIECEWISE
                and isinstance(value, str)
                and isinstance(state.message.get(name), str)
            ):
                state.message[name] += value  # content and refusal arrive in pieces
            elif value is not None:
                state.message[name] = value

    def completion(self) -> RawCompletion:
        """The assembled ``chat.completion``; call once the stream is complete."""
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message = dict(state.message)
            message.setdefault("content", None)
            if state.calls:
                message["tool_calls"] = [state.calls[n] for n in sorted(state.calls)]
            choices.append(
                {"index": index, "message": message, "finish_reason": state.finish_reason}
            )
        if not choices:
            choices.append({"index": 0, "message": {"role": "assistant", "content": ""}})
        body = {**self._head, "object": "chat.completion", "choices": choices}
        if self._usage is not None:
            body["usage"] = self._usage
        outcome = raw_from_body(body, str(self._head.get("model", "")))
        assert isinstance(outcome, RawCompletion)  # choices[0].message is always there
        return outcome


def _merge_call(calls: dict[int, dict[str, Any]], delta: Any) -> None:
    """One tool call's delta: id, type and name come once, arguments in pieces."""
    if not isinstance(delta, dict):
        return
    index = delta.get("index", len(calls))
    call = calls.setdefault(index if isinstance(index, int) else len(calls), {})
    for name, value in delta.items():
        if name == "index" or value is None:
            continue
        if name == "function" and isinstance(value, dict):
            function = call.setdefault("function", {})
            for key, part in value.items():
                if (
                    key == "arguments"
                    and isinstance(part, str)
                    and isinstance(function.get(key), str)
                ):
                    function[key] += part
                elif part is not None:
                    function[key] = part
        else:
            call[name] = value
