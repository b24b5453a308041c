"""coalesce's own per-request controls over HTTP: cache controls and ledger tags.

Cache: headers, or the body's ``coalesce.cache`` object.

Headers (``x-coalesce-cache: no_cache, no_store``, ``x-coalesce-cache-namespace``,
``x-coalesce-cache-ttl``; a standard ``Cache-Control: no-cache`` / ``no-store`` counts too)
suit a proxy or a gateway; the body field (``extra_body={"coalesce": {"cache": {...}}}`` with
the OpenAI SDK) suits an app. Where both set a field, the body wins. Mistakes are 400s naming
the header or field, checked by the same validation as ``Client.submit(cache=...)``.

Tags (for the ledger and budgets): ``x-coalesce-tags: feature=support-reply, user=u42`` or
``{"coalesce": {"tags": {...}}}``; body tags win per name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.datastructures import Headers

from .._models import CACHE_FLAGS
from .errors import ApiError

FLAGS_HEADER = "x-coalesce-cache"
NAMESPACE_HEADER = "x-coalesce-cache-namespace"
TTL_HEADER = "x-coalesce-cache-ttl"
TAGS_HEADER = "x-coalesce-tags"
BODY_FIELD = "coalesce"
_STANDARD = {"no-cache": "no_cache", "no-store": "no_store"}


def controls(
    headers: Headers, fields: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The request's ``cache=`` and ``tags=``, taking ``coalesce`` out of ``fields`` (it is
    never sent upstream)."""
    extra = fields.pop(BODY_FIELD, None)
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping) or set(extra) - {"cache", "tags"}:
        raise ApiError(
            400, "coalesce: must be an object with 'cache' and/or 'tags'", param=BODY_FIELD
        )
    return _cache(headers, extra.get("cache")), _tags(headers, extra.get("tags"))


def _cache(headers: Headers, body: object) -> dict[str, Any] | None:
    control = _from_headers(headers)
    if body is not None:
        if isinstance(body, str):  # shorthand flags, as in Client.submit(cache="no_cache")
            body = {flag.strip(): True for flag in body.split(",") if flag.strip()}
        if not isinstance(body, Mapping):
            raise ApiError(400, "coalesce.cache: must be an object or flags", param=BODY_FIELD)
        control.update(body)
    return control or None


def _tags(headers: Headers, body: object) -> dict[str, Any] | None:
    tags: dict[str, Any] = {}
    for pair in headers.get(TAGS_HEADER, "").split(","):
        if not pair.strip():
            continue
        name, eq, value = pair.partition("=")
        if not eq:
            raise ApiError(400, f"{TAGS_HEADER}: write name=value pairs, comma-separated")
        tags[name.strip()] = value.strip()
    if body is not None:
        if not isinstance(body, Mapping):
            raise ApiError(400, "coalesce.tags: must be an object", param=BODY_FIELD)
        tags.update(body)
    return tags or None


def _from_headers(headers: Headers) -> dict[str, Any]:
    control: dict[str, Any] = {}
    for directive in headers.get("cache-control", "").split(","):
        name = _STANDARD.get(directive.strip().lower())
        if name:
            control[name] = True
    for flag in headers.get(FLAGS_HEADER, "").split(","):
        flag = flag.strip().lower()
        if not flag:
            continue
        if flag not in CACHE_FLAGS:
            allowed = ", ".join(CACHE_FLAGS)
            raise ApiError(400, f"{FLAGS_HEADER}: unknown flag (allowed: {allowed})")
        control[flag] = True
    namespace = headers.get(NAMESPACE_HEADER)
    if namespace is not None:
        control["namespace"] = namespace
    ttl = headers.get(TTL_HEADER)
    if ttl is not None:
        if not ttl.strip().isdigit():
            raise ApiError(400, f"{TTL_HEADER}: must be a whole number of seconds")
        control["ttl"] = int(ttl)
    return control
