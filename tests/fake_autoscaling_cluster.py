"""A local Ray cluster whose autoscaler adds nodes: Ray's fake multi-node provider.

`ray.cluster_utils.AutoscalingCluster` does this, but Ray 2.60's wheel lacks the base
config it reads, and it runs `ray stop --force`, which would also kill the session's test
cluster. This one writes the whole autoscaler config itself, starts the head on free
ports, and on shutdown kills only the processes of its own session. The "nodes" it adds
are extra raylets on this machine, each advertising its node type's resources, exactly
what the real autoscaler would launch as VMs or pods.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.ports import free_port

RAY_TMP = Path("/tmp/ray")


def autoscaler_config(
    worker_node_types: dict[str, dict[str, Any]], head_cpus: int, idle_timeout_minutes: float
) -> dict[str, Any]:
    """A complete cluster config for the `fake_multinode` provider."""
    node_types = {
        "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
        **{name: {"node_config": {}, **spec} for name, spec in worker_node_types.items()},
    }
    return {
        "cluster_name": "tiered-fake",
        "max_workers": sum(spec.get("max_workers", 1) for spec in worker_node_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": node_types,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    def __init__(
        self,
        worker_node_types: dict[str, dict[str, Any]],
        head_cpus: int = 1,
        idle_timeout_minutes: float = 0.25,
    ) -> None:
        self.config = autoscaler_config(worker_node_types, head_cpus, idle_timeout_minutes)
        self.head_cpus = head_cpus
        self.port = free_port()
        self.address = ""
        self.session_dir = ""
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    def start(self, timeout_s: float = 60.0) -> str:
        from ray._private.services import get_node_ip_address

        ip = get_node_ip_address()
        self.address = f"{ip}:{self.port}"
        self.config["provider"]["gcs_address"] = self.address
        path = Path(tempfile.mkdtemp()) / "autoscaler.json"
        path.write_text(json.dumps(self.config))
        ray_cli = str(Path(sys.executable).parent / "ray")
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        previous = self._current_cluster()
        subprocess.run(
            [
                ray_cli,
                "start",
                "--head",
                f"--port={self.port}",
                f"--autoscaling-config={path}",
                f"--num-cpus={self.head_cpus}",
                "--include-dashboard=false",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--ray-client-server-port={free_port()}",
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )
        self._restore_current_cluster(previous)  # plain ray.init() elsewhere stays local
        self.session_dir = self._find_session_dir()
        return self.address

    def shutdown(self) -> None:
        """SIGKILL every process of this cluster's session (head and added nodes)."""
        marks = [m for m in (self.session_dir, f":{self.port} ", f"={self.port} ") if m]
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(mark in cmdline + " " for mark in marks) and int(proc.name) != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)
        time.sleep(0.5)

    def _find_session_dir(self) -> str:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "gcs_server" in cmdline and f"--gcs_server_port={self.port}" in cmdline:
                for part in cmdline.split():
                    if part.startswith("--log_dir="):
                        return str(Path(part.split("=", 1)[1]).parent)
        raise RuntimeError(f"no gcs_server on port {self.port}")

    @staticmethod
    def _current_cluster() -> str | None:
        marker = RAY_TMP / "ray_current_cluster"
        return marker.read_text() if marker.exists() else None

    @staticmethod
    def _restore_current_cluster(previous: str | None) -> None:
        marker = RAY_TMP / "ray_current_cluster"
        if previous is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_text(previous)
