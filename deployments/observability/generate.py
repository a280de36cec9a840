"""Write the committed observability artifacts; a test checks that a rerun gives no diff.

    python -m deployments.observability.generate

Outputs: the dashboards' JSON (for Grafana import and the `ray up` docs), the
PrometheusRule form of alerts.yaml (Prometheus Operator), and the copies the Helm chart
packs into ConfigMaps and its PrometheusRule.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from deployments.observability.dashboards import all_dashboards

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHART_FILES = ROOT / "helm" / "tiered" / "files"


def dashboard_json(board: dict) -> str:
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def prometheus_rule(rules: dict, name: str = "tiered") -> dict:
    """The Prometheus Operator's PrometheusRule holding the same groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "tiered"}},
        "spec": {"groups": rules["groups"]},
    }


def artifacts() -> dict[Path, str]:
    """Every generated file and its content."""
    out: dict[Path, str] = {}
    for uid, board in all_dashboards().items():
        text = dashboard_json(board)
        out[HERE / "dashboards" / f"{uid}.json"] = text
        out[CHART_FILES / "dashboards" / f"{uid}.json"] = text
    alerts_text = (HERE / "alerts.yaml").read_text()
    rule = prometheus_rule(yaml.safe_load(alerts_text))
    out[HERE / "prometheusrule.yaml"] = yaml.safe_dump(rule, sort_keys=False, width=100)
    out[CHART_FILES / "alerts.yaml"] = alerts_text
    return out


def main() -> None:
    for path, text in artifacts().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
