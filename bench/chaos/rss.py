"""Resident memory of this machine's Ray worker processes (`ray::…` in /proc), for the
soak's leak check. Only processes on the machine the run is on are seen."""

from __future__ import annotations

from pathlib import Path


def worker_rss() -> dict[int, tuple[str, int]]:
    """pid -> (process title, RSS in kB) of every Ray worker process."""
    out: dict[int, tuple[str, int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith("ray::"):
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[int(proc.name)] = (title, int(line.split()[1]))
        except OSError:  # exited meanwhile
            continue
    return out


def growth(first: dict[int, tuple[str, int]], last: dict[int, tuple[str, int]]
           ) -> list[tuple[float, str, int, int]]:
    """(growth %, title, kB at first, kB at last) of each process in both, worst first."""
    rows = [
        (100.0 * (last[pid][1] - kb) / kb, title, kb, last[pid][1])
        for pid, (title, kb) in first.items() if pid in last and kb > 0
    ]
    return sorted(rows, reverse=True)
