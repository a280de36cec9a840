"""A non-editable install (`pip install .` into a fresh venv) runs every `tiered` command,
with and without bench/, from its own site-packages, not this checkout.

Fast on a 2-core box: the fresh venv reaches the dependencies already installed in this
test environment through one .pth line (nothing downloaded, torch not installed again),
and pip installs the project alone (--no-deps --no-build-isolation --no-index, setuptools
from the same place). The test environment's own editable install stays out: its finder
is activated by a .pth file in that site-packages, and Python runs .pth files only in the
fresh venv's own site dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["models", "deployments", "cli", "bench"]  # pyproject's packages.find include
HELP_SCRIPT = """
import json, sys
import deployments
from cli.main import main
print(deployments.__file__)
for argv in json.loads(sys.argv[1]):
    try:
        main([*argv, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
    else:
        raise AssertionError(f"{argv} --help did not exit")
"""


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command path of the parser, e.g. ["config", "render"], the top level first."""
    out = [list(prefix)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += subcommands(sub, (*prefix, name))
    return out


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in PACKAGES:
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results")
        )
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    (own_site,) = (env_dir / "lib").glob("python3*/site-packages")
    (own_site / "test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install",
         "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
        check=True, env=_clean_env(), cwd=root,
    )  # fmt: skip
    shutil.rmtree(src)  # nothing may come from the source tree any more
    return env_dir


def run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, env=_clean_env(), cwd=venv, timeout=120
    )


def _site_packages(venv: Path) -> Path:
    (own_site,) = (venv / "lib").glob("python3*/site-packages")
    return own_site


def test_every_subcommand_helps_and_render_prints_a_serve_config(venv: Path) -> None:
    commands = subcommands(build_parser())
    assert ["config", "render"] in commands and ["bench", "run"] in commands
    helped = run(venv, str(venv / "bin" / "python"), "-c", HELP_SCRIPT, json.dumps(commands))
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.splitlines()[0].startswith(str(_site_packages(venv)))
    for argv in commands[1:]:
        assert f"usage: tiered {' '.join(argv)}" in helped.stdout
    rendered = run(venv, str(venv / "bin" / "tiered"), "config", "render")
    assert rendered.returncode == 0, rendered.stderr
    ServeDeploySchema(**yaml.safe_load(rendered.stdout))  # the packaged default config


def test_without_bench_every_other_command_still_runs(venv: Path) -> None:
    """An image that leaves the load generator out still has a working CLI."""
    shutil.rmtree(_site_packages(venv) / "bench")
    tiered = str(venv / "bin" / "tiered")
    helped = run(venv, tiered, "--help")
    assert helped.returncode == 0, helped.stderr
    listed = re.search(r"\{([a-z,]+)\}", helped.stdout)
    assert listed is not None and "bench" not in listed.group(1).split(",")
    assert "config" in listed.group(1).split(",")
    rendered = run(venv, tiered, "config", "render")
    assert rendered.returncode == 0 and "Traceback" not in rendered.stderr, rendered.stderr
    assert yaml.safe_load(rendered.stdout)["applications"][0]["name"] == "tiered"


def test_the_image_copies_every_packaged_folder() -> None:
    """helm/Dockerfile builds the wheel from the packaged folders only: each one of
    pyproject's packages.find include, no other."""
    dockerfile = (ROOT / "helm" / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.MULTILINE)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packaged = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    assert sorted(copied) == sorted(packaged) == sorted(PACKAGES)
    assert re.search(r"^ARG DEVICE=cpu$", dockerfile, re.MULTILINE)
    assert "FROM base-${DEVICE}" in dockerfile and "wget" in dockerfile
