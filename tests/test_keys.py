"""API keys (generation, hashing, lookup, revocation, external sources, the CLI line) and
the tenant config they attach to, through load_key_rings as the ingress uses it."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from deployments.config.models import ConfigError
from deployments.config.tenants import DedicatedSpec, Tenants, TenantSpec
from deployments.config.tiered import TieredConfig
from deployments.tenancy import keys
from deployments.tenancy.keys import (
    ENV_ADMIN_KEYS,
    ENV_KEYS,
    ENV_KEYS_FILE,
    KeyRings,
    as_hash,
    hash_key,
    load_key_rings,
    new_key,
    new_key_command,
    parse_env_admin_keys,
    parse_env_keys,
)

ACME_KEY, GLOBEX_KEY, OLD_KEY, ADMIN_KEY = "tk-acme-1", "tk-globex-1", "tk-globex-old", "tk-adm"
MALFORMED = "sha256:1234"


def _config(**overrides: object) -> TieredConfig:
    """acme and globex with YAML keys (one of globex's revoked), initech and a tenant
    literally named "admin" without any, and one admin key."""
    data: dict = {
        "models": [{"name": "m", "path": "default:tiny"}],
        "tenants": [
            {"name": "acme", "api_key_hashes": [hash_key(ACME_KEY)], "rpm": 10},
            {"name": "globex", "api_key_hashes": [hash_key(GLOBEX_KEY), hash_key(OLD_KEY)]},
            {"name": "initech"},
            {"name": "admin"},
        ],
        "admin_key_hashes": [hash_key(ADMIN_KEY)],
        "revoked_key_hashes": [hash_key(OLD_KEY)],
    }
    data.update(overrides)
    return TieredConfig.model_validate(data)


def _rings(tmp_path: Path, key_file: object = None, **env: str) -> KeyRings:
    """load_key_rings(_config()) with `key_file` (YAML-dumped) and env variables."""
    environ = dict(env)
    if key_file is not None:
        path = tmp_path / "keys.yaml"
        path.write_text(key_file if isinstance(key_file, str) else yaml.safe_dump(key_file))
        environ[ENV_KEYS_FILE] = str(path)
    return load_key_rings(_config(), environ)


def test_new_keys_are_random_and_hash_to_the_stored_format() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("tk-") and len(a) > 40
    digest = hash_key(a)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert as_hash(digest) == digest and as_hash(a) == digest
    assert as_hash(digest.upper()) == digest
    for bad in (MALFORMED, "SHA256:" + "0" * 63, "sha256:" + "g" * 64, "  "):
        with pytest.raises(ValueError):
            as_hash(bad)  # never hashed as if it were a plaintext key


def test_yaml_keys_authenticate_their_tenant_and_admin_keys_only_the_admin(
    tmp_path: Path,
) -> None:
    rings = _rings(tmp_path)
    assert rings.tenants.tenant_for(ACME_KEY) == "acme"
    assert rings.tenants.tenant_for(GLOBEX_KEY) == "globex"
    assert rings.admin.tenant_for(ADMIN_KEY) is not None
    assert rings.tenants.tenant_for(ADMIN_KEY) is None  # not the tenant named "admin"
    assert rings.admin.tenant_for(ACME_KEY) is None
    for key in (None, "", "tk-nope", hash_key(ACME_KEY)):  # a hash is not a key
        assert rings.tenants.tenant_for(key) is None and rings.admin.tenant_for(key) is None


def test_a_revoked_key_stops_authenticating_wherever_it_is_listed(tmp_path: Path) -> None:
    before = load_key_rings(_config(revoked_key_hashes=[]), {})
    assert before.tenants.tenant_for(OLD_KEY) == "globex"
    assert _rings(tmp_path).tenants.tenant_for(OLD_KEY) is None
    revoked = [hash_key(ADMIN_KEY), hash_key("tk-from-file"), hash_key("tk-admin-env")]
    rings = load_key_rings(
        _config(revoked_key_hashes=revoked),
        {ENV_KEYS: "initech:tk-from-file", ENV_ADMIN_KEYS: "tk-admin-env"},
    )
    assert rings.admin.tenant_for(ADMIN_KEY) is None
    assert rings.tenants.tenant_for("tk-from-file") is None
    assert rings.admin.tenant_for("tk-admin-env") is None
    assert rings.tenants.tenant_for(ACME_KEY) == "acme"  # the others still work


def test_removing_a_key_revokes_it() -> None:
    config = _config()
    config.tenants[0].api_key_hashes = []  # acme's key deleted from the YAML
    rings = load_key_rings(config, {})
    assert rings.tenants.tenant_for(ACME_KEY) is None
    assert rings.tenants.tenant_for(GLOBEX_KEY) == "globex"


def test_lookup_compares_every_entry_whether_or_not_it_matches(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", counting)
    ring = load_key_rings(_config(), {}).tenants
    for key in (ACME_KEY, GLOBEX_KEY, "tk-unknown"):
        calls.clear()
        ring.tenant_for(key)
        assert len(calls) == 3 + 1  # three stored hashes, one revoked: no early exit


def test_env_var_forms() -> None:
    pairs = parse_env_keys("acme:tk-1, acme:tk-2,globex:" + hash_key("k").upper())
    assert [(k.tenant, k.digest) for k in pairs] == [
        ("acme", hash_key("tk-1")),
        ("acme", hash_key("tk-2")),
        ("globex", hash_key("k")),
    ]
    as_json = parse_env_keys(json.dumps({"acme": ["tk-1"], "globex": "tk-3"}))
    assert [(k.tenant, k.digest) for k in as_json] == [
        ("acme", hash_key("tk-1")),
        ("globex", hash_key("tk-3")),
    ]
    admin = parse_env_admin_keys("tk-a, tk-b") + parse_env_admin_keys('["tk-c"]')
    assert [k.digest for k in admin] == [hash_key(k) for k in ("tk-a", "tk-b", "tk-c")]
    assert all(k.tenant is None for k in admin)
    assert parse_env_keys("  ") == [] and parse_env_admin_keys("") == []
    for bad in ("acme", "acme:", "{not json", '{"acme": [1]}', "[1]", f"acme:{MALFORMED}"):
        with pytest.raises(ConfigError, match=ENV_KEYS):
            parse_env_keys(bad)
    for bad in ("[not json", "[1]", f"tk-a,{MALFORMED}", "tk-a,,tk-b"):
        with pytest.raises(ConfigError, match=ENV_ADMIN_KEYS):
            parse_env_admin_keys(bad)


def test_keys_from_env_and_a_mounted_secret_file(tmp_path: Path) -> None:
    mounted = {
        "tenants": {"initech": [hash_key("tk-from-file"), "tk-plain"], "acme": "tk-acme-2"},
        "admin": [hash_key("tk-admin-file")],
    }
    rings = _rings(
        tmp_path, mounted, **{ENV_KEYS: "acme:tk-from-env", ENV_ADMIN_KEYS: "tk-admin-env"}
    )
    assert rings.tenants.tenant_for("tk-from-env") == "acme"
    assert rings.tenants.tenant_for(ACME_KEY) == rings.tenants.tenant_for("tk-acme-2") == "acme"
    assert rings.tenants.tenant_for("tk-from-file") == "initech"
    assert rings.tenants.tenant_for("tk-plain") == "initech"
    for admin_key in ("tk-admin-file", "tk-admin-env", ADMIN_KEY):
        assert rings.admin.tenant_for(admin_key) is not None
        assert rings.tenants.tenant_for(admin_key) is None
    assert load_key_rings(_config(), {}).admin.tenant_for("tk-admin-env") is None
    empty = _rings(tmp_path, "")  # an empty file adds nothing, and breaks nothing
    assert empty.tenants.tenant_for(ACME_KEY) == "acme" and empty.admin.tenant_for(ADMIN_KEY)


def test_a_tenant_named_admin_never_gets_admin_keys(tmp_path: Path) -> None:
    """Its keys, from the YAML, the file or the env, are tenant keys; admin keys are not
    its keys."""
    (tmp_path / "keys.yaml").write_text(
        yaml.safe_dump({"tenants": {"admin": ["tk-tenant-admin-file"]}})
    )
    config = _config()
    config.tenants[3].api_key_hashes = [hash_key("tk-tenant-admin-yaml")]
    environ = {ENV_KEYS: "admin:tk-tenant-admin-env", ENV_KEYS_FILE: str(tmp_path / "keys.yaml")}
    rings = load_key_rings(config, environ)
    for key in ("tk-tenant-admin-yaml", "tk-tenant-admin-file", "tk-tenant-admin-env"):
        assert rings.tenants.tenant_for(key) == "admin"
        assert rings.admin.tenant_for(key) is None
    assert rings.tenants.tenant_for(ADMIN_KEY) is None


@pytest.mark.parametrize(
    ("key_file", "env", "message"),
    [
        ({"admin": [MALFORMED]}, {}, rf"^{ENV_KEYS_FILE}=\S+ admin\[0\]: starts with 'sha256:'"),
        (
            {"tenants": {"acme": ["tk-ok", MALFORMED]}},
            {},
            rf"{ENV_KEYS_FILE}=\S+ tenants\.acme\[1\]: starts with 'sha256:' but is not",
        ),
        (None, {ENV_ADMIN_KEYS: MALFORMED}, rf"^{ENV_ADMIN_KEYS}\[0\]: starts with 'sha256:'"),
        (None, {ENV_KEYS: f"acme:{MALFORMED}"}, rf"^{ENV_KEYS}\.acme\[0\]: starts with"),
        (
            {"tenants": {"ghost": ["tk-g"]}},
            {},
            r"tenants\.ghost\[0\]: no tenant 'ghost' in the config",
        ),
        (None, {ENV_KEYS: "ghost:tk-g"}, r"^TIERED_API_KEYS\.ghost\[0\]: no tenant 'ghost'"),
        (
            {"acme": ["tk-flat"]},
            {},
            r"unknown top-level field\(s\) \['acme'\].*under 'tenants:'",
        ),
        ({"tenants": ["tk-a"]}, {}, "expected a mapping of tenant name to keys"),
        ({"tenants": {"acme": [1]}}, {}, r"tenants\.acme\[0\]: expected a key string"),
        ("acme: [unclosed", {}, r"keys\.yaml:1:16: not valid YAML/JSON"),
        (
            {"tenants": {"globex": [hash_key(ACME_KEY)]}},
            {},
            r"tenants\.globex\[0\]: the same key as tenants\[0\]\.api_key_hashes\[0\] "
            r"\(tenant 'acme'\)",
        ),
        (
            {"admin": [ACME_KEY]},
            {},
            r"admin\[0\]: the same key as tenants\[0\]\.api_key_hashes\[0\] \(tenant 'acme'\)",
        ),
        (
            {"tenants": {"admin": [ADMIN_KEY]}},
            {},
            r"tenants\.admin\[0\]: the same key as admin_key_hashes\[0\]",
        ),
        (
            {"tenants": {"initech": ["tk-twice"]}},
            {ENV_KEYS: "initech:tk-twice"},
            rf"{ENV_KEYS_FILE}=\S+ tenants\.initech\[0\]: the same key as "
            rf"{ENV_KEYS}\.initech\[0\]",
        ),
        (None, {ENV_ADMIN_KEYS: "tk-x,tk-x"}, r"ADMIN_KEYS\[1\]: the same key as \S+\[0\]"),
    ],
    ids=[
        "file-admin-malformed",
        "file-tenant-malformed",
        "env-admin-malformed",
        "env-tenant-malformed",
        "file-unknown-tenant",
        "env-unknown-tenant",
        "flat-file",
        "tenants-not-a-mapping",
        "not-a-string",
        "bad-yaml",
        "file-vs-yaml-other-tenant",
        "file-admin-vs-yaml-tenant",
        "file-tenant-vs-yaml-admin",
        "file-vs-env",
        "env-twice",
    ],
)
def test_bad_external_keys_fail_at_load_naming_the_source(
    tmp_path: Path, key_file: object, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _rings(tmp_path, key_file, **env)
    assert "\n" not in str(err.value)
    assert "tk-" not in str(err.value) and MALFORMED not in str(err.value)  # never echoed


def test_a_missing_key_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_key_rings(_config(), {ENV_KEYS_FILE: str(tmp_path / "missing.yaml")})


def test_serve_stops_with_one_line_for_a_bad_key_file(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from cli.main import main

    config = tmp_path / "tiered.yaml"
    config.write_text(yaml.safe_dump(_config().model_dump(mode="json")))
    secret = tmp_path / "keys.yaml"
    secret.write_text(yaml.safe_dump({"admin": [MALFORMED]}))
    monkeypatch.setenv(ENV_KEYS_FILE, str(secret))
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "admin[0]" in err
    assert "Traceback" not in err


def test_new_key_command_prints_a_key_and_the_line_to_paste(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from cli.main import main

    pasted = {}
    for args, field in ((["acme"], "api_key_hashes"), (["--admin"], "admin_key_hashes")):
        assert main(["keys", "new", *args]) == 0
        out = capsys.readouterr().out
        key = next(w for w in out.split() if w.startswith("tk-"))
        line = next(ln for ln in out.splitlines() if ln.strip().startswith("- "))
        (digest,) = yaml.safe_load(line.strip())
        assert digest == hash_key(key) and key not in line and field in out
        pasted[args[0]] = (key, digest)
    (acme_key, acme_hash), (admin_key, admin_hash) = pasted["acme"], pasted["--admin"]
    config = _config(
        tenants=[{"name": "acme", "api_key_hashes": [acme_hash]}], admin_key_hashes=[admin_hash]
    )
    rings = load_key_rings(config, {})
    assert rings.tenants.tenant_for(acme_key) == "acme" and rings.admin.tenant_for(admin_key)
    for bad in ("not a name", "acme\n", "a" * 65, ""):
        with pytest.raises(ValueError):
            new_key_command(bad)
    assert main(["keys", "new", "not a name"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid tenant name")


def test_tenant_spec_validation() -> None:
    digest = hash_key("k")
    shouted = "sha256:" + digest.removeprefix("sha256:").upper()
    assert TenantSpec(name="a", api_key_hashes=[shouted]).api_key_hashes == [digest]
    dedicated = DedicatedSpec(model="m", reserved_replicas=2, max_replicas=3, spill=False)
    TenantSpec(name="d", tier="dedicated", dedicated=dedicated, models=["m", "n"])
    bad = [
        {"name": "a", "api_key_hashes": ["tk-plaintext-key"]},
        {"name": "a", "api_key_hashes": [MALFORMED]},
        {"name": "a b"},
        {"name": "a" * 65},
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


def test_tenant_lists() -> None:
    tenants = TypeAdapter(Tenants)
    digest = hash_key("k")
    assert len(tenants.validate_python([{"name": "a"}, {"name": "b"}])) == 2
    with pytest.raises(ValidationError, match="duplicate"):
        tenants.validate_python([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValidationError, match=r"tenants\[1\].*the same key as tenants\[0\]"):
        tenants.validate_python([{"name": n, "api_key_hashes": [digest]} for n in "ab"])


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer tk-1", "tk-1"),
        ("bearer \ttk-1 \t", "tk-1"),
        ("Bearer tk-1\u00a0", "tk-1\u00a0"),  # kept, so it is not the key tk-1
        ("Bearer \u2003tk-1", "\u2003tk-1"),
        ("Basic tk-1", None),
        ("Bearer  ", None),
        ("", None),
    ],
)
def test_bearer_token_strips_only_http_whitespace(header: str, token: str | None) -> None:
    from deployments.api.auth import bearer_token

    assert bearer_token(header) == token
