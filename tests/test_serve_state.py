"""`tiered serve` and the state store at start: every problem with the database stops it
before Ray starts, in one line that names the field and never prints the password."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import ray
import yaml

from cli.main import main
from cli.serve import check_state
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import hash_key
from tests.state_helpers import HEAD

SECRET = "hunter2"


def _data(state: dict) -> dict:
    # The tenant has a key, so `tiered serve` has no warning to print before the error.
    tenant = {"name": "a", "api_key_hashes": [hash_key("tk-state-a")]}
    return {"models": [{"name": "m", "path": "default:tiny"}], "tenants": [tenant], "state": state}


def _config(state: dict) -> TieredConfig:
    return TieredConfig.model_validate(_data(state))


def _serve(tmp_path: Path, state: dict, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `tiered serve` on a config with this `state:`; it must stop with status 2,
    before it starts Ray."""

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("tiered serve started Ray despite a bad state store")

    config = tmp_path / "tiered.yaml"
    config.write_text(yaml.safe_dump(_data(state)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "init", no_ray)
        assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert SECRET not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("url", [
    f"postgresql://u:{SECRET}@h:notaport/db",
    f"mysql://u:{SECRET}@h/db",
    f"postgresql://u:{SECRET}@h",
    "not a url",
])
def test_a_bad_state_url_names_the_field(tmp_path: Path, url: str, capsys) -> None:  # type: ignore[no-untyped-def]
    err = _serve(tmp_path, {"url": url}, capsys)
    assert "state.url" in err


def test_a_bad_env_url_names_the_variable(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TIERED_STATE_URL", f"oracle://u:{SECRET}@h/db")
    err = _serve(tmp_path, {"url": f"sqlite:///{tmp_path}/x.db"}, capsys)
    assert err.startswith("error: TIERED_STATE_URL: unsupported database driver")


def test_a_refused_connection_fails_within_the_deadline(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    err = _serve(
        tmp_path,
        {"url": f"postgresql://u:{SECRET}@127.0.0.1:1/db", "connect_timeout_s": 2}, capsys,
    )
    assert time.monotonic() - t0 < 15
    assert "state.url: cannot connect to postgresql+psycopg://u:***@127.0.0.1:1/db" in err


def test_a_needed_migration_is_applied_at_start(tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    spec = check_state(_config({"url": f"sqlite:///{db}"}))
    assert spec is not None and spec.url == f"sqlite+aiosqlite:///{db}"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]


def test_a_migration_is_refused_when_migrate_is_false(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    err = _serve(tmp_path, {"url": f"sqlite:///{tmp_path}/empty.db", "migrate": False}, capsys)
    assert "set state.migrate: true" in err and "base (empty)" in err


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "newer.db"
    assert check_state(_config({"url": f"sqlite:///{db}"})) is not None
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00d'")
    err = _serve(tmp_path, {"url": f"sqlite:///{db}"}, capsys)
    assert "revision f00d, which this Tiered does not know" in err
