"""API keys: generated once, stored only as SHA-256 hashes, looked up in constant time.

Tenant keys and admin keys (GET /admin/usage) live in separate namespaces, so no tenant
name, "admin" included, can ever stand for the admin keys. They come from:

- the Tiered YAML, hashes only: `tenants[].api_key_hashes` and `admin_key_hashes`;
- `TIERED_API_KEYS`, tenant keys: `tenant:key,tenant:key` or JSON `{"tenant": ["key", ...]}`;
- `TIERED_ADMIN_KEYS`, admin keys: `key,key` or JSON `["key", ...]`;
- the YAML/JSON file named by `TIERED_API_KEYS_FILE` (e.g. a mounted Kubernetes Secret)::

      tenants:                  # tenant name -> keys
        acme: ["sha256:<hex>", ...]
      admin: ["sha256:<hex>"]   # admin keys

  Only these two top-level fields are read. The flat `{tenant: [keys]}` file of earlier
  releases is refused, not guessed at: in it `admin` meant both a tenant and the admin keys.

Outside the YAML an entry is a plaintext key (hashed here) or a stored hash; one that
starts with `sha256:` must be a well-formed hash, never hashed as if it were a key. Every
external key must name a tenant of the config, and a key may be listed once across all
sources. Any violation is a ConfigError naming the source, at startup. A key is revoked by
listing its hash under `revoked_key_hashes` (tenant and admin alike) or by removing it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deployments.config.files import read_yaml
from deployments.config.models import ConfigError
from deployments.config.tenants import (
    HASH_PREFIX,
    HASH_RE,
    check_unique_keys,
    is_tenant_name,
)

if TYPE_CHECKING:
    from deployments.config.tiered import TieredConfig

KEY_PREFIX = "tk-"
ENV_KEYS = "TIERED_API_KEYS"  # tenant keys: "tenant:key,tenant:key" or JSON {"tenant": [...]}
ENV_ADMIN_KEYS = "TIERED_ADMIN_KEYS"  # admin keys: "key,key" or JSON ["key", ...]
ENV_KEYS_FILE = "TIERED_API_KEYS_FILE"  # YAML/JSON {tenants: {name: [...]}, admin: [...]}
KEY_FILE_FIELDS = ("tenants", "admin")
ADMIN = "<admin>"  # what the admin ring's tenant_for returns; not a legal tenant name


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def as_hash(key_or_hash: str) -> str:
    """A stored hash as is (lowercased), a plaintext key hashed. Something that claims to
    be a hash (starts with `sha256:`) but is malformed is a ValueError: hashing it would
    turn a typo'd hash into a working key whose plaintext is the typo."""
    text = key_or_hash.strip()
    if not text:
        raise ValueError("empty key")
    if text.lower().startswith(HASH_PREFIX):
        if not HASH_RE.fullmatch(text.lower()):
            raise ValueError("starts with 'sha256:' but is not a key hash (64 hex digits)")
        return text.lower()
    return hash_key(text)


class KeyRing:
    """Maps key hashes to owners (tenant names, or ADMIN); revoked hashes never match."""

    def __init__(
        self, hashes_by_tenant: Mapping[str, Iterable[str]], revoked: Iterable[str] = ()
    ) -> None:
        self._revoked = [as_hash(h).encode() for h in revoked]
        self._entries = [
            (as_hash(h).encode(), tenant)
            for tenant, hashes in hashes_by_tenant.items()
            for h in hashes
        ]

    def tenant_for(self, key: str | None) -> str | None:
        """The owner of `key`, or None. Compares the key's hash against every entry,
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

    def owners(self) -> set[str]:
        """The owners holding at least one key that is not revoked."""
        revoked = set(self._revoked)
        return {tenant for digest, tenant in self._entries if digest not in revoked}


@dataclass(frozen=True)
class KeyRings:
    """The ingress's two rings: tenant keys and admin keys, never mixed."""

    tenants: KeyRing  # tenant_for(token) -> tenant name | None
    admin: KeyRing  # tenant_for(token) -> ADMIN | None
    door: str | None = None  # a tenant's own front door admits that tenant's keys only


@dataclass(frozen=True)
class ExternalKey:
    """One key or hash given outside the YAML: its hash, its owner, and where it was
    given (for error messages; never the key itself)."""

    where: str
    tenant: str | None  # None: an admin key
    digest: str


def _hashed(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a key string, got {type(value).__name__}")
    try:
        return as_hash(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _key_list(where: str, value: object) -> list[object]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list of keys, got {type(value).__name__}")
    return items


def _tenant_keys(source: str, data: object) -> list[ExternalKey]:
    """{tenant: [key, ...] | key}, each entry hashed and named `source tenant[i]`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of tenant name to keys")
    found = []
    for tenant, value in data.items():
        name = str(tenant)
        if not is_tenant_name(name):
            raise ConfigError(f"{source}: {name!r} is not a tenant name")
        for i, key in enumerate(_key_list(f"{source}.{name}", value)):
            where = f"{source}.{name}[{i}]"
            found.append(ExternalKey(where, name, _hashed(where, key)))
    return found


def _admin_keys(source: str, data: object) -> list[ExternalKey]:
    found = []
    for i, key in enumerate(_key_list(source, data)):
        where = f"{source}[{i}]"
        found.append(ExternalKey(where, None, _hashed(where, key)))
    return found


def _json(source: str, raw: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: invalid JSON ({exc.msg})") from None


def parse_env_keys(raw: str) -> list[ExternalKey]:
    """TIERED_API_KEYS: "tenant:key,tenant:key" or JSON {"tenant": ["key", ...]}. Tenant
    keys only: a tenant named "admin" here is that tenant, never the admin."""
    raw = raw.strip()
    if not raw:
        return []
    if raw.startswith("{"):
        return _tenant_keys(ENV_KEYS, _json(ENV_KEYS, raw))
    by_tenant: dict[str, list[object]] = {}
    for n, pair in enumerate(raw.split(",")):
        tenant, _, key = pair.strip().partition(":")
        if not tenant or not key:
            raise ConfigError(f"{ENV_KEYS}: entry {n} is not a 'tenant:key' pair")
        by_tenant.setdefault(tenant, []).append(key)
    return _tenant_keys(ENV_KEYS, by_tenant)


def parse_env_admin_keys(raw: str) -> list[ExternalKey]:
    """TIERED_ADMIN_KEYS: "key,key" or JSON ["key", ...]."""
    raw = raw.strip()
    if not raw:
        return []
    if raw.startswith("["):
        return _admin_keys(ENV_ADMIN_KEYS, _json(ENV_ADMIN_KEYS, raw))
    return _admin_keys(ENV_ADMIN_KEYS, [k.strip() for k in raw.split(",")])


def load_key_file(path: str | Path) -> list[ExternalKey]:
    """The mounted secret: YAML or JSON {tenants: {name: [key, ...]}, admin: [key, ...]}."""
    source = f"{ENV_KEYS_FILE}={path}"
    data = read_yaml(path, source)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'tenants' and/or 'admin'")
    unknown = sorted(str(k) for k in data if k not in KEY_FILE_FIELDS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level field(s) {unknown}; the key file is "
            "{tenants: {name: [keys]}, admin: [keys]} (put a flat {tenant: [keys]} file "
            "under 'tenants:')"
        )
    tenants = data.get("tenants") or {}
    return _tenant_keys(f"{source} tenants", tenants) + _admin_keys(
        f"{source} admin", data.get("admin") or []
    )


def external_keys(environ: Mapping[str, str] | None = None) -> list[ExternalKey]:
    """Keys (or hashes) from the environment and the mounted secret file, each with its
    owner. A key file that was named but is missing is an error: keys someone meant to
    install must not vanish silently."""
    env = os.environ if environ is None else environ
    found = parse_env_keys(env.get(ENV_KEYS, ""))
    found += parse_env_admin_keys(env.get(ENV_ADMIN_KEYS, ""))
    path = env.get(ENV_KEYS_FILE)
    if path:
        found += load_key_file(path)
    return found


def load_key_rings(config: TieredConfig, environ: Mapping[str, str] | None = None) -> KeyRings:
    """The config's hashes plus external_keys(environ), checked as a whole: every external
    tenant key names a configured tenant, and no hash is listed twice anywhere (it would
    belong to two identities, or turn a tenant key into an admin key). ConfigError, one
    line naming the source, on any problem."""
    extra = external_keys(environ)
    names = {t.name for t in config.tenants}
    for key in extra:
        if key.tenant is not None and key.tenant not in names:
            raise ConfigError(f"{key.where}: no tenant {key.tenant!r} in the config")
    try:
        check_unique_keys([*config.key_places(), *((k.where, k.digest) for k in extra)])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    tenants: dict[str, list[str]] = {t.name: list(t.api_key_hashes) for t in config.tenants}
    admin = list(config.admin_key_hashes)
    for key in extra:
        (admin if key.tenant is None else tenants[key.tenant]).append(key.digest)
    revoked = config.revoked_key_hashes
    return KeyRings(tenants=KeyRing(tenants, revoked), admin=KeyRing({ADMIN: admin}, revoked))


def new_key_command(tenant: str | None) -> str:
    """Text for `tiered keys new TENANT` (tenant None: `--admin`): the key, shown once,
    and the hash line to paste where that identity's keys live."""
    if tenant is not None and not is_tenant_name(tenant):
        raise ValueError(f"invalid tenant name {tenant!r}: 1-64 letters, digits, '_', '.', '-'")
    owner = "the admin" if tenant is None else f"tenant {tenant!r}"
    where = "admin_key_hashes" if tenant is None else f"tenants[name={tenant}].api_key_hashes"
    in_file = "admin" if tenant is None else f"tenants.{tenant}"
    key = new_key()
    return (
        f"API key for {owner} (shown once, store it now):\n  {key}\n"
        f"Paste under {where} in your Tiered YAML:\n"
        f'  - "{hash_key(key)}"\n'
        f"(or under {in_file} in the {ENV_KEYS_FILE} key file)\n"
    )
