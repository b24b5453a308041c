"""Chat-shaped requests: checking an OpenAI body, and deciding whether it may be batched.

A body is checked field by field, and every message and part by its index
(``messages[2].content[0].text: must be a string``). Values are never quoted: message text is
user text. Fields this version does not know are allowed and forwarded unchanged, as long as
they are JSON a provider can read.

A batch-eligible request (an optional system or developer message, then exactly one user
message, text only, no tools, a text response format, ``n`` 1, no logprobs, no stop, no
logit_bias, and only parameters a shared call can carry) becomes a prompt-form request, so it
joins the batching path; everything else stays a conversation and is sent as its own call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._settings import Settings

ROLES = ("system", "developer", "user", "assistant", "tool")
SYSTEM_ROLES = frozenset({"system", "developer"})
# Request fields that are not OpenAI body fields: they never reach ``params``.
OWN_FIELDS = frozenset({"messages", "model", "tenant", "stream", "cache", "tags"})
# Answer-changing parameters a batched call can carry for all of its requests (group key).
BATCH_PARAMS = ("top_p", "seed", "presence_penalty", "frequency_penalty")
_PARAM_DEFAULTS: dict[str, float] = {"top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
# Fields a batch-eligible body may hold besides those; checked for their harmless values.
_BATCH_FIELDS = frozenset(
    {
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "response_format",
        "logprobs",
        "user",
        "metadata",
        "stream_options",
        *BATCH_PARAMS,
    }
)
DEFAULT_TEMPERATURE = 1.0  # what OpenAI uses when a chat body has none

_Check = Callable[[object, Settings], str | None]


# --- generic value checks ----------------------------------------------------------------------


def kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def unencodable(value: str) -> str | None:
    """Lone surrogates survive Python strings but not JSON, Redis or the upstream API."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains text that cannot be encoded as UTF-8 (lone surrogate at index {exc.start})"
        )
    return None


def json_problem(value: object, path: str, depth: int = 0) -> str | None:
    """``"<path>: <problem>"`` for the first part of ``value`` that is not plain JSON."""
    if depth > 32:
        return f"{path}: nested too deeply"
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}: must be a finite number"
    if isinstance(value, str):
        problem = unencodable(value)
        return f"{path}: {problem}" if problem else None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = json_problem(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or unencodable(key):
                return f"{path}: field names must be text"
            found = json_problem(item, f"{path}.{key}" if _plain(key) else path, depth + 1)
            if found:
                return found
        return None
    return f"{path}: must be JSON (string, number, boolean, null, array, object), not {kind(value)}"


def _plain(name: str) -> bool:
    return len(name) <= 64 and name.isprintable()


def _number(value: object, low: float, high: float) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, not {kind(value)}"
    if not math.isfinite(value) or not low <= value <= high:
        return f"must be between {low:g} and {high:g}"
    return None


def _integer(value: object, low: int, high: int, setting: str | None = None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, not {kind(value)}"
    if value < low:
        return f"must be at least {low}"
    if value > high:
        return f"must be at most {high}" + (f" ({setting})" if setting else "")
    return None


# --- the body's parameters ------------------------------------------------------------------------


def _max_tokens(value: object, settings: Settings) -> str | None:
    return _integer(value, 1, settings.max_tokens_limit, "COALESCE_MAX_TOKENS_LIMIT")


def _stop(value: object, settings: Settings) -> str | None:
    if isinstance(value, str):
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None if len(value) <= 4 else "must hold at most 4 sequences"
    return f"must be a string or an array of strings, not {kind(value)}"


def _object(value: object, settings: Settings) -> str | None:
    return None if isinstance(value, Mapping) else f"must be an object, not {kind(value)}"


def _boolean(value: object, settings: Settings) -> str | None:
    return None if isinstance(value, bool) else f"must be a boolean, not {kind(value)}"


def _string(value: object, settings: Settings) -> str | None:
    return None if isinstance(value, str) else f"must be a string, not {kind(value)}"


def _response_format(value: object, settings: Settings) -> str | None:
    if not isinstance(value, Mapping):
        return f"must be an object, not {kind(value)}"
    return None if isinstance(value.get("type"), str) else "type: must be a string"


def _tool_choice(value: object, settings: Settings) -> str | None:
    if isinstance(value, str | Mapping):
        return None
    return f"must be a string or an object, not {kind(value)}"


def _tools(value: object, settings: Settings) -> str | None:
    if not isinstance(value, list):
        return f"must be an array, not {kind(value)}"
    for index, tool in enumerate(value):
        if not isinstance(tool, Mapping):
            return f"[{index}]: must be an object, not {kind(tool)}"
        if not isinstance(tool.get("type"), str):
            return f"[{index}].type: must be a string"
        function = tool.get("function")
        if tool["type"] == "function":
            if not isinstance(function, Mapping):
                return f"[{index}].function: must be an object"
            if not isinstance(function.get("name"), str) or not function["name"]:
                return f"[{index}].function.name: must be a non-empty string"
    return None


PARAM_CHECKS: dict[str, _Check] = {
    "temperature": lambda v, s: _number(v, 0, 2),
    "top_p": lambda v, s: _number(v, 0, 1),
    "presence_penalty": lambda v, s: _number(v, -2, 2),
    "frequency_penalty": lambda v, s: _number(v, -2, 2),
    "max_tokens": _max_tokens,
    "max_completion_tokens": _max_tokens,
    "n": lambda v, s: _integer(v, 1, 128),
    "seed": lambda v, s: _integer(v, -(2**63), 2**63 - 1),
    "top_logprobs": lambda v, s: _integer(v, 0, 20),
    "stop": _stop,
    "logit_bias": _object,
    "metadata": _object,
    "stream_options": _object,
    "response_format": _response_format,
    "tools": _tools,
    "functions": lambda v, s: None if isinstance(v, list) else f"must be an array, not {kind(v)}",
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _boolean,
    "logprobs": _boolean,
    "user": _string,
}


def param_problems(settings: Settings, params: Mapping[Any, object], prefix: str = "") -> list[str]:
    """Problems with the body's other fields; null means "the provider's default" for any."""
    problems = []
    for name, value in params.items():
        if not isinstance(name, str) or unencodable(name) or not name:
            problems.append(f"{prefix}{_shown(name)}: field names must be non-empty text")
            continue
        if value is None:
            continue
        check = PARAM_CHECKS.get(name)
        problem = check(value, settings) if check else None
        if problem is not None:
            sep = "" if problem.startswith("[") else ": "
            problems.append(f"{prefix}{_shown(name)}{sep}{problem}")
            continue
        found = json_problem(value, f"{prefix}{_shown(name)}")
        if found:
            problems.append(found)
    return problems


def _shown(name: object) -> str:
    """A field name as it can be shown: short, printable and encodable."""
    if not isinstance(name, str):
        return f"<{kind(name)} field name>"
    if _plain(name) and unencodable(name) is None:
        return name
    return ascii(name[:40]) + ("..." if len(name) > 40 else "")


# --- messages ------------------------------------------------------------------------------------


@dataclass
class _Text:
    """Characters of message text seen so far: system/developer, and the rest."""

    system: int = 0
    other: int = 0


def message_problems(settings: Settings, messages: object) -> list[str]:
    """Problems with the conversation, one per bad message field, then the size limits."""
    if not isinstance(messages, list):
        return [f"messages: must be an array of messages, not {kind(messages)}"]
    if not messages:
        return ["messages: must hold at least one message"]
    if len(messages) > settings.max_messages:
        return [
            f"messages: {len(messages)} messages, over the limit of {settings.max_messages} "
            "(COALESCE_MAX_MESSAGES)"
        ]
    text = _Text()
    problems = []
    for index, message in enumerate(messages):
        problems += _message(message, f"messages[{index}]", text)
    problems += _size_problems(settings, text)
    return problems


def _size_problems(settings: Settings, text: _Text) -> list[str]:
    problems = []
    if text.other > settings.max_prompt_chars:
        problems.append(
            f"messages: {text.other} characters of message text, over the limit of "
            f"{settings.max_prompt_chars} (COALESCE_MAX_PROMPT_CHARS)"
        )
    if text.system > settings.max_system_chars:
        problems.append(
            f"messages: {text.system} characters of system and developer text, over the limit "
            f"of {settings.max_system_chars} (COALESCE_MAX_SYSTEM_CHARS)"
        )
    return problems


def _message(message: object, path: str, text: _Text) -> list[str]:
    if not isinstance(message, Mapping):
        return [f"{path}: must be an object, not {kind(message)}"]
    role = message.get("role")
    if role is None:
        return [f"{path}.role: is required"]
    if role not in ROLES:
        shown = "a " + kind(role) if not isinstance(role, str) else "another value"
        return [f"{path}.role: must be one of {', '.join(ROLES)}, not {shown}"]
    problems = _content(message, str(role), path, text)
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        problems.append(f"{path}.tool_call_id: must be a string for a tool message")
    if "name" in message and not isinstance(message["name"], str):
        problems.append(f"{path}.name: must be a string, not {kind(message['name'])}")
    if role == "assistant" and message.get("tool_calls") is not None:
        problems += _tool_calls(message["tool_calls"], f"{path}.tool_calls")
    if not problems:
        found = json_problem(dict(message), path)
        problems += [found] if found else []
    return problems


def _content(message: Mapping[str, Any], role: str, path: str, text: _Text) -> list[str]:
    content = message.get("content")
    where = f"{path}.content"
    if content is None:
        calls = message.get("tool_calls") or message.get("function_call") or message.get("audio")
        if role == "assistant" and calls:
            return []
        return [f"{where}: is required for a {role} message"]
    if isinstance(content, str):
        _count(text, role, len(content))
        problem = unencodable(content)
        return [f"{where}: {problem}"] if problem else []
    if not isinstance(content, list):
        return [f"{where}: must be a string or an array of content parts, not {kind(content)}"]
    if not content:
        return [f"{where}: must hold at least one content part"]
    problems = []
    for index, part in enumerate(content):
        problems += _part(part, role, f"{where}[{index}]", text)
    return problems


def _part(part: object, role: str, path: str, text: _Text) -> list[str]:
    if not isinstance(part, Mapping):
        return [f"{path}: must be an object, not {kind(part)}"]
    part_type = part.get("type")
    if not isinstance(part_type, str):
        return [f"{path}.type: must be a string"]
    if part_type != "text":
        if role in ("user", "assistant"):
            return []  # images, audio, files, refusals: the provider judges them
        return [f"{path}.type: a {role} message takes text parts only"]
    value = part.get("text")
    if not isinstance(value, str):
        return [f"{path}.text: must be a string, not {kind(value)}"]
    _count(text, role, len(value))
    problem = unencodable(value)
    return [f"{path}.text: {problem}"] if problem else []


def _count(text: _Text, role: str, chars: int) -> None:
    if role in SYSTEM_ROLES:
        text.system += chars
    else:
        text.other += chars


def _tool_calls(calls: object, path: str) -> list[str]:
    if not isinstance(calls, list):
        return [f"{path}: must be an array, not {kind(calls)}"]
    for index, call in enumerate(calls):
        where = f"{path}[{index}]"
        if not isinstance(call, Mapping):
            return [f"{where}: must be an object, not {kind(call)}"]
        if not isinstance(call.get("id"), str):
            return [f"{where}.id: must be a string"]
        function = call.get("function")
        if call.get("type", "function") == "function":
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                return [f"{where}.function.name: must be a string"]
            if not isinstance(function.get("arguments"), str):
                return [f"{where}.function.arguments: must be a string (JSON text)"]
    return []


# --- batch eligibility ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Batchable:
    """A chat request in prompt form: what a batched call asks, and the params it carries."""

    prompt: str
    system: str | None
    temperature: float
    max_tokens: int | None
    params: dict[str, Any]


def batchable(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Batchable | None:
    """The prompt form of a checked chat request, or None when it must pass through."""
    texts = _prompt_and_system(messages)
    if texts is None or not _batch_params(params):
        return None
    prompt, system = texts
    temperature = params.get("temperature")
    max_tokens = params.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = params.get("max_tokens")
    kept = {
        name: params[name]
        for name in BATCH_PARAMS
        if params.get(name) is not None and params[name] != _PARAM_DEFAULTS.get(name)
    }
    return Batchable(
        prompt=prompt,
        system=system,
        temperature=DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        max_tokens=max_tokens,
        params=kept,
    )


def _prompt_and_system(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str | None] | None:
    if not 1 <= len(messages) <= 2 or messages[-1].get("role") != "user":
        return None
    if len(messages) == 2 and messages[0].get("role") not in SYSTEM_ROLES:
        return None
    texts = [_plain_text(m) for m in messages]
    if any(t is None for t in texts):
        return None
    prompt = texts[-1]
    if prompt is None or not prompt.strip():
        return None
    return prompt, texts[0] if len(texts) == 2 else None


def _plain_text(message: Mapping[str, Any]) -> str | None:
    """A message's text if it is nothing but text (a string or one text part), else None."""
    if set(message) - {"role", "content"}:
        return None  # a name, or anything else, changes what the model sees
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and len(content) == 1:
        part = content[0]
        if isinstance(part, Mapping) and set(part) == {"type", "text"} and part["type"] == "text":
            text = part["text"]
            return text if isinstance(text, str) else None
    return None


def _batch_params(params: Mapping[str, Any]) -> bool:
    """Whether these fields let the request share a call (unknown fields never do)."""
    present = {name: value for name, value in params.items() if value is not None}
    if set(present) - _BATCH_FIELDS:
        return False
    if present.get("n", 1) != 1 or present.get("logprobs", False) is not False:
        return False
    if "max_tokens" in present and "max_completion_tokens" in present:
        return False
    return bool(present.get("response_format", {"type": "text"}) == {"type": "text"})
