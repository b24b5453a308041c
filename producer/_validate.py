"""The one check every request passes: in the producer before enqueueing, in the worker on receipt.

Both sides call :func:`validate_request`, so a payload sent by any Celery client is judged by
the same rules and in the same words as one sent through :class:`producer.Client`. A message
names every bad field and what is wrong with it, and never quotes a value: prompts, system
prompts and messages are user text, and error messages end up in logs, Flower and stored
failure reasons.

Two shapes are accepted: the prompt form (``prompt``, ``system``, ``model``, ...) and the chat
form (``messages``, ``model``, ``tenant``, ``stream`` and any OpenAI body field). A chat
request that may share a call is turned into the prompt form (:mod:`producer._chat`); a dumped
:class:`Request` of either form validates back to itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from ._chat import (
    BATCH_PARAMS,
    DEFAULT_TEMPERATURE,
    OWN_FIELDS,
    batchable,
    message_problems,
    param_problems,
    unencodable,
)
from ._exceptions import InvalidRequest
from ._models import CACHE_FLAGS, CacheControl, Request
from ._settings import Settings
from ._tags import check_tags

FIELDS: tuple[str, ...] = tuple(Request.model_fields)
MAX_NAME_CHARS = 200  # model and tenant; the same bound as the Request model's
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
    if "cache" in fields:
        fields["cache"] = cache_fields(fields["cache"])
    if _is_chat(fields):
        request = _chat_request(settings, fields)
    else:
        problems = find_problems(settings, fields)
        if problems:
            raise InvalidRequest("invalid request: " + "; ".join(problems))
        request = data if isinstance(data, Request) else _build(fields)
    return data if isinstance(data, Request) and request == data else request


def _build(fields: Mapping[Any, object]) -> Request:
    try:
        return Request.model_validate(fields)
    except ValidationError as exc:  # the checks above should cover the model; this is a backstop
        where = ", ".join(".".join(str(p) for p in err["loc"]) or "request" for err in exc.errors())
        raise InvalidRequest(f"invalid request: rejected by the request model ({where})") from None


def _is_chat(fields: Mapping[Any, object]) -> bool:
    """A conversation, unless a prompt came too (the prompt form then names ``messages``)."""
    return fields.get("messages") is not None and fields.get("prompt") in (None, "")


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
    if value > settings.max_tokens_limit:
        return f"must be at most {settings.max_tokens_limit} (COALESCE_MAX_TOKENS_LIMIT)"
    return None


def _messages(settings: Settings, value: object) -> str | None:
    if value is None:
        return None
    return "must be null with a prompt (send either prompt or messages)"


def _params(settings: Settings, value: object) -> str | None:
    """A prompt-form request carries only parameters a batched call can share."""
    if not isinstance(value, Mapping):
        return f"must be an object, not {_kind(value)}"
    for name in value:
        if name not in BATCH_PARAMS:
            return (
                f"{_field_name(name)} is not allowed with a prompt (allowed: "
                f"{', '.join(BATCH_PARAMS)}; send messages for anything else)"
            )
    problems = param_problems(settings, value)
    return problems[0] if problems else None


def cache_fields(value: object) -> object:
    """``cache=`` as the Request model holds it: a shorthand string becomes its fields.

    ``"no_cache"``, ``"no_store"``, ``"sensitive"`` and ``"sampled"`` may be combined with
    commas; anything that is not a shorthand is returned as it came, for :func:`_cache` to judge.
    """
    if isinstance(value, CacheControl):
        return value.model_dump(exclude_defaults=True)
    if isinstance(value, str):
        flags = [flag.strip() for flag in value.split(",") if flag.strip()]
        if flags and all(flag in CACHE_FLAGS for flag in flags):
            return dict.fromkeys(flags, True)
    return value


def _cache(settings: Settings, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return f"must be one or more of {', '.join(CACHE_FLAGS)} (comma-separated), or an object"
    if not isinstance(value, Mapping):
        return f"must be an object or a string, not {_kind(value)}"
    try:
        CacheControl.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            known = ", ".join(CacheControl.model_fields)
            return f"{_field_name(where)}: unknown field (known: {known})"
        return f"{where}: {err['msg'].lower()}"
    return None


def _tags(settings: Settings, value: object) -> str | None:
    try:
        check_tags(value)
    except ValueError as exc:
        return str(exc)
    return None


def _stream(settings: Settings, value: object) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    return f"must be a boolean, not {_kind(value)}"


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
    return unencodable(value)


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _field_name(key: object) -> str:
    """An unknown field's name as it can be shown: short, printable and encodable."""
    if not isinstance(key, str):
        return f"<{_kind(key)} field name>"
    if len(key) <= 64 and key.isprintable() and unencodable(key) is None:
        return key
    return ascii(key[:40]) + ("..." if len(key) > 40 else "")


_CHECKS: dict[str, _Check] = {
    "prompt": _prompt,
    "model": _model,
    "system": _system,
    "temperature": _temperature,
    "max_tokens": _max_tokens,
    "tenant": _tenant,
    "messages": _messages,
    "params": _params,
    "stream": _stream,
    "cache": _cache,
    "tags": _tags,
}
_REQUIRED = frozenset({"prompt", "model"})


# --- the chat form -------------------------------------------------------------------------------


def _chat_request(settings: Settings, fields: dict[Any, object]) -> Request:
    """A chat body (or a dumped chat Request) as a Request: batched form when it may be."""
    body, problems = _from_dump(fields) if "params" in fields else (fields, [])
    for name in ("model", "tenant", "stream", "cache", "tags"):
        problem = _CHECKS[name](settings, body[name]) if name in body else None
        if name == "model" and name not in body:
            problem = "is required"
        if problem is not None:
            problems.append(f"{name}: {problem}")
    for name in ("prompt", "system"):
        if body.get(name) is not None and not (name == "prompt" and body[name] == ""):
            problems.append(f"{name}: not allowed with messages (put it in messages)")
    messages = body["messages"]
    problems += message_problems(settings, messages)
    params = {
        k: v for k, v in body.items() if k not in OWN_FIELDS and k not in ("prompt", "system")
    }
    problems += param_problems(settings, params)
    if problems:
        raise InvalidRequest("invalid request: " + "; ".join(problems))
    assert isinstance(messages, list)
    common = {
        "model": body["model"],
        "tenant": body.get("tenant"),
        "stream": bool(body.get("stream")),
        "cache": body.get("cache"),
        "tags": body.get("tags") or None,
    }
    eligible = batchable(messages, params)
    if eligible is not None:
        return _build({**common, **vars(eligible)})
    temperature, max_tokens = _mirrored(params)
    return _build(
        {
            **common,
            "messages": messages,
            "params": params,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
    )


def _mirrored(params: Mapping[str, Any]) -> tuple[float, int | None]:
    """A passthrough request's temperature and max tokens, read from its params (for info)."""
    temperature = params.get("temperature")
    max_tokens = params.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = params.get("max_tokens")
    return DEFAULT_TEMPERATURE if temperature is None else float(temperature), max_tokens


def _from_dump(fields: Mapping[Any, object]) -> tuple[dict[Any, object], list[str]]:
    """The chat body behind a dumped Request, and what is wrong with the dump itself."""
    problems = []
    unknown = [_field_name(key) for key in fields if key not in _CHECKS]
    if unknown:
        problems.append(f"{', '.join(unknown)}: unknown field(s) next to params, not permitted")
    params = fields["params"]
    if not isinstance(params, Mapping):
        problems.append(f"params: must be an object, not {_kind(params)}")
        return {k: v for k, v in fields.items() if k in OWN_FIELDS}, problems
    clashes = [name for name in params if name in OWN_FIELDS or name in ("prompt", "system")]
    if clashes:
        problems.append(f"params: must not hold {', '.join(map(_field_name, clashes))}")
    body = {k: v for k, v in fields.items() if k in OWN_FIELDS or k in ("prompt", "system")}
    body.update({k: v for k, v in params.items() if k not in body})
    # The dump mirrors temperature and max tokens from params; anything else was set by hand.
    temperature = params.get("temperature")
    expected = DEFAULT_TEMPERATURE if temperature is None else temperature
    if "temperature" in fields and fields["temperature"] != expected:
        problems.append("temperature: set it in params for a messages request")
    max_tokens = params.get("max_completion_tokens")
    expected = params.get("max_tokens") if max_tokens is None else max_tokens
    if fields.get("max_tokens") is not None and fields["max_tokens"] != expected:
        problems.append("max_tokens: set it in params for a messages request")
    return body, problems
