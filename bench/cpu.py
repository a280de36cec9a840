"""Where this machine's CPU went during each phase, by process group (Linux /proc).

On a small box the load generator, the Serve proxy, the ingress replicas and the model
servers all share the same cores, so a latency figure needs the CPU picture beside it:
which group was busy while a flood ran. Ray names its worker processes after the actor
(`ray::ServeReplica:tiered:ingress`, `ray::ProxyActor`, ...), which is what the groups
are read from. Figures are % of one core, averaged over the phase.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

PROC = Path("/proc")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
GROUPS = (  # (group, substring of the process title), first match wins
    ("proxy", "ray::ProxyActor"),
    ("ingress", ":ingress"),
    ("dedicated replicas", ":dedicated-"),
    ("shared replicas", ":shared-"),
    ("tp workers", "ray::TPWorker"),
    ("admission", "ray::AdmissionActor"),
    ("echo app", ":Echo"),
    ("serve controller", "ray::ServeController"),
    ("ray system", "raylet"),
    ("ray system", "gcs_server"),
    ("ray system", "dashboard"),
    ("ray system", "runtime_env"),
    ("ray system", "log_monitor"),
    ("ray system", "ray::IDLE"),
)


def group_of(title: str, pid: int, me: int, mine: bool = True) -> str:
    """The group of a process; processes outside this run's tree are "other processes"
    (another Ray cluster on the box has the same process titles)."""
    if pid == me:
        return "bench client"
    if not mine:
        return "other processes"
    for group, needle in GROUPS:
        if needle in title:
            return group
    return "other processes"


def descendants(parents: dict[int, int], root: int) -> set[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parents.items():
        children[ppid].append(pid)
    seen, todo = {root}, [root]
    while todo:
        for child in children[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def snapshot(me: int) -> dict[int, tuple[str, float]]:
    """pid → (group, CPU seconds so far), for every readable process. The local Ray
    cluster of a run is started by this process, so its processes descend from it."""
    procs: dict[int, tuple[str, int, float]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        procs[int(entry.name)] = (title, int(fields[1]), cpu)
    mine = descendants({pid: ppid for pid, (_, ppid, _) in procs.items()}, me)
    return {
        pid: (group_of(title, pid, me, pid in mine), cpu)
        for pid, (title, _, cpu) in procs.items()
    }


class CpuSampler:
    """Samples every `period_s` in a thread; `by_window` turns the samples into CPU % per
    group for given time windows (perf_counter seconds)."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.available = PROC.is_dir() and (PROC / "self" / "stat").is_file()

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), snapshot(me)))
            self._stop.wait(self.period_s)

    def start(self) -> None:
        if self.available:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def intervals(self) -> list[tuple[float, float, dict[str, float]]]:
        """(start, end, CPU seconds per group) between consecutive samples."""
        out = []
        for (t1, a), (t2, b) in zip(self.samples, self.samples[1:], strict=False):
            used: dict[str, float] = defaultdict(float)
            for pid, (group, cpu) in b.items():
                before = a.get(pid)
                used[group] += cpu - before[1] if before else 0.0
            out.append((t1, t2, dict(used)))
        return out

    def by_window(self, windows: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
        """window name → group → % of one core, from the intervals whose midpoint is in it."""
        result = {}
        for name, (start, end) in windows.items():
            total: dict[str, float] = defaultdict(float)
            seconds = 0.0
            for t1, t2, used in self.intervals():
                if start <= (t1 + t2) / 2 < end:
                    seconds += t2 - t1
                    for group, cpu in used.items():
                        total[group] += cpu
            if seconds > 0:
                shares = {g: round(100 * v / seconds, 1) for g, v in total.items() if v > 0}
                shares["total"] = round(sum(shares.values()), 1)
                result[name] = dict(sorted(shares.items(), key=lambda kv: -kv[1]))
        return result
