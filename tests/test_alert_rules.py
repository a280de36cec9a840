"""Alert and recording rules, checked and unit-tested by Prometheus's own promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from deployments.observability.generate import prometheus_rule

RULES = Path(__file__).resolve().parent.parent / "deployments" / "observability"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: .ci/run installs Debian's prometheus package"
    return subprocess.run(
        [promtool, *args], cwd=RULES, capture_output=True, text=True, timeout=120
    )


def test_rules_file_is_valid() -> None:
    result = _promtool("check", "rules", "alerts.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    rules = yaml.safe_load((RULES / "alerts.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert len(alerts) >= 6
    tests = yaml.safe_load((RULES / "alerts_test.yaml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for alert in alerts:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} never tested firing"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} never tested quiet"


def test_prometheus_rule_holds_the_same_groups() -> None:
    rules = yaml.safe_load((RULES / "alerts.yaml").read_text())
    committed = yaml.safe_load((RULES / "prometheusrule.yaml").read_text())
    assert committed == prometheus_rule(rules)
    assert committed["kind"] == "PrometheusRule"
    assert committed["spec"]["groups"] == rules["groups"]
