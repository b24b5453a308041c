"""Settings shared by producers and workers, read from ``COALESCE_*`` environment variables.

Times are in seconds everywhere except ``WINDOW_MS``, which keeps the unit users tune it in.
"""

from __future__ import annotations

import functools
import os

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._exceptions import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"


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
    batch_only_if_cheaper: bool = Field(
        False,
        description="Ask alone the requests of a group whose full combined prompt would cost "
        "more than separate calls (no or a short system prompt).",
    )
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

    worker_concurrency: int = Field(512, ge=1)
    result_expires_s: int = Field(86_400, ge=60)
    log_prompts: bool = False

    # Caches (worker/cache): looked up before a request enters a window.
    cache: bool = Field(True, description="The exact answer cache (Redis); off: dedup only.")
    cache_ttl_s: int = Field(
        7 * 86_400, ge=1, description="How long an answer is cached (a prompt not about 'now')."
    )
    cache_present_ttl_s: int = Field(
        3_600, ge=1, description="TTL of a prompt about the present ('today', 'latest', ...)."
    )
    cache_max_ttl_s: int = Field(
        14 * 86_400, ge=1, description="No cache entry outlives this, a request's own ttl included."
    )
    semantic_cache: bool = Field(
        False, description="Serve answers of similar questions (guarded); see the README."
    )
    semantic_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="Least cosine similarity of a semantic hit."
    )
    semantic_max_entries: int = Field(
        100_000, ge=1, description="Semantic entries kept (oldest dropped first)."
    )
    embedder: str = Field(
        "hashing", description="Semantic embedder: 'hashing' (no model), 'local' or 'openai'."
    )
    embeddings_url: str | None = Field(
        None, description="The /v1 base URL of an OpenAI-compatible embeddings endpoint."
    )
    embeddings_model: str = Field(
        "text-embedding-3-small", description="The model asked for embeddings ('openai' only)."
    )
    embeddings_api_key: SecretStr | None = Field(
        None, description="API key of the embeddings endpoint (default: the upstream's)."
    )
    similarity_grouping: bool = Field(
        False, description="Split a window's requests into prompts of similar questions."
    )

    # The cost ledger (worker/ledger) and its reports.
    prices_file: str | None = Field(
        None,
        description="JSON or TOML {model: {input, output, cached_input}} in USD per million "
        "tokens, over genai-prices' table.",
    )
    ledger: bool = Field(True, description="Record every call and request in the ledger.")
    ledger_raw_ttl_s: int = Field(
        7 * 86_400, ge=3_600, description="How long raw call and request rows are kept."
    )
    ledger_rollup_ttl_s: int = Field(
        90 * 86_400, ge=86_400, description="How long hourly rollups are kept."
    )
    ledger_daily_ttl_s: int = Field(
        400 * 86_400, ge=86_400, description="How long daily rollups are kept."
    )
    daily_report_path: str | None = Field(
        None, description="Where the daily job writes yesterday's report ('{date}' allowed)."
    )
    daily_report_webhook: str | None = Field(
        None, description="A URL the daily job POSTs yesterday's report (JSON) to."
    )
    # Budgets (producer/_budget.py): checked when a request is accepted.
    budgets: str = Field(
        "", description="Budget rules as JSON, or '@path' to a JSON file (see the README)."
    )
    budget_webhook: str | None = Field(
        None, description="A URL called once per period when a soft limit is crossed."
    )

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
