"""Request tags (``tags={"feature": "support-reply", "user": "u42"}``): spend by feature or user.

Bounded so the ledger's rollups stay small: at most 8 tags, names of 1-32 letters, digits,
``_ . -``, values strings of at most 64 characters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_TAGS = 8
MAX_TAG_NAME = 32
MAX_TAG_VALUE = 64
TAG_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,32}")


def check_tags(tags: object) -> dict[str, str]:
    """The tags, or a ValueError saying what is wrong (never quoting a value)."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        return _fail("must be an object of string values")
    if len(tags) > MAX_TAGS:
        return _fail(f"at most {MAX_TAGS} tags per request")
    for name, value in tags.items():
        if not isinstance(name, str) or not TAG_NAME.fullmatch(name):
            return _fail("names are 1-32 letters, digits, '_', '.' or '-'")
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
            return _fail(f"values are strings of at most {MAX_TAG_VALUE} characters")
    return dict(tags)


def _fail(problem: str) -> dict[str, str]:
    raise ValueError(problem)
