"""API keys: generated once, stored only as SHA-256 hashes, looked up in constant time.

Keys come from the YAML (hashes), from a mounted secret file, or from an environment
variable, so Helm can inject them without writing plaintext into the config. A key is
revoked by listing its hash under `revoked_key_hashes` or by removing it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from deployments.api.errors import OpenAIError
from deployments.config.tenants import TENANT_NAME_PATTERN, TenantSpec

log = logging.getLogger(__name__)

KEY_PREFIX = "tk-"
HASH_PREFIX = "sha256:"
ENV_KEYS = "TIERED_API_KEYS"  # "tenant:key,tenant:key" or JSON {"tenant": ["key", ...]}
ENV_KEYS_FILE = "TIERED_API_KEYS_FILE"  # YAML/JSON {"tenant": ["key or sha256:hash", ...]}
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def as_hash(key_or_hash: str) -> str:
    """A stored hash as is (lowercased); anything else is a plaintext key, hashed."""
    text = key_or_hash.strip()
    return text.lower() if _HASH_RE.match(text.lower()) else hash_key(text)


def bearer_token(authorization: str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` header value, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyRing:
    """Maps key hashes to tenants; revoked hashes never authenticate."""

    def __init__(
        self,
        hashes_by_tenant: Mapping[str, Iterable[str]],
        revoked: Iterable[str] = (),
        tenants: Mapping[str, TenantSpec] | None = None,
    ) -> None:
        self._revoked = {as_hash(h).encode() for h in revoked}
        self._entries = [
            (as_hash(h).encode(), tenant)
            for tenant, hashes in hashes_by_tenant.items()
            for h in hashes
        ]
        self._tenants = dict(tenants or {})

    @classmethod
    def from_tenants(
        cls,
        tenants: Iterable[TenantSpec],
        revoked: Iterable[str] = (),
        extra: Mapping[str, list[str]] | None = None,
    ) -> KeyRing:
        """Config hashes plus `extra` keys (external_keys()) for the configured tenants."""
        specs = {t.name: t for t in tenants}
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(specs))
        if unknown:
            log.warning("API keys given for unknown tenants %s are ignored", unknown)
        hashes = {name: [*t.api_key_hashes, *extra.get(name, [])] for name, t in specs.items()}
        return cls(hashes, revoked, specs)

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant owning `key`, or None. Compares the key's hash against every entry,
        found or not, so response time says nothing about which keys exist."""
        if not key:
            return None
        presented = hash_key(key).encode()
        revoked = False
        for digest in self._revoked:
            revoked |= hmac.compare_digest(digest, presented)
        found = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return None if revoked else found

    def authenticate(self, key: str | None) -> TenantSpec:
        """The tenant of a bearer key; OpenAIError 401 when missing, unknown or revoked."""
        if not key:
            raise OpenAIError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        name = self.tenant_for(key)
        tenant = self._tenants.get(name) if name is not None else None
        if tenant is None:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant


def parse_env_keys(raw: str) -> dict[str, list[str]]:
    """TIERED_API_KEYS: "tenant:key,tenant:key" or JSON {"tenant": ["key", ...]}."""
    raw = raw.strip()
    if not raw:
        return {}
    if raw.startswith("{"):
        try:
            return _as_mapping(json.loads(raw), ENV_KEYS)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ENV_KEYS}: invalid JSON ({exc.msg})") from None
    found: dict[str, list[str]] = {}
    for pair in raw.split(","):
        tenant, _, key = pair.strip().partition(":")
        if not tenant or not key:
            raise ValueError(f"{ENV_KEYS}: expected 'tenant:key' pairs, got {pair.strip()!r}")
        found.setdefault(tenant, []).append(key)
    return found


def load_key_file(path: str | Path) -> dict[str, list[str]]:
    """A mounted secret: YAML or JSON {tenant: [key or sha256:hash, ...] | key}."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML/JSON ({exc})") from None
    return _as_mapping(data or {}, str(path))


def _as_mapping(data: object, source: str) -> dict[str, list[str]]:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of tenant to keys")
    found: dict[str, list[str]] = {}
    for tenant, keys in data.items():
        items = [keys] if isinstance(keys, str) else keys
        if not isinstance(items, list) or not all(isinstance(k, str) and k for k in items):
            raise ValueError(f"{source}: keys of {tenant!r} must be strings")
        found.setdefault(str(tenant), []).extend(items)
    return found


def external_keys(environ: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Keys (or hashes) from the environment and a mounted secret file, by tenant.

    A file named by TIERED_API_KEYS_FILE that does not exist is an error: keys someone
    meant to install must not vanish silently.
    """
    env = os.environ if environ is None else environ
    found = parse_env_keys(env.get(ENV_KEYS, ""))
    path = env.get(ENV_KEYS_FILE)
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{ENV_KEYS_FILE}={path}: no such file")
        for tenant, keys in load_key_file(path).items():
            found.setdefault(tenant, []).extend(keys)
    return found


def new_key_command(tenant: str) -> str:
    """Text for `tiered keys new TENANT`: the key, shown once, and the line to paste."""
    if not re.match(TENANT_NAME_PATTERN, tenant):
        raise ValueError(f"invalid tenant name {tenant!r}: use letters, digits, '_', '.', '-'")
    key = new_key()
    return (
        f"API key for tenant {tenant!r} (shown once, store it now):\n  {key}\n"
        f"Paste under tenants[name={tenant}].api_key_hashes in your Tiered YAML:\n"
        f'  - "{hash_key(key)}"\n'
    )
