"""Canonical request keys: equal keys mean the same question with the same parameters.

The key covers the tenant, so two tenants never share an answer, and every parameter that can
change the answer, so a change of model, temperature, seed or tools is never served a stale
answer. Fields that only route or label a request (``stream``, ``stream_options``, ``user``,
``metadata``) are left out, and so is a parameter sent as null (the provider's default).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping
from typing import Any

from ._models import Request

KEY_VERSION = 1
STATS_KEY = "coalesce:stats"  # per-model counters (worker.shared.stats)
DEDUP_PREFIX = "coalesce:dd:"
EXACT_PREFIX = "coalesce:cx:"  # + "<ht>.<hn>.<request key>": exact cache entries
SEMANTIC_PREFIX = "coalesce:cs:e:"  # + "<ht>.<hn>.<context hash>:<id>": semantic entries
DEFAULT_NAMESPACE = "default"
NON_KEY_PARAMS = frozenset({"stream", "stream_options", "user", "metadata"})


def _text(value: str | None) -> str:
    # NFC so that visually identical strings typed differently share a key; outer
    # whitespace never changes what a model is asked.
    return unicodedata.normalize("NFC", value or "").strip()


def _canonical(value: Any) -> Any:
    """JSON with strings in NFC and whole floats as ints (``1.0`` and ``1`` ask the same)."""
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else value + 0.0
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def answer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that can change the answer, canonical."""
    return {
        name: _canonical(value)
        for name, value in params.items()
        if name not in NON_KEY_PARAMS and value is not None
    }


def canonical_fields(request: Request) -> dict[str, object]:
    if request.messages is not None:
        return {
            "v": KEY_VERSION,
            "tenant": request.tenant or "",
            "model": request.model,
            "messages": _canonical(request.messages),
            "params": answer_params(request.params),
        }
    fields: dict[str, object] = {
        "v": KEY_VERSION,
        "tenant": request.tenant or "",
        "model": request.model,
        "system": _text(request.system),
        "prompt": _text(request.prompt),
        "temperature": float(request.temperature) + 0.0,  # + 0.0 turns -0.0 into 0.0
        "max_tokens": request.max_tokens,
    }
    params = answer_params(request.params)
    if params:  # absent when empty, so a plain prompt keeps the key it always had
        fields["params"] = params
    return fields


def request_key(request: Request) -> str:
    """A hex digest that identical requests share and nothing else does."""
    blob = json.dumps(canonical_fields(request), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def partition(tenant: str | None, namespace: str | None) -> str:
    """``<ht>.<hn>``: where one tenant's namespace of the caches starts (hashes, never names)."""
    return f"{short_hash(tenant or '')}.{short_hash(namespace or DEFAULT_NAMESPACE)}"
