"""Shared helpers for the benchmarks: machine description, library versions, timing statistics,
Markdown tables.

Every benchmark in this folder reports the machine it ran on, the exact command and the versions of
the libraries it compares, and repeats each measurement; these helpers keep that uniform.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


# --------------------------------------------------------------------------------- machine / env
def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, str]:
    """CPU model, logical cores usable by this process, RAM, OS, Python."""
    cpu = _lscpu()
    mem = _mem_total_gib()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu.get("Model name", platform.processor() or "unknown"),
        "cores": f"{usable} usable (lscpu: {cpu.get('CPU(s)', '?')} CPU(s), "
        f"{cpu.get('Thread(s) per core', '?')} thread(s)/core)",
        "ram": f"{mem:.1f} GiB" if mem is not None else "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def versions(distributions: Sequence[str]) -> dict[str, str]:
    """Installed version of each distribution (``"not installed"`` when absent)."""
    out = {}
    for name in distributions:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_revision(path: str = ".", subdir: str | None = None) -> str:
    """Short HEAD commit of the checkout at ``path``, with ``+dirty`` when the tree (or only ``subdir``,
    when given) has uncommitted changes; with ``subdir`` also the last commit that touched it.
    ``unknown`` outside a git checkout. Call it when a run *starts*: others may commit meanwhile."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", path, *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", *([subdir] if subdir else []))
        out = rev + ("+dirty" if dirty else "")
        if subdir:
            last = git("log", "-1", "--format=%h", "--", subdir)
            out = f"{out} ({subdir}: last changed in {last}{', uncommitted changes' if dirty else ', clean'})"
        return out
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    """The command that started this process, shell-quoted."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def today() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# --------------------------------------------------------------------------------- machine load
def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (0..1; NaN where /proc/stat is missing).

    Call it while this process is idle to see how much *other* work the machine is doing."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return float("nan")
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def wait_for_quiet(threshold: float = 0.25, timeout: float = 120.0, interval: float = 0.5) -> float:
    """Wait (up to ``timeout`` s) until other processes use at most ``threshold`` of the CPUs; return
    the last busy fraction seen, so a report can say how quiet the machine was before a measurement."""
    deadline = time.monotonic() + timeout
    busy = cpu_busy(interval)
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(interval)
    return busy


def _proc_stat(pid: int | str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user + system so far) of a live process from /proc; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int | str) -> float:
    """CPU seconds (user + system, all threads) a live process has used so far (``"PID/task/TID"``: one
    thread); NaN if it is gone."""
    stat = _proc_stat(pid)
    return float("nan") if stat is None else stat[1]


def live_descendants() -> dict[int, float]:
    """pid -> CPU seconds so far of every live descendant of this process (e.g. DataLoader workers)."""
    me = os.getpid()
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        stat = _proc_stat(entry) if entry.isdigit() else None
        if stat is not None:
            parents[int(entry)], cpu[int(entry)] = stat
    out = {}
    for pid in cpu:
        p, seen = parents.get(pid), 0
        while p and p != me and seen < 64:
            p, seen = parents.get(p), seen + 1
        if p == me and pid != me:
            out[pid] = cpu[pid]
    return out


def _process_tree_cpu() -> float:
    """CPU seconds used so far by this process (all threads), its reaped children, and its live
    descendants (e.g. DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + sum(live_descendants().values())


class OtherLoad:
    """Measures how much CPU *other* processes used during a block: system busy time minus this
    process tree's CPU time, as a fraction of all CPUs. ``with OtherLoad() as load: ...; load.fraction``."""

    def __enter__(self) -> OtherLoad:
        self._sys = _cpu_times()
        self._own = _process_tree_cpu()
        self._t = time.perf_counter()
        self.fraction = float("nan")
        return self

    def stop(self) -> float:
        """End the measurement now (before worker processes exit); return the fraction."""
        sys_now, own_now = _cpu_times(), _process_tree_cpu()
        if self._sys is None or sys_now is None or sys_now[0] == self._sys[0]:
            return self.fraction
        total = sys_now[0] - self._sys[0]
        busy = total - (sys_now[1] - self._sys[1])
        tick = os.sysconf("SC_CLK_TCK")
        self.fraction = max(0.0, (busy / tick - (own_now - self._own)) / (total / tick))
        return self.fraction

    def __exit__(self, *exc) -> None:
        if not self.fraction == self.fraction:  # NaN: not stopped yet
            self.stop()


# --------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Summary:
    """min / median / max of repeated measurements."""

    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        vals = sorted(float(v) for v in values)
        if not vals:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(vals[0], statistics.median(vals), vals[-1], len(vals))

    def fmt(self, scale: float = 1.0, digits: int = 0) -> str:
        """``median (min–max)`` after dividing by ``scale``."""
        if self.n == 0:
            return "–"
        f = f"{{:,.{digits}f}}"
        med = f.format(self.median / scale)
        if self.n == 1:
            return med
        return f"{med} ({f.format(self.min / scale)}–{f.format(self.max / scale)})"


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds`` (perf_counter wall time)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), wall seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------- output
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one char per column: ``l``, ``r`` or ``c``."""
    header = [str(h) for h in header]
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


PR_SET_THP_DISABLE = 41  # <linux/prctl.h>


def disable_huge_pages() -> None:
    """Transparent huge pages off for this process from now on (``prctl(PR_SET_THP_DISABLE)``), the
    state fastmix_data's DataLoader workers run in (`fastmix_data.stream.worker_memory`, which also
    honours its opt-out; a benchmark cell must not). This module imports nothing heavy, so a script
    can call it before pyarrow is imported."""
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`fastmix_data.io.write_text_atomic`)."""
    from fastmix_data.io import write_text_atomic

    write_text_atomic(path, text)


def close_run(meta: dict, cells: list[dict], out: str | None, lines: list[str], bad: list[str], what: str) -> int:
    """End of a study run by cells: record the end time and load in ``meta``, print the loads, write
    ``meta`` and the cells to ``out`` (JSON; skipped when None), print the summary ``lines``, then
    ``what`` and the ``bad`` cells if any. Exit status: 1 when there are bad cells, else 0."""
    meta.update(end=today(), load_end=os.getloadavg())
    print("load at start", meta["load_start"], "at end", meta["load_end"])
    if out:
        write_atomic(out, json.dumps({**meta, "cells": cells}, indent=1))
    print("\n".join(lines))
    if bad:
        print(what, *bad, sep="\n")
        return 1
    return 0


KEEP_MARKER = "<!-- Everything below this line is hand-written and kept when the benchmark rewrites the report. -->"


def kept_analysis(path: str, marker: str = KEEP_MARKER) -> str:
    """The hand-written part of an existing report (from ``marker`` on), to append to a rewritten one;
    a new report gets the marker alone."""
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        return "\n" + marker + "\n"
    at = old.find(marker)
    return "\n" + (old[at:] if at >= 0 else marker + "\n")
