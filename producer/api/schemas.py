"""The OpenAPI description of each endpoint: what it takes and what it returns.

The request model checks only the shape FastAPI must know (``model``, ``messages``, types of
the common fields); the producer's ``validate_request`` judges the rest, and any field the app
sends that this version does not know is kept and forwarded upstream.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool | None = Field(None, description="Send a last chunk with usage.")


class ChatMessage(BaseModel):
    """One message of the conversation; other fields are kept and forwarded."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(
        None, description="Text, or a list of content parts ({'type': 'text', 'text': ...})."
    )
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; unknown fields are kept and forwarded."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, description="Model name, as the upstream knows it.")
    messages: list[ChatMessage] = Field(
        min_length=1,
        description="The conversation: roles system, developer, user, assistant and tool.",
    )
    stream: bool | None = Field(None, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    coalesce: dict[str, Any] | None = Field(
        None,
        description=(
            "coalesce's own controls, never sent upstream: {'cache': {'namespace': str, "
            "'ttl': seconds, 'no_cache': bool, 'no_store': bool, 'sensitive': bool, "
            "'sampled': bool}} (or 'cache': 'no_cache,no_store'), and 'tags': {name: value} "
            "for the ledger and budgets."
        ),
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    index: int
    message: dict[str, Any] = Field(description="The assistant message: content, tool_calls...")
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str = Field(description="chatcmpl-<task id>; the task id is also x-request-id.")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (``data: {...}``; last ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "upstream"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape, used for every 4xx and 5xx."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    redis: bool
    workers: bool
    reason: str | None = None
