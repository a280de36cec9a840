"""Shared output for the bench scripts: a rich table on the terminal and a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def emit(title: str, result: dict, out: Path) -> None:
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    Console().print(f"wrote {out}")
