"""The records that cross the queue: what a producer asks and what it gets back."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

Source = Literal["batched", "single", "dedup", "cache"]


class Request(BaseModel):
    """One prompt as a producer submits it. Strict: a wrong type is an error, not a coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr
    model: StrictStr = Field(min_length=1, max_length=200)
    system: StrictStr | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: StrictInt | None = Field(None, ge=1, le=1_000_000)
    tenant: StrictStr | None = Field(None, max_length=200)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        return value

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


class Answer(BaseModel):
    """What a request resolves to. Tokens and cost are this request's share of what was billed."""

    model_config = ConfigDict(frozen=True)

    text: str
    source: Source
    model: str
    batch_id: str | None = None
    batch_size: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
