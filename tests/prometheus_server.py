"""A real Prometheus (Debian's package) on a loopback port, for the observability tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.ports import free_port


@contextmanager
def prometheus(
    targets: list[str], workdir: Path, rule_files: list[Path] | None = None
) -> Iterator[str]:
    """Scrape `targets` (host:port) every 3 s; yields the base URL once ready.

    Prometheus caps a scrape's timeout at its interval; a 1 s interval failed every
    scrape of a Ray metrics agent slowed by a busy 2-core box, so no series ever landed."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: .ci/run installs Debian's prometheus package"
    config = {
        "global": {"scrape_interval": "3s", "scrape_timeout": "3s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files or []],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        else:
            raise TimeoutError("prometheus not ready within 30 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(url: str, promql: str) -> list[dict]:
    """An instant query's result vector; raises on a PromQL error."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    body = response.json()
    assert body.get("status") == "success", f"{promql}: {body}"
    return body["data"]["result"]


def scrape_errors(url: str) -> list[str]:
    """Each target's last scrape error, for a failing test's message."""
    targets = httpx.get(f"{url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    return [f"{t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in targets]
