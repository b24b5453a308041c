"""Settings shared by producers and workers, read from ``COALESCE_*`` environment variables.

Times are in seconds everywhere except ``WINDOW_MS``, which keeps the unit users tune it in.
"""

from __future__ import annotations

import functools
import os
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ._exceptions import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"

# USD per million tokens (input, output). Override or extend with COALESCE_PRICES.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-3.5-turbo": (0.50, 1.50),
}


class Settings(BaseSettings):
    """All knobs; each maps to ``COALESCE_<NAME>`` (listed in the README)."""

    model_config = SettingsConfigDict(
        env_prefix="COALESCE_",
        extra="ignore",
        validate_default=True,
        frozen=True,
        populate_by_name=True,
    )

    redis_url: str = DEFAULT_REDIS_URL
    upstream_url: str = Field(
        DEFAULT_UPSTREAM_URL,
        validation_alias=AliasChoices("COALESCE_UPSTREAM_URL", "OPENAI_BASE_URL"),
    )
    upstream_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("COALESCE_UPSTREAM_API_KEY", "OPENAI_API_KEY")
    )
    queue: str = Field("coalesce", min_length=1)

    window_ms: int = Field(200, ge=1, le=60_000)
    max_batch: int = Field(16, ge=1, le=256)
    max_batch_tokens: int = Field(6_000, ge=100)
    max_batch_answer_tokens: int = Field(4_000, ge=16)
    stream: bool = True
    max_prompt_chars: int = Field(20_000, ge=1)
    max_system_chars: int = Field(100_000, ge=1)
    max_messages: int = Field(256, ge=1)
    max_tokens_limit: int = Field(128_000, ge=1, le=1_000_000)
    submit_retry_s: float = Field(5.0, ge=0, le=600)

    upstream_timeout_s: float = Field(30.0, gt=0)
    upstream_concurrency: int = Field(16, ge=1)
    request_timeout_s: float = Field(75.0, gt=0)
    visibility_timeout_s: float = Field(100.0, gt=0)
    dedup_ttl_s: float = Field(300.0, ge=0)

    worker_concurrency: int = Field(256, ge=1)
    result_expires_s: int = Field(86_400, ge=60)
    prices: Annotated[dict[str, tuple[float, float]], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES)
    )
    log_prompts: bool = False

    # ``coalesce api``: the OpenAI-compatible HTTP server (producer/api).
    api_keys: SecretStr | None = Field(
        None, description="API keys and their tenants: 'key1=tenant-a,key2=tenant-b'."
    )
    api_keys_file: str | None = Field(
        None, description="A file of keys, one 'key=tenant' per line ('#' starts a comment)."
    )
    api_allow_anonymous: bool = Field(
        False, description="Serve without keys (tenant 'default'); refused unless set."
    )
    api_rpm: int = Field(0, ge=0, description="Requests per minute per key (0: no limit).")
    api_max_in_flight: int = Field(
        1000, ge=0, description="Requests waiting for an answer per key (0: no limit)."
    )
    api_max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get 413."
    )
    api_timeout_s: float = Field(
        90.0, gt=0, description="How long a request waits for its answer before a 504."
    )
    api_models: str = Field(
        "", description="Comma-separated models for /v1/models; empty: ask the upstream."
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("upstream_url")
    @classmethod
    def _http_scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("prices", mode="before")
    @classmethod
    def _parse_prices(cls, value: object) -> object:
        """Accept JSON like ``{"my-model": [0.2, 0.8]}``, merged over the defaults."""
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise ValueError('must be a JSON object like {"model": [input, output]}')
            return {**DEFAULT_PRICES, **value}
        return value

    def check_worker(self) -> None:
        """Cross-field rules a worker needs; named so the user knows what to change."""
        if self.visibility_timeout_s <= self.request_timeout_s:
            raise ConfigError(
                "COALESCE_VISIBILITY_TIMEOUT_S must be greater than COALESCE_REQUEST_TIMEOUT_S "
                f"({self.visibility_timeout_s} <= {self.request_timeout_s}); otherwise requests "
                "still being answered are redelivered to another worker"
            )
        if self.worker_concurrency < 2 * self.max_batch:
            raise ConfigError(
                "COALESCE_WORKER_CONCURRENCY must be at least twice COALESCE_MAX_BATCH "
                f"({self.worker_concurrency} < 2 x {self.max_batch}); each waiting request holds "
                "a worker thread, so a smaller pool caps batches below MAX_BATCH"
            )


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's errors into one ConfigError naming each variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = _variable(str(err["loc"][0])) if err["loc"] else "?"
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


def _variable(loc: str) -> str:
    """The environment variable behind an error's ``loc``.

    Pydantic reports a field with alias choices under its first alias, whichever one was
    set, so name the alias actually present in the environment (the first one if several).
    """
    name = loc.upper()
    present = {variable.upper() for variable in os.environ}
    for info in Settings.model_fields.values():
        alias = info.validation_alias
        if not isinstance(alias, AliasChoices):
            continue
        choices = [choice.upper() for choice in alias.choices if isinstance(choice, str)]
        if name in choices:
            return next((choice for choice in choices if choice in present), name)
    return name if name.startswith(("COALESCE_", "OPENAI_")) else f"COALESCE_{name}"


@functools.cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return load_settings()
