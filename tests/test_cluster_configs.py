"""`ray up` YAMLs and rendered Serve configs, checked by Ray's own validators, and the node
types checked against every reservation."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import ray.autoscaler as ray_autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cli.main import main
from deployments.config.tiered import DEFAULT_CONFIG, load_config
from deployments.render import render_serve_config
from deployments.replicas.capacity import reservation_problems

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
RAY_UP = ["aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml"]
TIERED = [DEFAULT_CONFIG, CLUSTER / "serve-gpu.yaml"]


def _node_types(cluster_yaml: str) -> dict:
    cfg = yaml.safe_load((CLUSTER / cluster_yaml).read_text())
    return {
        name: {
            "resources": t["resources"],
            "min_workers": t.get("min_workers", 0),
            "max_workers": t.get("max_workers", 0),
        }
        for name, t in cfg["available_node_types"].items()
        if t.get("max_workers", 0) > 0
    }


@pytest.mark.parametrize("name", RAY_UP)
def test_cluster_yaml_passes_rays_schema(name: str) -> None:
    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", TIERED, ids=lambda p: p.name)
def test_rendered_serve_config_passes_serve_schema(path: Path) -> None:
    rendered = render_serve_config(load_config(path, checkpoints=False))
    schema = ServeDeploySchema(**rendered)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build" and app.route_prefix == "/"
    assert {d["name"] for d in rendered["applications"][0]["deployments"]} >= {"ingress"}


@pytest.mark.parametrize("cluster_yaml", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_gpu_node_types_hold_every_reservation(cluster_yaml: str) -> None:
    config = load_config(CLUSTER / "serve-gpu.yaml", checkpoints=False)
    assert {k: v.model_dump() for k, v in config.node_types.items()} == _node_types(cluster_yaml)
    assert reservation_problems(config) == []


def test_a_reservation_larger_than_the_node_type_is_reported() -> None:
    config = load_config(CLUSTER / "serve-gpu.yaml", checkpoints=False)
    config.tenants[0].dedicated.reserved_replicas = 3  # type: ignore[union-attr]
    config.tenants[0].dedicated.max_replicas = 3  # type: ignore[union-attr]
    problems = reservation_problems(config)
    assert len(problems) == 1
    assert "tenants[0].dedicated.replica: 3 replica(s) of 8 rank(s)" in problems[0]
    assert "hold only 2" in problems[0]


def test_render_command_writes_a_deployable_config(tmp_path: Path) -> None:
    out = tmp_path / "serve.yaml"
    code = main(
        ["config", "render", "--config", str(CLUSTER / "serve-gpu.yaml"), "-o", str(out),
         "--env", "TIERED_API_KEYS_FILE=/etc/tiered/keys.yaml"]
    )
    assert code == 0
    rendered = yaml.safe_load(out.read_text())
    ServeDeploySchema(**rendered)
    app = rendered["applications"][0]
    assert app["runtime_env"]["env_vars"]["TIERED_API_KEYS_FILE"] == "/etc/tiered/keys.yaml"
    assert app["args"]["tiered"]["tenants"][0]["dedicated"]["replica"]["tp_size"] == 8


def test_render_leaves_the_default_state_url_to_the_cluster(tmp_path: Path) -> None:
    """A SQLite path defaulted on the machine that renders (its home, its TIERED_STATE_DIR)
    means nothing on the cluster's head: only a url the YAML sets is rendered."""
    from deployments.config.tiered import parse_config
    from deployments.render import render_serve_config

    data = yaml.safe_load((CLUSTER / "serve-gpu.yaml").read_text())
    data.pop("state", None)
    rendered = render_serve_config(
        parse_config(data, "test", checkpoints=False))["applications"][0]
    assert "url" not in rendered["args"]["tiered"]["state"]
    data["state"] = {"url": "postgresql://tiered@db/tiered"}
    rendered = render_serve_config(
        parse_config(data, "test", checkpoints=False))["applications"][0]
    assert rendered["args"]["tiered"]["state"]["url"] == "postgresql+psycopg://tiered@db/tiered"


def test_render_leaves_the_default_files_root_to_the_cluster_and_lists_the_runner() -> None:
    from deployments.config.tiered import parse_config
    from deployments.render import render_serve_config

    data = yaml.safe_load((CLUSTER / "serve-gpu.yaml").read_text())
    data.pop("files", None)
    app = render_serve_config(parse_config(data, "test", checkpoints=False))["applications"][0]
    assert "root" not in app["args"]["tiered"]["files"]
    assert {"name": "fine-tuning", "num_replicas": 1} in app["deployments"]
    data["files"] = {"root": "s3://bucket/tiered"}
    app = render_serve_config(parse_config(data, "test", checkpoints=False))["applications"][0]
    assert app["args"]["tiered"]["files"]["root"] == "s3://bucket/tiered"


def test_render_command_refuses_what_the_nodes_cannot_hold(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = yaml.safe_load((CLUSTER / "serve-gpu.yaml").read_text())
    bad["node_types"]["dedicated_acme"].update(min_workers=0, max_workers=0)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["config", "render", "--config", str(path)]) == 2
    assert "cannot hold the reservations" in capsys.readouterr().err


@pytest.mark.parametrize("name", RAY_UP)
def test_every_node_gets_the_keys_file_the_app_reads(name: str) -> None:
    """Ingress replicas run on any node: the keys file is a file mount (synced to every
    node), and the head renders the Serve config pointing at that same path."""
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert config["file_mounts"]["~/tiered-keys.yaml"] == "./tiered-keys.yaml"
    render = next(c for c in config["head_start_ray_commands"] if "config render" in c)
    assert "--env TIERED_API_KEYS_FILE=$HOME/tiered-keys.yaml" in " ".join(render.split())
    assert any(c.startswith("serve deploy") for c in config["head_start_ray_commands"])


# The state store on `ray up`: PostgreSQL on the head (cluster/head-postgres.sh), and
# TIERED_STATE_URL exported into every node's raylet (cluster/state-env.sh).

STATE_ENV = "~/tiered-state.env"
STATE_ENV_SH = CLUSTER / "state-env.sh"
HEAD_POSTGRES_SH = CLUSTER / "head-postgres.sh"
WITH_STATE = ". ~/tiered/cluster/state-env.sh && "
PASSWORD = "0123456789abcdef0123456789abcdef"


def _prepared(name: str) -> dict:
    """The config as `ray up` runs it: provider defaults filled in, setup_commands merged
    into head_setup_commands and worker_setup_commands."""
    return prepare_config(yaml.safe_load((CLUSTER / name).read_text()))


@pytest.mark.parametrize("name", RAY_UP)
def test_the_head_alone_installs_postgresql(name: str) -> None:
    config = _prepared(name)
    assert config["file_mounts"][STATE_ENV] == "./tiered-state.env"
    head = [c for c in config["head_setup_commands"] if "postgres" in c]
    assert head == ["bash ~/tiered/cluster/head-postgres.sh"]
    assert config["head_setup_commands"][-1] == head[0]  # after tiered (and ray) installed
    for key in (
        "worker_setup_commands",
        "worker_start_ray_commands",
        "setup_commands",
        "initialization_commands",
    ):
        assert not [c for c in config[key] if "postgres" in c], key
    for node_type in config["available_node_types"].values():
        assert "worker_setup_commands" not in node_type


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_head_setup_keeps_the_providers_default(name: str) -> None:
    """A head_setup_commands list replaces Ray's provider default (boto3 on AWS, the
    Google API client on GCP), which the autoscaler on the head needs."""
    provider = yaml.safe_load((CLUSTER / name).read_text())["provider"]["type"]
    defaults = yaml.safe_load(
        (Path(ray_autoscaler.__file__).parent / provider / "defaults.yaml").read_text()
    )["head_setup_commands"]
    assert defaults  # each is a `pip install <requirement>`
    ours = _prepared(name)["head_setup_commands"]
    for command in defaults:
        requirement = command.split("#")[0].strip().removeprefix("pip install ")
        assert f"python3 -m pip install -q {requirement}" in ours


@pytest.mark.parametrize("name", RAY_UP)
def test_every_ray_start_exports_the_state_url(name: str) -> None:
    """Ingress replicas and the admission actor run on any node: every `ray start` (head
    and workers) runs after state-env.sh; the Serve config never carries the URL."""
    config = yaml.safe_load((CLUSTER / name).read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [" ".join(c.split()) for c in config[key] if "ray start" in c]
        assert len(starts) == 1, key
        assert starts[0].startswith(WITH_STATE + "ray start --"), key
    text = (CLUSTER / name).read_text()
    assert "--env TIERED_STATE_URL" not in " ".join(config["head_start_ray_commands"])
    assert PASSWORD not in text and "TIERED_PG_PASSWORD=" not in text.replace(
        'echo "TIERED_PG_PASSWORD=$(openssl rand -hex 24)"', ""
    )


def _source_state_env(tmp_path: Path, env_file: str | None, **env: str) -> tuple[int, str, str]:
    """Source state-env.sh as the start commands do; report the URL and whether the
    password is still in the environment `ray start` would get."""
    path = tmp_path / "tiered-state.env"
    if env_file is not None:
        path.write_text(env_file)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python3 = bin_dir / "python3"  # the head asks Ray for its address: this Ray
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    script = (
        f'. {STATE_ENV_SH} && printf "%s\\n" "$TIERED_STATE_URL" "${{TIERED_PG_PASSWORD-unset}}"'
        ' "${TIERED_PG_ALLOW-unset}" && echo ray-start'
    )
    proc = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
             "TIERED_STATE_ENV_FILE": str(path), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def test_state_env_on_a_worker_points_at_the_heads_postgresql(tmp_path: Path) -> None:
    code, out, err = _source_state_env(
        tmp_path, f"TIERED_PG_PASSWORD={PASSWORD}\nTIERED_PG_ALLOW=10.0.0.0/24\n",
        RAY_HEAD_IP="10.0.0.10",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"postgresql+psycopg://tiered:{PASSWORD}@10.0.0.10:5432/tiered", "unset", "unset",
        "ray-start",
    ]  # fmt: skip


def test_state_env_on_the_head_uses_the_address_ray_gives_the_workers(tmp_path: Path) -> None:
    import ray.util

    code, out, err = _source_state_env(tmp_path, f"TIERED_PG_PASSWORD={PASSWORD}\n")
    assert code == 0, err
    head_ip = ray.util.get_node_ip_address()
    assert out.splitlines()[0] == f"postgresql+psycopg://tiered:{PASSWORD}@{head_ip}:5432/tiered"


def test_state_env_passes_an_external_url_through(tmp_path: Path) -> None:
    url = "postgresql+psycopg://tiered:s3cret@tiered.abc.us-west-2.rds.amazonaws.com:5432/tiered?sslmode=require&connect_timeout=10"
    code, out, err = _source_state_env(
        tmp_path, f"TIERED_STATE_URL='{url}'\nTIERED_PG_PASSWORD={PASSWORD}\n",
        RAY_HEAD_IP="10.0.0.10",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.splitlines() == [url, "unset", "unset", "ray-start"]


@pytest.mark.parametrize(
    ("env_file", "message"),
    [(None, "tiered-state.env is missing"), ("# empty\n", "neither TIERED_PG_PASSWORD")],
    ids=["no-file", "no-password"],
)
def test_state_env_without_a_database_stops_ray_start(
    tmp_path: Path, env_file: str | None, message: str
) -> None:
    code, out, err = _source_state_env(tmp_path, env_file, RAY_HEAD_IP="10.0.0.10")
    assert code == 1 and out == "" and message in err


SUDO_STUB = """#!/bin/bash
printf '%s\\n' "$*" >> "$LOG/argv"
while [[ $1 == *=* ]]; do shift; done
case "$1" in
  cat|tee) exec "$@" ;;
  -u) cat >> "$LOG/$2.sql" ;;
  apt-get) [[ $* == *install* ]] && touch "$LOG/installed" ;;
esac
exit 0
"""
STUBS = {
    "sudo": SUDO_STUB,
    "dpkg": '#!/bin/bash\n[ -e "$LOG/installed" ]\n',
    "ls": '#!/bin/bash\necho "$LOG/etc/14/main"\n',
    "python3": "#!/bin/bash\necho 10.0.0.10\n",
    "pg_isready": "#!/bin/bash\nexit 0\n",
    "psql": (
        '#!/bin/bash\nprintf "psql %s\\n" "$*" >> "$LOG/argv"\n'
        'echo "$PGPASSWORD" > "$LOG/pgpassword"\n'
    ),
}


def _run_head_postgres(tmp_path: Path, env_file: str) -> subprocess.CompletedProcess[str]:
    """head-postgres.sh with sudo, apt, systemd and PostgreSQL's tools stubbed: what it
    would run (argv), what it feeds psql, and the config files it writes."""
    log = tmp_path / "log"
    (log / "etc" / "14" / "main" / "conf.d").mkdir(parents=True, exist_ok=True)
    hba = log / "etc" / "14" / "main" / "pg_hba.conf"
    if not hba.exists():
        hba.write_text("local all postgres peer\nhost all all 127.0.0.1/32 scram-sha-256\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "tiered-state.env").write_text(env_file)
    return subprocess.run(
        ["bash", str(HEAD_POSTGRES_SH)],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LOG": str(log)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_head_postgres_installs_configures_and_creates_the_database(tmp_path: Path) -> None:
    log = tmp_path / "log"
    conf_dir = log / "etc" / "14" / "main"
    first = _run_head_postgres(tmp_path, f"TIERED_PG_PASSWORD={PASSWORD}\n")
    assert first.returncode == 0, first.stderr
    argv = (log / "argv").read_text().splitlines()
    install = [a for a in argv if "apt-get install" in a]
    assert install == ["DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                       "-o DPkg::Lock::Timeout=600 postgresql"]  # fmt: skip
    assert "systemctl restart postgresql" in argv
    assert (conf_dir / "conf.d" / "tiered.conf").read_text().splitlines()[1:] == [
        "listen_addresses = 'localhost,10.0.0.10'",
        "password_encryption = 'scram-sha-256'",
    ]
    hba = (conf_dir / "pg_hba.conf").read_text().splitlines()
    assert [line.split() for line in hba if line.startswith("host    tiered")] == [
        ["host", "tiered", "tiered", cidr, "scram-sha-256"]
        for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
    ]
    sql = (log / "postgres.sql").read_text()
    assert "CREATE ROLE tiered LOGIN" in sql
    assert f"ALTER ROLE tiered WITH LOGIN PASSWORD '{PASSWORD}';" in sql
    assert "SELECT 'CREATE DATABASE tiered OWNER tiered'" in sql and "\\gexec" in sql
    assert (log / "pgpassword").read_text().strip() == PASSWORD  # the check logs in
    assert "psql -X -q -tA -h 10.0.0.10 -U tiered -d tiered -c SELECT 1" in argv
    # The password goes to psql on stdin and in PGPASSWORD, never in an argv or the output.
    assert PASSWORD not in "\n".join(argv) + first.stdout + first.stderr
    assert (tmp_path / "tiered-state.env").stat().st_mode & 0o077 == 0

    # `ray up` again: nothing to install or rewrite, PostgreSQL only started.
    (log / "argv").unlink()
    again = _run_head_postgres(tmp_path, f"TIERED_PG_PASSWORD={PASSWORD}\n")
    assert again.returncode == 0, again.stderr
    argv = (log / "argv").read_text().splitlines()
    assert not [a for a in argv if "apt-get" in a or "restart" in a]
    assert "systemctl start postgresql" in argv
    assert (conf_dir / "pg_hba.conf").read_text().splitlines() == hba


def test_head_postgres_installs_nothing_for_an_external_database(tmp_path: Path) -> None:
    done = _run_head_postgres(
        tmp_path, "TIERED_STATE_URL='postgresql+psycopg://t:pw@db:5432/t?sslmode=require'\n"
    )
    assert done.returncode == 0 and "not installing PostgreSQL" in done.stdout
    assert not (tmp_path / "log" / "argv").exists()  # no sudo, no psql


@pytest.mark.parametrize(
    ("env_file", "message"),
    [("TIERED_PG_PASSWORD=short\n", "16 or more"),
     ("TIERED_PG_PASSWORD=has@and:in-it-0123456789\n", "16 or more"),
     (f"TIERED_PG_PASSWORD={PASSWORD}\nTIERED_PG_ALLOW='10.0.0.0/8 all'\n", "all is not a CIDR")],
    ids=["short", "not-url-safe", "bad-cidr"],
)  # fmt: skip
def test_head_postgres_refuses_before_touching_anything(
    tmp_path: Path, env_file: str, message: str
) -> None:
    done = _run_head_postgres(tmp_path, env_file)
    assert done.returncode == 1 and message in done.stderr
    assert not (tmp_path / "log" / "argv").exists()
    assert "has@and" not in done.stderr + done.stdout
