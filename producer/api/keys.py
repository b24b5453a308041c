"""API keys and the tenants they map to; a key is found in constant time and never logged.

Keys come from ``COALESCE_API_KEYS`` (``key1=tenant-a,key2=tenant-b``) and/or the file named by
``COALESCE_API_KEYS_FILE`` (one ``key=tenant`` per line). With no key configured the server
refuses to start, unless ``COALESCE_API_ALLOW_ANONYMOUS=true``: then every caller is tenant
``default`` and no key is asked for.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from .._exceptions import ConfigError
from .._settings import Settings

ANONYMOUS_TENANT = "default"
MAX_TENANT_CHARS = 200


@dataclass(frozen=True)
class Caller:
    """Who a request is from: its tenant, and a key id (a hash prefix) for per-key limits."""

    tenant: str
    key_id: str


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    caller: Caller


class KeyTable:
    """Looks a presented key up among all configured keys, comparing every one of them."""

    def __init__(self, pairs: list[tuple[str, str]], *, anonymous: bool = False) -> None:
        self.anonymous = anonymous
        self._entries = [
            _Entry(_digest(key), Caller(tenant, _digest(key).hex()[:16])) for key, tenant in pairs
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, presented: str | None) -> Caller | None:
        """The caller a key belongs to, or None; every configured key is compared.

        Digests are compared rather than the keys, so the comparison takes the same time
        whatever the presented key's length.
        """
        if self.anonymous and not self._entries:
            return Caller(ANONYMOUS_TENANT, "anonymous")
        if not presented:
            return None
        digest = _digest(presented)
        found: Caller | None = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.caller
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_keys(settings: Settings) -> KeyTable:
    """The key table from the settings; ConfigError (naming the variable) if unusable."""
    pairs: list[tuple[str, str]] = []
    if settings.api_keys is not None:
        entries = settings.api_keys.get_secret_value().split(",")
        pairs += _parse(entries, "COALESCE_API_KEYS", "entry")
    if settings.api_keys_file:
        pairs += _read_file(settings.api_keys_file)
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ConfigError("COALESCE_API_KEYS / COALESCE_API_KEYS_FILE: a key is listed twice")
    if not pairs and not settings.api_allow_anonymous:
        raise ConfigError(
            "no API keys configured: set COALESCE_API_KEYS ('key=tenant,...') or "
            "COALESCE_API_KEYS_FILE, or COALESCE_API_ALLOW_ANONYMOUS=true to serve without keys"
        )
    return KeyTable(pairs, anonymous=settings.api_allow_anonymous)


def _read_file(path: str) -> list[tuple[str, str]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"COALESCE_API_KEYS_FILE: cannot read {path} ({exc})") from None
    lines = ["" if line.lstrip().startswith("#") else line for line in lines]
    return _parse(lines, f"COALESCE_API_KEYS_FILE ({path})", "line")


def _parse(entries: list[str], where: str, unit: str) -> list[tuple[str, str]]:
    """``key=tenant`` pairs; a bad entry is named by position, never by its text."""
    pairs = []
    for number, raw in enumerate(entries, 1):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, tenant = (part.strip() for part in entry.rpartition("="))
        if not sep or not key or not tenant:
            raise ConfigError(f"{where}: {unit} {number} is not 'key=tenant'")
        if len(tenant) > MAX_TENANT_CHARS or any(c.isspace() for c in key):
            raise ConfigError(f"{where}: {unit} {number} has a key with spaces or a long tenant")
        pairs.append((key, tenant))
    return pairs
