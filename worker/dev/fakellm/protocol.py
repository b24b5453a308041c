"""The OpenAI wire format: request validation, completion bodies, stream chunks and errors."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response

from .answers import prompt_tokens
from .config import BadRequest

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class ToolCall:
    """The one tool call the fake makes: ``name`` with ``{argument: the last user message}``."""

    name: str
    argument: str

    def arguments(self, prompt: str) -> str:
        return json.dumps({self.argument: prompt}, ensure_ascii=False)

    def call_id(self, model: str, prompt: str) -> str:
        key = json.dumps([model, self.name, self.arguments(prompt)])
        return "call_" + hashlib.sha256(key.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ChatRequest:
    """What the fake needs from a chat completion request; ``texts`` holds every message.

    ``prompt`` is the last user message: a conversation is answered from its last turn.
    ``tool`` is set when the request offers tools and its last message is the user's (after
    a tool result, the fake answers in text, as a model finishing the loop would).
    """

    model: str
    system: str | None
    prompt: str
    texts: tuple[str, ...]
    prompt_tokens: int
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    tool: ToolCall | None = None
    roles: tuple[str, ...] = ()  # one per entry of ``texts``


@dataclass(frozen=True)
class Reply:
    """A completion as token pieces (see ``answers.token_pieces``) plus what stats count."""

    pieces: tuple[str, ...]
    finish_reason: str
    questions: int = 1
    batched: bool = False
    layout: str | None = None  # the non-standard layout of a noisy batched reply
    dropped: bool = False
    tool_call: dict[str, Any] | None = None  # pieces then hold the call's arguments
    # provider prompt cache: None = prompt too short to cache (usage has no details)
    cached_tokens: int | None = None

    @property
    def content(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


# --- requests -----------------------------------------------------------------------------------


def _content_text(content: object) -> str:
    """Message content as text: a string, or the text parts of an OpenAI content-part list."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(part for part in parts if isinstance(part, str))
    raise BadRequest("message content must be a string or an array of content parts")


def _message(message: object) -> tuple[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest("each message must be an object with a string 'role'")
    return message["role"], _content_text(message.get("content"))


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("'max_tokens' must be a positive integer")
    return int(value)


def _tool(body: dict[str, Any], last_role: str) -> ToolCall | None:
    """The tool the fake calls: the one ``tool_choice`` names, else the first offered."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or choice == "none" or last_role != "user":
        return None
    if not isinstance(tools, list) or not tools:
        raise BadRequest("'tools' must be a non-empty array")
    functions: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest("each tool must be an object with a function name")
        functions.append(function)
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f["name"] == named] or functions
    function = functions[0]
    schema = function.get("parameters")
    props = schema.get("properties") if isinstance(schema, dict) else None
    required = schema.get("required") if isinstance(schema, dict) else None
    names = list(required or []) + list(props or {})
    return ToolCall(function["name"], str(names[0]) if names else "query")


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage), validated the way OpenAI does."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object")
    if not stream:
        raise BadRequest("'stream_options' is only allowed when 'stream' is true")
    return True, options.get("include_usage") is True


def parse_chat(body: object) -> ChatRequest:
    """Validate a chat completion request; messages never appear in the error text."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array")
    stream, include_usage = _stream_flags(body)
    messages = [_message(item) for item in raw]
    users = [text for role, text in messages if role == "user"]
    if not users:
        raise BadRequest("'messages' must contain a user message")
    systems = [text for role, text in messages if role in ("system", "developer")]
    texts = tuple(text for _, text in messages)
    tool = _tool(body, messages[-1][0])
    return ChatRequest(
        model=model,
        system="\n\n".join(systems) or None,
        prompt=users[-1],
        texts=texts,
        prompt_tokens=prompt_tokens(list(texts)),
        max_tokens=_max_tokens(body),
        stream=stream,
        include_usage=include_usage,
        tool=tool,
        roles=tuple(role for role, _ in messages),
    )


# --- replies ------------------------------------------------------------------------------------


def _usage(chat: ChatRequest, reply: Reply) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": chat.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": chat.prompt_tokens + reply.completion_tokens,
    }
    if reply.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
    return usage


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(chat: ChatRequest, reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_call is not None:
        call = reply.tool_call
        function = {"name": call["function"]["name"], "arguments": reply.content}
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{**call, "function": function}],
        }
    return {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
        ],
        "usage": _usage(chat, reply),
    }


def malformed(kind: str, body: dict[str, Any]) -> Response:
    """A 200 whose body is not a chat completion, as flaky gateways sometimes send."""
    if kind == "oops":
        return JSONResponse({"oops": True})
    text = json.dumps(body)
    return Response(text[: len(text) // 2], media_type="application/json")


def event(payload: object) -> bytes:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class Chunks:
    """The ``chat.completion.chunk`` events of one stream; they share an id and a timestamp."""

    def __init__(self, chat: ChatRequest) -> None:
        self.chat = chat
        self.id = _completion_id()
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.chat.model,
            "choices": choices,
        }
        if self.chat.include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the last
        return chunk

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return event(self._chunk([choice]))

    def first(self, reply: Reply) -> bytes:
        """The opening chunk: the role, and for a tool call its id and name."""
        if reply.tool_call is None:
            return self.delta({"role": "assistant", "content": ""})
        call = {**reply.tool_call, "index": 0}
        call["function"] = {**call["function"], "arguments": ""}
        return self.delta({"role": "assistant", "content": None, "tool_calls": [call]})

    def piece(self, reply: Reply, text: str) -> bytes:
        """One piece of the reply: content, or a tool call's arguments."""
        if reply.tool_call is None:
            return self.delta({"content": text})
        return self.delta({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})

    def usage(self, reply: Reply) -> bytes:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        return event({**self._chunk([]), "usage": _usage(self.chat, reply)})


def error(
    status: int,
    message: str,
    kind: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
