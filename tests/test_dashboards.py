"""Dashboards as code: generation is stable, and every query names catalogue metrics."""

from __future__ import annotations

import re
from pathlib import Path

from deployments.observability.dashboards import PANELS, all_dashboards, panel_queries
from deployments.observability.generate import artifacts
from deployments.observability.metrics import CATALOGUE

METRIC = re.compile(r"\bray_(tiered_\w+?)(?:_bucket)?\b")


def test_regenerating_gives_no_diff() -> None:
    stale = [str(p) for p, text in artifacts().items() if not p.exists() or p.read_text() != text]
    assert not stale, f"run `python -m deployments.observability.generate`: {stale}"


def test_every_panel_queries_catalogue_metrics_only() -> None:
    queries = panel_queries()
    assert len(queries) >= 20
    used = set()
    for _, title, expr in queries:
        names = METRIC.findall(expr)
        assert names or expr.startswith("vector("), f"{title}: no Tiered metric in {expr}"
        for name in names:
            assert name in CATALOGUE, f"{title}: {name} is not in docs/METRICS.md"
            used.add(name)
    unused = set(CATALOGUE) - used
    assert not unused, f"metrics no panel shows: {sorted(unused)}"


def test_dashboard_variables_are_defined() -> None:
    for uid, board in all_dashboards().items():
        defined = {v["name"] for v in board["templating"]["list"]} | {"__rate_interval"}
        for panel in board["panels"]:
            for target in panel["targets"]:
                used = set(re.findall(r"\$(\w+)", target["expr"]))
                assert used <= defined, (uid, panel["title"], used - defined)
        assert board["uid"] == f"tiered-{uid}" and board["title"] == PANELS[uid][0]


def test_the_catalogue_document_matches_the_code() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "METRICS.md").read_text()
    documented = set(re.findall(r"^\| `(tiered_\w+)` \|", doc, re.M))
    assert documented == set(CATALOGUE)
