"""What the field-by-field manifest checks cost: `validate_manifest` of a 10,000-shard manifest with the
checks (``check_fields`` + ``check_counts``, docs/manifest.md "Reading and checking") and without
them (the same function with both replaced by no-ops: what validation did before), interleaved in
one run, plus a converter (`megatron_blend`, which now validates the dict it is given).

The manifest is built from synthetic shard-index entries (rows, tokens, bytes, sha256 per shard, as
the index cache returns them; see export_bench.py), with a weight change and a capped source, and
validated with ``verify="none"`` (no file is read: only the checks are timed).

Usage::

    python benchmarks/validate_bench.py                 # 10,000 shards, 15 repetitions
    python benchmarks/validate_bench.py --shards 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Summary, command_line, git_revision, machine_info, markdown_table, today, write_atomic  # noqa: E402
from export_bench import synthetic_sources  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "validate.md"))
    args = ap.parse_args()

    import fastmix_data.export.manifest as manifest_mod
    from fastmix_data.export import build_manifest, validate_manifest
    from fastmix_data.export.converters import megatron_blend

    root = tempfile.mkdtemp(prefix="validate-bench-")
    sources = synthetic_sources(root, args.shards)
    names = list(sources)
    history = [{"position": 10**9, "weights": {n: 1.0 + i for i, n in enumerate(names)}}]
    m = build_manifest(sources, {n: 1.0 for n in names}, "100B_tokens", root=root, history=history,
                       exhaustion={names[-1]: {"policy": "cap", "max_epochs": 3}})  # fmt: skip
    checks = (manifest_mod.check_fields, manifest_mod.check_counts)
    off = (lambda m: None, lambda m: None)

    def run(which: str) -> float:
        """CPU seconds of this process for one call (wall time on a shared machine mostly measures
        the other processes; the call is single-threaded and does no I/O beyond path lookups)."""
        manifest_mod.check_fields, manifest_mod.check_counts = checks if which.startswith("with") else off
        t0 = time.process_time()
        if which.endswith("convert"):
            megatron_blend(m)
        elif which == "checks alone":
            checks[0](m)
            checks[1](m)
        else:
            validate_manifest(m, verify="none")
        return time.process_time() - t0

    uptime_start = os.getloadavg()
    cells = ["with checks", "without checks", "with checks convert", "without checks convert", "checks alone"]
    times: dict[str, list[float]] = {c: [] for c in cells}
    for r in range(args.repeats):
        order = cells if r % 2 == 0 else cells[::-1]  # alternate the order: no cell always runs first
        for c in order:
            times[c].append(run(c))
    manifest_mod.check_fields, manifest_mod.check_counts = checks
    uptime_end = os.getloadavg()

    def ratio(a: str, b: str) -> Summary:
        return Summary.of(x / y for x, y in zip(times[a], times[b]))

    rows = [
        ["validate_manifest (verify=none)", Summary.of(times["without checks"]).fmt(1e-3, 1),
         Summary.of(times["with checks"]).fmt(1e-3, 1), ratio("with checks", "without checks").fmt(1, 2),
         f"{statistics.median(times['with checks']) * 1e3 - statistics.median(times['without checks']) * 1e3:.1f}"],
        ["megatron_blend (validates first)", Summary.of(times["without checks convert"]).fmt(1e-3, 1),
         Summary.of(times["with checks convert"]).fmt(1e-3, 1), ratio("with checks convert", "without checks convert").fmt(1, 2),
         f"{statistics.median(times['with checks convert']) * 1e3 - statistics.median(times['without checks convert']) * 1e3:.1f}"],
        ["check_fields + check_counts alone", "–", Summary.of(times["checks alone"]).fmt(1e-3, 1), "–",
         f"{statistics.median(times['checks alone']) * 1e3:.1f}"],
    ]  # fmt: skip
    machine = machine_info()
    text = "\n".join([
        "# Manifest validation: the cost of the field-by-field checks",
        "",
        f"Date {today()}; fastmix_data {git_revision()}; command `{command_line()}`.",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores. Load average (1, 5, 15 min) at start "
        f"{tuple(round(x, 2) for x in uptime_start)}, at end {tuple(round(x, 2) for x in uptime_end)}: the machine was "
        "shared, so times are CPU seconds of the benchmark process (`time.process_time`), not wall time.",
        "",
        f"A manifest of {args.shards:,} shards in {len(names)} sources (synthetic index entries), a budget of 100B tokens, "
        f"one weight change, one capped source; {args.repeats} repetitions, cells interleaved, order alternated. "
        "CPU times in ms, median (min–max); the ratio is paired (with / without, per repetition).",
        "",
        markdown_table(["call", "without checks (CPU ms)", "with checks (CPU ms)", "ratio", "added (CPU ms, medians)"], rows, "lrrrr"),
        "",
    ])  # fmt: skip
    write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
