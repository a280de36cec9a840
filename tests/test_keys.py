"""API keys (generation, hashing, lookup, revocation, external sources, the CLI line) and
the tenant config they attach to."""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from deployments.api.errors import OpenAIError
from deployments.config.tenants import AdminSpec, DedicatedSpec, Tenants, TenantSpec
from deployments.tenancy import keys
from deployments.tenancy.keys import (
    KeyRing,
    as_hash,
    bearer_token,
    external_keys,
    hash_key,
    new_key,
    new_key_command,
    parse_env_keys,
)

ACME_KEY, GLOBEX_KEY, OLD_KEY = "tk-acme-1", "tk-globex-1", "tk-globex-old"


def _tenants() -> list[TenantSpec]:
    return [
        TenantSpec(name="acme", api_key_hashes=[hash_key(ACME_KEY)], rpm=10),
        TenantSpec(name="globex", api_key_hashes=[hash_key(GLOBEX_KEY), hash_key(OLD_KEY)]),
        TenantSpec(name="initech"),  # keys only from outside the YAML
    ]


def test_new_keys_are_random_and_hash_to_the_stored_format() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("tk-") and len(a) > 40
    digest = hash_key(a)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert as_hash(digest) == digest and as_hash(a) == digest
    assert as_hash(digest.upper().replace("SHA256:", "sha256:")) == digest


def test_authenticate_returns_the_tenant_or_401() -> None:
    ring = KeyRing.from_tenants(_tenants(), revoked=[hash_key(OLD_KEY)])
    assert ring.authenticate(ACME_KEY).rpm == 10
    assert ring.authenticate(GLOBEX_KEY).name == "globex"
    for key, code in [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        ("tk-nope", "invalid_api_key"),
        (OLD_KEY, "invalid_api_key"),
        (hash_key(ACME_KEY), "invalid_api_key"),
    ]:
        with pytest.raises(OpenAIError) as err:
            ring.authenticate(key)
        assert (err.value.status, err.value.code) == (401, code)
        assert err.value.type == "authentication_error"


def test_removing_a_key_revokes_it() -> None:
    kept = [t for t in _tenants() if t.name != "acme"]
    kept.append(TenantSpec(name="acme"))  # its key deleted from the YAML
    ring = KeyRing.from_tenants(kept)
    assert ring.tenant_for(ACME_KEY) is None and ring.tenant_for(GLOBEX_KEY) == "globex"


def test_lookup_compares_every_entry_whether_or_not_it_matches(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", counting)
    ring = KeyRing.from_tenants(_tenants(), revoked=[hash_key("tk-x")])
    for key in (ACME_KEY, GLOBEX_KEY, "tk-unknown"):
        calls.clear()
        ring.tenant_for(key)
        assert len(calls) == 3 + 1  # three stored hashes, one revoked: no early exit


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer tk-a") == "tk-a" and bearer_token("bearer  tk-a ") == "tk-a"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_env_var_forms() -> None:
    pairs = parse_env_keys("acme:tk-1, acme:tk-2,globex:tk-3")
    assert pairs == {"acme": ["tk-1", "tk-2"], "globex": ["tk-3"]}
    as_json = parse_env_keys(json.dumps({"acme": ["tk-1"], "globex": "tk-3"}))
    assert as_json == {"acme": ["tk-1"], "globex": ["tk-3"]}
    assert parse_env_keys("  ") == {}
    for bad in ("acme", "acme:", "{not json", '{"acme": [1]}', "[1]"):
        with pytest.raises(ValueError):
            parse_env_keys(bad)


def test_keys_from_env_and_a_mounted_secret_file(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "keys.yaml"
    mounted = {"initech": [hash_key("tk-from-file"), "tk-plain"], "ghost": ["tk-g"]}
    secret.write_text(yaml.safe_dump(mounted))
    env = {keys.ENV_KEYS: "acme:tk-from-env", keys.ENV_KEYS_FILE: str(secret)}
    extra = external_keys(env)
    assert extra["acme"] == ["tk-from-env"] and len(extra["initech"]) == 2
    with caplog.at_level(logging.WARNING):
        ring = KeyRing.from_tenants(_tenants(), extra=extra)
    assert "ghost" in caplog.text
    assert ring.tenant_for("tk-from-env") == "acme" and ring.tenant_for(ACME_KEY) == "acme"
    assert ring.tenant_for("tk-from-file") == ring.tenant_for("tk-plain") == "initech"
    assert ring.tenant_for("tk-g") is None  # unknown tenant: ignored
    with pytest.raises(FileNotFoundError):
        external_keys({keys.ENV_KEYS_FILE: str(tmp_path / "missing.yaml")})
    secret.write_text("acme: [unclosed")
    with pytest.raises(ValueError):
        external_keys({keys.ENV_KEYS_FILE: str(secret)})
    assert external_keys({}) == {}


def test_new_key_command_prints_a_key_and_the_line_to_paste(capsys) -> None:  # type: ignore[no-untyped-def]
    from cli.main import main

    assert main(["keys", "new", "acme"]) == 0
    out = capsys.readouterr().out
    key = next(w for w in out.split() if w.startswith("tk-"))
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("- "))
    (pasted,) = yaml.safe_load(line.strip())
    assert pasted == hash_key(key) and key not in line
    tenant = TenantSpec(name="acme", api_key_hashes=[pasted])
    assert KeyRing.from_tenants([tenant]).authenticate(key).name == "acme"
    with pytest.raises(ValueError):
        new_key_command("not a name")


def test_tenant_spec_validation() -> None:
    digest = hash_key("k")
    shouted = "sha256:" + digest.removeprefix("sha256:").upper()
    assert TenantSpec(name="a", api_key_hashes=[shouted]).api_key_hashes == [digest]
    dedicated = DedicatedSpec(model="m", reserved_replicas=2, max_replicas=3, spill=False)
    TenantSpec(name="d", tier="dedicated", dedicated=dedicated, models=["m", "n"])
    bad = [
        {"name": "a", "api_key_hashes": ["tk-plaintext-key"]},
        {"name": "a", "api_key_hashes": ["sha256:1234"]},
        {"name": "a b"},
        {"name": "a", "weight": 0},
        {"name": "a", "rpm": 0},
        {"name": "a", "tier": "gold"},
        {"name": "a", "tier": "dedicated"},
        {"name": "a", "tier": "shared", "dedicated": {"model": "m"}},
        {"name": "a", "tier": "dedicated", "dedicated": {"model": "m"}, "models": ["n"]},
        {"name": "a", "tier": "dedicated", "dedicated": {"model": "m", "reserved_replicas": 0}},
        {
            "name": "a",
            "tier": "dedicated",
            "dedicated": {"model": "m", "reserved_replicas": 3, "max_replicas": 2},
        },
        {"name": "a", "unknown": 1},
    ]
    for fields in bad:
        with pytest.raises(ValidationError):
            TenantSpec.model_validate(fields)


def test_tenant_lists_and_admin_spec() -> None:
    tenants = TypeAdapter(Tenants)
    digest = hash_key("k")
    assert len(tenants.validate_python([{"name": "a"}, {"name": "b"}])) == 2
    with pytest.raises(ValidationError, match="duplicate"):
        tenants.validate_python([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValidationError, match="listed for"):
        tenants.validate_python([{"name": n, "api_key_hashes": [digest]} for n in "ab"])
    assert AdminSpec(key_hashes=[digest]).revoked_key_hashes == []
    with pytest.raises(ValidationError):
        AdminSpec(key_hashes=["admin-password"])
