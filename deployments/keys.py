"""API keys: generated once, stored only as SHA-256 hashes, looked up in constant time.

Keys come from the YAML (hashes), from a mounted secret file, or from an environment
variable, so Helm can inject them without writing plaintext into the config.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

import yaml

KEY_PREFIX = "tk-"
HASH_PREFIX = "sha256:"
ENV_KEYS = "TIERED_API_KEYS"  # "tenant:key,tenant:key" or JSON {"tenant": ["key", ...]}
ENV_KEYS_FILE = "TIERED_API_KEYS_FILE"  # YAML/JSON {"tenant": ["key or sha256:hash", ...]}


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def as_hash(key_or_hash: str) -> str:
    return key_or_hash if key_or_hash.startswith(HASH_PREFIX) else hash_key(key_or_hash)


class KeyRing:
    """Maps key hashes to tenant names; revoked hashes never authenticate."""

    def __init__(self, hashes_by_tenant: dict[str, list[str]], revoked: list[str] = ()) -> None:  # type: ignore[assignment]
        self._revoked = {as_hash(h) for h in revoked}
        self._entries = [
            (as_hash(h).encode(), tenant)
            for tenant, hashes in hashes_by_tenant.items()
            for h in hashes
        ]

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant owning `key`; compares against every entry so timing reveals nothing."""
        if not key:
            return None
        presented = hash_key(key)
        if presented in self._revoked:
            return None
        found = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(digest, presented.encode()):
                found = tenant
        return found


def external_keys() -> dict[str, list[str]]:
    """Keys (or hashes) from the environment and a mounted secret file, by tenant."""
    found: dict[str, list[str]] = {}
    raw = os.environ.get(ENV_KEYS, "").strip()
    if raw.startswith("{"):
        for tenant, keys in json.loads(raw).items():
            found.setdefault(tenant, []).extend(keys)
    elif raw:
        for pair in raw.split(","):
            tenant, _, key = pair.strip().partition(":")
            if tenant and key:
                found.setdefault(tenant, []).append(key)
    path = os.environ.get(ENV_KEYS_FILE)
    if path and Path(path).is_file():
        for tenant, keys in (yaml.safe_load(Path(path).read_text()) or {}).items():
            found.setdefault(tenant, []).extend([keys] if isinstance(keys, str) else keys)
    return found


def new_key_command(tenant: str) -> str:
    """Text for `tiered keys new TENANT`: the key, shown once, and the line to paste."""
    key = new_key()
    return (
        f"API key for tenant {tenant!r} (shown once, store it now):\n  {key}\n"
        f"Paste under tenants[name={tenant}].api_key_hashes in your Tiered YAML:\n"
        f'  - "{hash_key(key)}"\n'
    )
