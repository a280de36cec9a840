"""A user's mistake ends a `tiered` command in one `error:` line naming the file and the
field (pydantic's errors as `field: message`, without the input or pydantic's URL), never a
traceback; tenants no key reaches are warned about, by name, at start and at render."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from cli.main import main
from deployments.config.tiered import TieredConfig
from deployments.tenancy.key_source import KeySource, key_warnings
from deployments.tenancy.keys import ENV_KEYS_FILE, hash_key, load_key_rings

MODEL = {"name": "m", "path": "default:tiny"}
GLOBEX_KEY = hash_key("tk-globex")


def write(tmp_path: Path, data: object, name: str = "tiered.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "errors.pydantic.dev" not in err
    assert "input_value" not in err and "input_type" not in err
    return lines[0]


@pytest.mark.parametrize("command", [["config", "render"], ["serve"], ["usage"]])
@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (None, "tiered.yaml: no such file"),
        ("models:\n  - name: m\n    path: [default:tiny\n", "tiered.yaml:4:1: not valid YAML"),
        ("models:\n  - {name: m, path: x}\n  -: - :\n", "tiered.yaml:3:3: not valid YAML"),
        ("- just\n- a list\n", "tiered.yaml: expected a mapping with 'models'"),
        ({"models": [{"name": "m", "pathh": "default:tiny"}]},
         "tiered.yaml: models[0].pathh: Extra inputs are not permitted"),
        ({"models": [MODEL], "tenants": [{"name": "bad name"}]},
         "tenants[0].name: String should match pattern"),
        ({"models": [MODEL], "ingress": {"num_replicas": -1}},
         "ingress.num_replicas: Input should be greater than or equal to"),
    ],
    ids=["missing", "yaml-unclosed", "yaml-bad-key", "not-a-mapping", "typo", "tenant-name",
         "negative"],
)  # fmt: skip
def test_a_bad_config_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str],
    content: object, expect: str,
) -> None:  # fmt: skip
    path = tmp_path / "tiered.yaml" if content is None else write(tmp_path, content)
    assert main([*command, "--config", str(path)]) == 2
    assert expect in one_error_line(capsys)


@pytest.mark.parametrize("tenant", ["bad name", "x" * 65, "ünï"])
def test_keys_new_refuses_a_bad_tenant_name(
    tenant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "new", tenant]) == 2
    assert f"invalid tenant name {tenant!r}" in one_error_line(capsys)


def test_a_bad_key_file_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, {"models": [MODEL], "tenants": [{"name": "globex"}]})
    keys = write(tmp_path, "tenants: {globex: [tk-a\n", "keys.yaml")
    monkeypatch.setenv(ENV_KEYS_FILE, str(keys))
    assert main(["serve", "--config", str(config)]) == 2
    assert f"{ENV_KEYS_FILE}={keys}:2:1: not valid YAML" in one_error_line(capsys)
    argv = ["config", "render", "--config", str(config), "--env", f"{ENV_KEYS_FILE}={keys}"]
    assert main(argv) == 2
    assert f"{keys}:2:1: not valid YAML" in one_error_line(capsys)


def _config(*tenants: dict, admin: bool = False) -> TieredConfig:
    data: dict = {"models": [MODEL], "tenants": list(tenants)}
    if admin:
        data["admin_key_hashes"] = [hash_key("tk-admin")]
    return TieredConfig.model_validate(data)


def test_warnings_name_the_tenants_without_a_key(tmp_path: Path) -> None:
    nobody = _config({"name": "globex"}, {"name": "initech"})
    assert key_warnings(nobody, load_key_rings(nobody, {})) == [
        "no API key is configured: every request will be refused with 401"
    ]
    admin_only = _config({"name": "globex"}, {"name": "initech"}, admin=True)
    assert key_warnings(admin_only, load_key_rings(admin_only, {})) == [
        "tenant(s) without an API key, refused with 401: globex, initech"
    ]
    some = _config({"name": "globex", "api_key_hashes": [GLOBEX_KEY]}, {"name": "initech"})
    assert key_warnings(some, load_key_rings(some, {})) == [
        "tenant(s) without an API key, refused with 401: initech"
    ]
    keys = write(tmp_path, {"tenants": {"initech": ["tk-initech"]}}, "keys.yaml")
    assert key_warnings(some, load_key_rings(some, {ENV_KEYS_FILE: str(keys)})) == []
    revoked = TieredConfig.model_validate(
        {**some.model_dump(), "revoked_key_hashes": [GLOBEX_KEY]}
    )
    assert key_warnings(revoked, load_key_rings(revoked, {}))[0].startswith("no API key")


def test_render_and_serve_warn_of_tenants_without_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = {"models": [MODEL], "tenants": [
        {"name": "globex", "api_key_hashes": [GLOBEX_KEY]}, {"name": "initech"}]}  # fmt: skip
    config = write(tmp_path, data)
    assert main(["config", "render", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert err == "warning: tenant(s) without an API key, refused with 401: initech\n"
    assert yaml.safe_load(out)["applications"][0]["name"] == "tiered"
    keys = write(tmp_path, {"tenants": {"initech": ["tk-initech"]}}, "keys.yaml")
    assert main(["config", "render", "--config", str(config),
                 "--env", f"{ENV_KEYS_FILE}={keys}"]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""
    elsewhere = "/etc/tiered/keys/keys.yaml"
    assert main(["config", "render", "--config", str(config),
                 "--env", f"{ENV_KEYS_FILE}={elsewhere}"]) == 0  # fmt: skip
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {ENV_KEYS_FILE}={elsewhere} is not on this machine: its keys are not counted",
        "warning: tenant(s) without an API key, refused with 401: initech",
    ]
    from cli.serve import check_config

    monkeypatch.delenv(ENV_KEYS_FILE, raising=False)
    assert check_config(config) is not None
    assert capsys.readouterr().err == (
        "warning: tenant(s) without an API key, refused with 401: initech\n"
    )


def test_the_key_file_is_reread_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config({"name": "globex"}, {"name": "initech"})
    keys = write(tmp_path, {"tenants": {"globex": ["tk-one"]}}, "keys.yaml")
    now = [0.0]
    with caplog.at_level(logging.WARNING, "deployments.tenancy.key_source"):
        source = KeySource(config, {ENV_KEYS_FILE: str(keys)}, recheck_s=5, clock=lambda: now[0])
    assert "without an API key, refused with 401: initech" in caplog.text
    assert source.current().tenants.tenant_for("tk-one") == "globex"
    write(tmp_path, {"tenants": {"globex": ["tk-two"], "initech": ["tk-three"]}}, "keys.yaml")
    now[0] = 4.0  # not yet time to look
    assert source.current().tenants.tenant_for("tk-one") == "globex"
    now[0] = 5.0
    rings = source.current()
    assert rings.tenants.tenant_for("tk-one") is None
    assert rings.tenants.tenant_for("tk-two") == "globex"
    assert rings.tenants.tenant_for("tk-three") == "initech"
    caplog.clear()
    write(tmp_path, "tenants: {globex: [tk-broken\n", "keys.yaml")  # a bad edit
    now[0] = 10.0
    with caplog.at_level(logging.ERROR, "deployments.tenancy.key_source"):
        assert source.current().tenants.tenant_for("tk-two") == "globex"  # kept
    assert "keeping the previous API keys" in caplog.text and "not valid YAML" in caplog.text
