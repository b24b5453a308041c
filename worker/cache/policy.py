"""What the caches may do with one request: read, store, for how long, under which keys.

Keys are hashes, never prompt text. Every key starts with the tenant's and the namespace's
hashes (``<ht>.<hn>.``), so a tenant or a namespace can be cleared on its own and two tenants
never share an entry. The exact key adds the request's dedup key, which covers the model,
every message and every answer-changing parameter; the semantic scope adds a hash of all of
that except the last user turn, so a follow-up only matches inside its own conversation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from producer import Request, Settings
from producer._keys import DEFAULT_NAMESPACE, EXACT_PREFIX, answer_params, partition, short_hash

# Prompts about the present: their answer goes stale, so they get the short TTL.
_PRESENT = re.compile(
    r"\b(?:today|tonight|tomorrow|yesterday|now|nowadays|currently|current|latest|recent|"
    r"recently|this (?:week|weekend|month|year|morning|afternoon|evening|quarter|season)|"
    r"at the moment|these days|so far|as of|up[- ]to[- ]date|live|breaking|trending)\b",
    re.IGNORECASE,
)


def about_present(text: str) -> bool:
    return _PRESENT.search(text) is not None


@dataclass(frozen=True)
class Plan:
    """The caches' part in one request."""

    read: bool  # serve a stored answer (exact, then semantic)
    store: bool  # store this request's answer once settled
    # Keep and read dedup's short answer record (DEDUP_TTL_S): only with the caches off, since
    # the cache serves later repeats, namespaced and clearable.
    keep_dedup: bool
    ttl_s: int
    exact_key: str
    scope: str | None  # the semantic scope; None when the request has no last user turn
    text: str  # the last user turn, embedded by the semantic cache


DEDUP_ONLY = Plan(False, False, True, 0, "", None, "")  # the caches are off: dedup as ever
UNCACHED = Plan(False, False, False, 0, "", None, "")


def plan(request: Request, key: str, settings: Settings) -> Plan:
    """The plan for ``request`` (whose dedup key is ``key``) under ``settings``."""
    control = request.cache
    if not settings.cache:
        return DEDUP_ONLY
    sampled = request.temperature > 0 and not (control and control.sampled)
    if sampled or (control is not None and control.sensitive):
        # Identical requests in flight still share one call; nothing is kept for later ones.
        return UNCACHED
    namespace = control.namespace if control else DEFAULT_NAMESPACE
    prefix = partition(request.tenant, namespace)
    text, earlier = _turns(request)
    ttl = settings.cache_present_ttl_s if about_present(text) else settings.cache_ttl_s
    if control is not None and control.ttl is not None:
        ttl = control.ttl
    scope = f"{prefix}.{short_hash(_context(request, earlier))}" if text else None
    return Plan(
        read=not (control and control.no_cache),
        store=not (control and control.no_store),
        keep_dedup=False,  # the cache entry serves later repeats, per namespace
        ttl_s=min(ttl, settings.cache_max_ttl_s),
        exact_key=f"{EXACT_PREFIX}{prefix}.{key}",
        scope=scope,
        text=text,
    )


def _turns(request: Request) -> tuple[str, list[dict[str, Any]]]:
    """The last user turn's text ("" if the request does not end with one) and what precedes it."""
    if request.messages is None:
        return request.prompt, []
    *earlier, last = request.messages
    if last.get("role") != "user":
        return "", []
    content = last.get("content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content):
            return "", []  # an image or a file: the text alone does not say what was asked
        content = "\n".join(str(p) for p in parts)
    return (content if isinstance(content, str) else ""), earlier


def _context(request: Request, earlier: list[dict[str, Any]]) -> str:
    """Everything but the last user turn that can change the answer, as canonical JSON."""
    fields = {
        "model": request.model,
        "system": (request.system or "").strip(),
        "temperature": float(request.temperature) + 0.0,
        "max_tokens": request.max_tokens,
        "params": answer_params(request.params),
        "earlier": earlier,
    }
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)
