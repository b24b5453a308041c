"""Canonical request keys: equal keys mean the same question with the same parameters.

The key covers the tenant, so two tenants never share an answer, and every generation
parameter, so a change of model or temperature is never served a stale answer.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata

from ._models import Request

KEY_VERSION = 1


def _text(value: str | None) -> str:
    # NFC so that visually identical strings typed differently share a key; outer
    # whitespace never changes what a model is asked.
    return unicodedata.normalize("NFC", value or "").strip()


def canonical_fields(request: Request) -> dict[str, object]:
    return {
        "v": KEY_VERSION,
        "tenant": request.tenant or "",
        "model": request.model,
        "system": _text(request.system),
        "prompt": _text(request.prompt),
        "temperature": float(request.temperature) + 0.0,  # + 0.0 turns -0.0 into 0.0
        "max_tokens": request.max_tokens,
    }


def request_key(request: Request) -> str:
    """A hex digest that identical requests share and nothing else does."""
    blob = json.dumps(canonical_fields(request), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
