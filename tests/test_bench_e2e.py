"""`tiered bench run` end to end: a few seconds of a two-tenant scenario (one dedicated, one
shared) against a Tiered app on the session's Ray cluster, through the real CLI, then the
table, the JSON and the plots it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray import serve

from cli.main import main
from deployments.app import build_from_config
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import hash_key

APP, PREFIX = "bench-e2e", "/bench-e2e"
KEYS = {"acme": "tk-bench-e2e-acme", "globex": "tk-bench-e2e-globex"}


def tiered_config(model_dir: Path) -> TieredConfig:
    return TieredConfig.model_validate(
        {
            "models": [
                {
                    "name": "tiny-llama",
                    "path": str(model_dir),
                    "engine": {"num_kv_blocks": 128, "max_num_seqs": 4},
                    "shared_pool": {"num_replicas": 1},
                }
            ],
            "tenants": [
                {
                    "name": "acme",
                    "tier": "dedicated",
                    "api_key_hashes": [hash_key(KEYS["acme"])],
                    "dedicated": {"model": "tiny-llama", "reserved_replicas": 1},
                },
                {"name": "globex", "api_key_hashes": [hash_key(KEYS["globex"])]},
            ],
            "ingress": {"num_replicas": 1},
        }
    )


SCENARIO = {
    "name": "bench-e2e",
    "description": "two tenants, two short phases",
    "model": "tiny-llama",
    "warmup_requests": 1,
    "drain_s": 30,
    "tenants": {
        "acme": {"key": KEYS["acme"], "prompt_tokens": 16, "output_tokens": 6},
        "globex": {
            "key": KEYS["globex"],
            "prompt_tokens": {"dist": "uniform", "min": 8, "max": 24},
            "output_tokens": 6,
        },
    },
    "phases": [
        {"name": "quiet", "duration_s": 3, "load": {"acme": {"rate": 2, "arrival": "constant"}}},
        {
            "name": "busy",
            "duration_s": 3,
            "load": {"acme": {"rate": 2, "arrival": "constant"}, "globex": {"concurrency": 2}},
        },
    ],
    "analysis": [
        {
            "kind": "ratio",
            "name": "acme p99 TTFT busy / quiet",
            "metric": "ttft.p99",
            "numerator": {"tenant": "acme", "phase": "busy"},
            "denominator": {"tenant": "acme", "phase": "quiet"},
        },
        {"kind": "count", "name": "acme 429s", "select": {"tenant": "acme"}, "status": 429,
         "goal": "== 0"},
    ],
}


@pytest.mark.ray
def test_bench_run_writes_table_json_and_plots(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    serve.run(build_from_config(tiered_config(tiny_model_dir)), name=APP, route_prefix=PREFIX)
    try:
        scenario = tmp_path / "e2e.yaml"
        scenario.write_text(yaml.safe_dump(SCENARIO))
        out = tmp_path / "out"
        url = f"http://127.0.0.1:{ray_cluster.serve_port}{PREFIX}/v1"
        rc = main(["bench", "run", str(scenario), "--url", url, "--out", str(out),
                   "--goodput", "ttft:10000", "tpot:5000", "--no-progress"])
        assert rc == 0
    finally:
        serve.delete(APP)

    text = (out / "table.txt").read_text()
    for line in ("Serving Benchmark Result", "Successful requests:", "Benchmark duration (s):",
                 "Request goodput (req/s):", "Mean TTFT (ms):", "P99 TPOT (ms):",
                 "Median ITL (ms):", "Mean E2EL (ms):", "Tenant acme", "Tenant globex",
                 "Served by tier dedicated:", "Served by tier shared:",
                 "Per phase and tenant", "acme p99 TTFT busy / quiet"):
        assert line in text, line

    data = json.loads((out / "result.json").read_text())
    assert data["scenario"] == "bench-e2e" and [p["name"] for p in data["phases"]] == [
        "quiet", "busy"]
    assert data["goodput_slo_ms"] == {"ttft": 10000.0, "tpot": 5000.0}
    tenants = data["summary"]["tenants"]
    acme, globex = tenants["acme"], tenants["globex"]
    assert acme["completed"] >= 10 and acme["failed"] == 0  # 2/s over 6 s, constant
    assert acme["service_tiers"] == {"dedicated": acme["completed"]}
    assert globex["completed"] >= 2 and globex["service_tiers"] == {"shared": globex["completed"]}
    for s in (acme, globex):
        assert 0 < s["ttft"]["median"] <= s["ttft"]["p99"] < 10_000
        assert s["tpot"]["mean"] > 0 and s["itl"]["mean"] > 0
        assert s["e2el"]["median"] > s["ttft"]["median"]
        assert s["output_tokens"] == 6 * s["completed"]  # ignore_eos: exactly max_tokens
        assert s["request_throughput"] > 0 and s["goodput"] > 0
    assert data["summary"]["phases"]["quiet"]["tenants"].keys() == {"acme"}
    assert data["summary"]["phases"]["busy"]["tenants"].keys() == {"acme", "globex"}
    figures = {f["name"]: f for f in data["analysis"]}
    assert figures["acme 429s"]["value"] == 0 and figures["acme 429s"]["met"] is True
    assert figures["acme p99 TTFT busy / quiet"]["value"] > 0

    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == data["summary"]["overall"]["requests"]
    first = json.loads(lines[0])
    assert first["status"] == 200 and len(first["chunks"]) >= 1

    for name in ("latency_cdf.png", "timeseries.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
