"""The one check every request passes: in the producer before enqueueing, in the worker on receipt.

Both sides call :func:`validate_request`, so a payload sent by any Celery client is judged by
the same rules and in the same words as one sent through :class:`producer.Client`. A message
names every bad field and what is wrong with it, and never quotes a value: prompts and system
prompts are user text, and error messages end up in logs, Flower and stored failure reasons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from ._exceptions import InvalidRequest
from ._models import Request
from ._settings import Settings

FIELDS: tuple[str, ...] = tuple(Request.model_fields)
MAX_NAME_CHARS = 200  # model and tenant; the same bound as the Request model's
MAX_TOKENS = 1_000_000
MAX_TEMPERATURE = 2.0

_Check = Callable[[Settings, object], str | None]


def validate_request(settings: Settings, data: Request | Mapping[str, Any] | object) -> Request:
    """A valid :class:`Request` from ``data``, or InvalidRequest naming every bad field."""
    fields: dict[Any, object]
    if isinstance(data, Request):
        fields = {**data.model_dump()}
    elif isinstance(data, Mapping):
        fields = {**data}
    else:
        raise InvalidRequest(f"invalid request: request must be an object, not {_kind(data)}")
    problems = find_problems(settings, fields)
    if problems:
        raise InvalidRequest("invalid request: " + "; ".join(problems))
    if isinstance(data, Request):
        return data
    try:
        return Request.model_validate(fields)
    except ValidationError as exc:  # the checks above should cover the model; this is a backstop
        where = ", ".join(".".join(str(p) for p in err["loc"]) or "request" for err in exc.errors())
        raise InvalidRequest(f"invalid request: rejected by the request model ({where})") from None


def find_problems(settings: Settings, fields: Mapping[Any, object]) -> list[str]:
    """One ``"field: problem"`` line per bad field, in field order, then unknown fields."""
    problems = []
    for name, check in _CHECKS.items():
        if name in fields:
            problem = check(settings, fields[name])
        else:
            problem = "is required" if name in _REQUIRED else None
        if problem is not None:
            problems.append(f"{name}: {problem}")
    unknown = [_field_name(key) for key in fields if key not in _CHECKS]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        problems.append(
            f"{', '.join(unknown)}: unknown field{plural}, not permitted "
            f"(known fields: {', '.join(FIELDS)})"
        )
    return problems


def _prompt(settings: Settings, value: object) -> str | None:
    limit = settings.max_prompt_chars
    return _text(
        value, nullable=False, blank=False, limit=limit, setting="COALESCE_MAX_PROMPT_CHARS"
    )


def _system(settings: Settings, value: object) -> str | None:
    limit = settings.max_system_chars
    return _text(value, nullable=True, blank=True, limit=limit, setting="COALESCE_MAX_SYSTEM_CHARS")


def _model(settings: Settings, value: object) -> str | None:
    problem = _text(value, nullable=False, blank=False, limit=MAX_NAME_CHARS)
    if problem is None and any(c.isspace() for c in str(value)):
        return "must be a model name without whitespace"
    return problem


def _tenant(settings: Settings, value: object) -> str | None:
    return _text(value, nullable=True, blank=True, limit=MAX_NAME_CHARS)


def _temperature(settings: Settings, value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, not {_kind(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if not 0 <= value <= MAX_TEMPERATURE:
        return f"must be between 0 and {MAX_TEMPERATURE:g}"
    return None


def _max_tokens(settings: Settings, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer or null, not {_kind(value)}"
    if value < 1:
        return "must be at least 1"
    if value > MAX_TOKENS:
        return f"must be at most {MAX_TOKENS}"
    return None


def _text(
    value: object, *, nullable: bool, blank: bool, limit: int, setting: str | None = None
) -> str | None:
    """The problem with one text field, checked type, emptiness, size, then encodability."""
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        return f"must be a string{' or null' if nullable else ''}, not {_kind(value)}"
    if not blank and not value.strip():
        return "must not be empty"
    if len(value) > limit:
        where = f" ({setting})" if setting else ""
        return f"{len(value)} characters, over the limit of {limit}{where}"
    return _unencodable(value)


def _unencodable(value: str) -> str | None:
    """Lone surrogates survive Python strings but not JSON, Redis or the upstream API."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains text that cannot be encoded as UTF-8 (lone surrogate at index {exc.start})"
        )
    return None


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _field_name(key: object) -> str:
    """An unknown field's name as it can be shown: short, printable and encodable."""
    if not isinstance(key, str):
        return f"<{_kind(key)} field name>"
    if len(key) <= 64 and key.isprintable() and _unencodable(key) is None:
        return key
    return ascii(key[:40]) + ("..." if len(key) > 40 else "")


_CHECKS: dict[str, _Check] = {
    "prompt": _prompt,
    "model": _model,
    "system": _system,
    "temperature": _temperature,
    "max_tokens": _max_tokens,
    "tenant": _tenant,
}
_REQUIRED = frozenset({"prompt", "model"})
