"""The fake provider's knobs, shared by the CLI, ``create_app`` and ``POST /config``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

STREAM_MODES = ("on", "ignore", "reject")
LINE_LAYOUTS = ("canonical", "bold", "answer", "bracket", "heading")
ONE_LINE_LAYOUTS = ("inline", "bold_inline", "restated", "json")
LAYOUTS = (*LINE_LAYOUTS, *ONE_LINE_LAYOUTS)

_PROBABILITIES = ("noise", "drop", "error_rate", "malformed_rate")
_NON_NEGATIVE = (
    "latency_ms",
    "latency_per_token_ms",
    "rate_limit",
    "max_concurrency",
    "concurrency_limit",
    "retry_after_ms",
    "prompt_cache_ttl_s",
)


class BadRequest(ValueError):
    """A body the fake refuses with HTTP 400; the message never quotes prompt text."""


@dataclass
class FakeConfig:
    """Knobs of the fake provider; the defaults make a perfect, instant, unlimited one.

    ``max_concurrency`` queues calls beyond N (a provider-side queue), while
    ``concurrency_limit`` answers them 429 at once (a provider that takes N calls at a time);
    ``retry_after_ms`` > 0 adds a ``retry-after-ms`` header to those 429s. ``stream_mode`` is
    ``on`` (honour ``stream``), ``ignore`` (answer plain JSON anyway, like some gateways) or
    ``reject`` (400). ``reject_word``, when set, makes any call whose messages contain it as a
    whole word (case-insensitive) fail with a content-filter 400. ``layouts`` (comma-separated
    names from ``LAYOUTS``; empty: all) limits the layouts ``noise`` picks from, so a test can
    ask for one; a batch no allowed layout fits (say ``json`` with a multi-line answer) gets
    one of the line layouts instead. ``prompt_cache`` simulates OpenAI's prompt caching: a
    prompt of 1,024+ tokens whose start matches a prompt seen in the last
    ``prompt_cache_ttl_s`` seconds reports ``usage.prompt_tokens_details.cached_tokens``.
    """

    latency_ms: float = 0
    latency_per_token_ms: float = 0
    noise: float = 0.0
    drop: float = 0.0
    error_rate: float = 0.0
    malformed_rate: float = 0.0
    rate_limit: float = 0.0
    max_concurrency: int = 0
    concurrency_limit: int = 0
    retry_after_ms: int = 0
    stream_mode: str = "on"
    reject_word: str = ""
    layouts: str = ""
    seed: int = 0
    prompt_cache: bool = True
    prompt_cache_ttl_s: float = 300.0

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.stream_mode not in STREAM_MODES:
            raise ValueError(f"stream_mode must be one of {', '.join(STREAM_MODES)}")
        unknown = sorted(set(self.layout_names()) - set(LAYOUTS))
        if unknown:
            raise ValueError(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")

    def layout_names(self) -> tuple[str, ...]:
        """The layouts ``noise`` may pick (all of them when ``layouts`` is empty)."""
        names = tuple(name.strip() for name in self.layouts.split(",") if name.strip())
        return names or LAYOUTS


def _field_types() -> dict[str, type]:
    """Each knob's declared type (the annotations are strings under ``from __future__``)."""
    return dict(typing.get_type_hints(FakeConfig))


def _coerce(name: str, kind: type, value: object) -> Any:
    """One ``POST /config`` value checked against its knob's type (bool is not a number)."""
    if kind is bool:
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number")
    if kind is int:
        if not float(value).is_integer():
            raise BadRequest(f"{name} must be an integer")
        return int(value)
    return float(value)


def config_changes(body: object) -> dict[str, Any]:
    """FakeConfig fields from a ``POST /config`` body; ranges are checked by FakeConfig itself."""
    if not isinstance(body, dict):
        raise BadRequest("the config must be a JSON object")
    types = _field_types()
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if name not in types:
            raise BadRequest(f"unknown config field {name!r}")
        changes[name] = _coerce(name, types[name], value)
    return changes


def as_dict(config: FakeConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
