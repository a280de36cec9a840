"""`bench.lora_bench` end to end at a tiny size: every figure measured, the table printed
and the JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.lora_bench import main


def test_lora_bench_runs_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lora.json"
    tiny = ["--requests", "4", "--output-tokens", "3", "--repeats", "2", "--loads", "2"]
    tiny += ["--latency-repeats", "2", "--step-rounds", "3"]
    main(["--mixes", "1", "2", *tiny, "--out", str(out)])
    result = json.loads(out.read_text())
    runs = result["l1_throughput"]["runs"]
    assert list(runs) == ["base", "1 adapter", "2 adapters"]
    assert all(len(r["samples"]) == 2 and r["tok_s"]["p10"] > 0 for r in runs.values())
    assert runs["base"]["ratio_to_base"] == {"p10": 1.0, "p50": 1.0, "p90": 1.0}
    steps = result["l4_decode_step"]["runs"]
    assert list(steps) == ["base", "1 adapter", "2 adapters"]
    assert all(r["step_s"]["p10"] > 0 for r in steps.values())
    assert steps["base"]["speed_vs_base"]["p50"] == 1.0
    loads = result["l2_load"]["samples"]
    assert len(loads) == 2 and all(s > 0 for s in loads)
    latency = result["l3_latency"]
    assert latency["cold_s"]["p50"] > 0 and latency["resident_s"]["p50"] > 0
    printed = capsys.readouterr().out
    assert "L1 tok/s, 2 adapters" in printed and "L4 decode step ms, 2 adapters" in printed
    assert "L1 tok/s, 2 adapters" in printed and "L3 latency ms, adapter loaded first" in printed
