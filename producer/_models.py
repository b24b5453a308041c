"""The records that cross the queue: what a producer asks and what it gets back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

Source = Literal["batched", "single", "dedup", "cache", "semantic", "passthrough"]
CACHE_FLAGS = ("no_cache", "no_store", "sensitive", "sampled")


class CacheControl(BaseModel):
    """How one request may use the caches (``cache=`` on submit and chat, or over HTTP).

    ``no_cache``: do not serve a stored answer; ``no_store``: do not store this answer;
    ``sensitive``: keep it out of every cache (dedup's short answer record included);
    ``sampled``: cache even though temperature is above 0 (off by default: a sampled answer
    is one of many); ``ttl``: seconds to keep this answer (capped by COALESCE_CACHE_MAX_TTL_S);
    ``namespace``: a partition of the cache, cleared on its own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: StrictStr = Field("default", min_length=1, max_length=100)
    ttl: StrictInt | None = Field(None, ge=1, le=10 * 365 * 86_400)
    no_cache: StrictBool = False
    no_store: StrictBool = False
    sensitive: StrictBool = False
    sampled: StrictBool = False


# What ``cache=`` accepts: the record, its fields as a mapping, or shorthand flags
# ("no_cache", "no_store,sensitive"); None means the defaults.
CacheOption = CacheControl | Mapping[str, Any] | str | None


class Request(BaseModel):
    """One request as a producer submits it. Strict: a wrong type is an error, not a coercion.

    Exactly one of ``prompt`` (the batchable shorthand, with ``system``) and ``messages`` (an
    OpenAI conversation, sent upstream as its own call: *passthrough*) is set; a passthrough
    request's ``prompt`` is ``""``, so code that reads prompts stays simple. ``params`` holds
    every other OpenAI body field: for passthrough all of them exactly as sent (temperature and
    max tokens included), for the prompt form only the answer-changing ones a batch may share.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr = ""
    model: StrictStr = Field(min_length=1, max_length=200)
    system: StrictStr | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: StrictInt | None = Field(None, ge=1, le=1_000_000)
    tenant: StrictStr | None = Field(None, max_length=200)
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    stream: StrictBool = False
    cache: CacheControl | None = None
    tags: dict[StrictStr, StrictStr] | None = None  # for the ledger: {"feature": "faq", ...}

    @model_validator(mode="after")
    def _one_form(self) -> Request:
        if self.messages is None and not self.prompt.strip():
            raise ValueError("prompt is empty")
        if self.messages is not None and (self.prompt or self.system is not None):
            raise ValueError("a messages request has no prompt or system")
        return self

    @field_validator("temperature", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"temperature must be a number, not {type(value).__name__}")
        return value

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError("model must be a non-empty name without spaces")
        return value

    @property
    def passthrough(self) -> bool:
        """Whether this request is sent upstream as its own call, exactly as the app sent it."""
        return self.messages is not None

    def body(self) -> dict[str, Any]:
        """The upstream body of a passthrough request: the app's fields, model and messages."""
        return {**self.params, "model": self.model, "messages": self.messages}


class Answer(BaseModel):
    """What a request resolves to. Tokens and cost are this request's share of what was billed.

    ``text`` is the assistant's content ("" when a passthrough reply holds only tool calls);
    ``message`` is the assistant message as the upstream returned it (passthrough only), and
    ``finish_reason`` the upstream's (batched answers are complete, so ``"stop"``). A cache
    hit (``source`` ``"cache"`` or ``"semantic"``) costs nothing, so its tokens and cost are 0.
    """

    model_config = ConfigDict(frozen=True)

    text: str
    source: Source
    model: str
    batch_id: str | None = None
    batch_size: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from the provider's prompt cache
    cost_usd: float | None = 0.0  # None: the model has no known price (see the ledger)
    message: dict[str, Any] | None = None
    finish_reason: str | None = "stop"
    similarity: float | None = None  # a semantic cache hit's cosine similarity
