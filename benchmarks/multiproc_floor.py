"""The machine's own multi-process floor: the same decode work split over N forked processes.

A control for issue 16's CPU ratio with 4 workers (benchmarks/results/partitions-floor.md), with none
of fastmix_data involved. The work is every row group of partition_bench's shards of one kind, decoded
once in total: ``--mode tokens`` decodes the token column (``input_ids``, lists of uint16) of each row
group and sums its values; ``--mode text`` decodes the text column and sums every row's UTF-8 bytes
(one cheap pass that touches all of them). A cell forks N children (N in ``--procs``, default 1, 2, 4)
from a parent that has imported pyarrow and numpy, read the files' metadata and then only forks and
waits; child k decodes the contiguous k-th 1/N of the row groups (sorted by file, then row group),
one row group at a time with ``use_threads=False`` like the stream's reader, with transparent huge
pages off from its start (``prctl(PR_SET_THP_DISABLE)``, as the DataLoader workers run). Measured per
cell: the children's user + system CPU and minor faults (``os.wait4``'s rusage, threads included)
per row group decoded, and the wall time from the first fork to the last child reaped. A cell
``N+sink`` adds one more forked process that only receives every decoded values buffer through a
pipe and discards it (a busy consumer besides the decoders, as the training process is; the decoders
then also write their values into the pipe, so ``N+sink`` compares with ``1+sink``); its CPU is
reported apart. ``--passes K``: each process decodes its share K times (a long run's repeated passes;
the per-process start-up then weighs 1/K as much). ``--fraction F``: the work is an evenly spread F of
the row groups, the same ones at every N (a short run, where the start-up weighs more).
``--warm-parent``: the cell's parent decodes one row group (the last, not counted) before it forks, so
the children inherit whatever pyarrow initialises on a process's first decode (a fresh process's
first token row group costs ~200 ms, ~35 ms after a warm parent: partitions-floor/first_decode.log).

Each cell is a fresh process under ``flock LOCK``; a repetition runs every cell once in a seeded random
order (seed = repetition). Prints each cell, then per cell the median (min-max) of CPU per row group
and the ratios to 1 process's paired per repetition; writes the cells, loads, date, machine and commit to
``--out`` (JSON). One unmeasured pass over the files first, so that every cell reads them from the
page cache::

    python benchmarks/multiproc_floor.py --mode tokens --reps 5 --out /tmp/floor_tokens.json
    python benchmarks/multiproc_floor.py --mode text --reps 5 --out /tmp/floor_text.json
    python benchmarks/multiproc_floor.py --mode tokens --procs 1+sink,4+sink --reps 5
    python benchmarks/multiproc_floor.py --mode tokens --passes 4 --reps 5
    python benchmarks/multiproc_floor.py --mode text --fraction 0.4 --reps 5
    python benchmarks/multiproc_floor.py --mode tokens --warm-parent --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMN = {"tokens": "input_ids", "text": "text"}  # partition_bench's shards: one column each


def shard_files(workdir: str, mode: str) -> list[str]:
    """partition_bench's Parquet shards of one kind (``workdir/<mode>/<domain>/*.parquet``), sorted."""
    root = os.path.join(workdir, mode)
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".parquet"))


def row_groups(files: list[str]) -> list[tuple[str, int]]:
    """Every (file, row group) of ``files``, in file order then row-group order."""
    return [(path, g) for path in files for g in range(pq.ParquetFile(path).metadata.num_row_groups)]


def share(units: list, n: int, k: int) -> list:
    """The contiguous k-th of n shares of ``units`` (sizes differ by at most one; all n cover every
    unit exactly once)."""
    return units[k * len(units) // n : (k + 1) * len(units) // n]


def spread(units: list, fraction: float) -> list:
    """An evenly spread ``fraction`` of ``units`` (all of them at 1), in their order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], not {fraction}")
    return [u for i, u in enumerate(units) if int((i + 1) * fraction) > int(i * fraction)]


def decode(units: list[tuple[str, int]], mode: str, sink: int | None = None) -> dict:
    """Decode ``units`` (one row group at a time, one column) and pass once over the values: the
    rows counted from the decoded arrays, the units decoded, and the sum of the values (tokens: the
    ids; text: every row's UTF-8 bytes). With ``sink`` (a pipe's write end), also write each row
    group's values buffer into it (``sent``: the bytes written)."""
    rows, total, sent, opened = 0, 0, 0, {}
    for path, g in units:
        pf = opened.get(path) or opened.setdefault(path, pq.ParquetFile(path))
        for chunk in pf.read_row_group(g, columns=[COLUMN[mode]], use_threads=False).column(0).chunks:
            values = _values(chunk, mode)
            rows += len(chunk)
            total += int(values.sum(dtype=np.uint64))
            if sink is not None:
                sent += _write_all(sink, memoryview(values).cast("B"))
    return {"rows": rows, "units": [[p, g] for p, g in units], "sum": total, "sent": sent}


def _values(chunk, mode: str) -> np.ndarray:
    """A decoded chunk's values, zero-copy: its token ids (list<uint16>) or its rows' UTF-8 bytes
    (string)."""
    if mode == "tokens":
        return chunk.flatten().to_numpy(zero_copy_only=False)
    offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
    return np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]


def _write_all(fd: int, data: memoryview) -> int:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    return done


def _drain(fd: int) -> dict:
    """The sink: read ``fd`` until every writer has closed it, discarding the bytes."""
    got = 0
    while chunk := os.read(fd, 1 << 20):
        got += len(chunk)
    return {"received": got}


def _fork(work, close: tuple[int, ...] = ()) -> tuple[int, int]:
    """Fork a child that closes ``close``, turns huge pages off, runs ``work()`` and writes its result
    as JSON to a pipe; (pid, the pipe's read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        return pid, r
    code = 1
    try:
        for fd in (r, *close):
            os.close(fd)
        _common.disable_huge_pages()
        with os.fdopen(w, "w") as out:
            json.dump(work(), out)
        code = 0
    except BaseException:
        traceback.print_exc()  # the parent reports the failed child; its reason is here
    finally:
        sys.stderr.flush()
        os._exit(code)


def _reap(kids: list[tuple[int, int]]) -> tuple[list[dict], dict, list[str]]:
    """Every child's result, their CPU and faults summed, and the failed ones."""
    results, failed = [], []
    used = {"user": 0.0, "sys": 0.0, "minflt": 0}
    for pid, r in kids:  # every child reaped, failed or not
        with os.fdopen(r) as f:
            text = f.read()
        _, status, ru = os.wait4(pid, 0)
        if status != 0 or not text:
            failed.append(f"child {pid} (wait status {status})")
            continue
        results.append(json.loads(text))
        used = {"user": used["user"] + ru.ru_utime, "sys": used["sys"] + ru.ru_stime,
                "minflt": used["minflt"] + ru.ru_minflt}  # fmt: skip
    return results, used, failed


def run_split(
    files: list[str],
    mode: str,
    n: int,
    sink: bool = False,
    passes: int = 1,
    fraction: float = 1,
    warm_parent: bool = False,
) -> dict:
    """Decode every row group of ``files`` once, split over ``n`` forked children; the children's CPU
    (user, system), minor faults and results, and the wall time from the first fork to the last reap.
    ``sink``: one more child receives every decoded values buffer through a pipe and discards it (a
    busy consumer besides the decoders; its CPU and faults apart, under ``sink``). ``passes``: each
    child decodes its share that many times (``decoded``: row groups decoded in all); ``fraction``:
    only `spread`'s evenly spread fraction of the row groups is the work (``n_units``); ``warm_parent``:
    this process decodes the last row group once (not counted) before it forks."""
    units = spread(row_groups(files), fraction)
    if warm_parent:
        decode(units[-1:], mode)
    t0 = time.perf_counter()
    sink_kid, sink_w = [], None
    if sink:
        sink_r, sink_w = os.pipe()
        sink_kid = [_fork(lambda: _drain(sink_r), close=(sink_w,))]
        os.close(sink_r)
    kids = [_fork(lambda k=k: decode(share(units, n, k) * passes, mode, sink_w)) for k in range(n)]
    if sink_w is not None:
        os.close(sink_w)
    results, used, failed = _reap(kids)
    drained, sink_used, sink_failed = _reap(sink_kid)
    wall = time.perf_counter() - t0
    if failed or sink_failed:
        raise RuntimeError(
            f"the N={n} {mode} cell failed: {', '.join(failed + sink_failed)}; see the children's stderr"
        )
    out = {
        "n": n,
        "mode": mode,
        **used,
        "wall": wall,
        "n_units": len(units),
        "passes": passes,
        "fraction": fraction,
        "warm_parent": warm_parent,
        "decoded": sum(len(c["units"]) for c in results),
        "children": results,
    }
    if sink:
        out["sink"] = {**sink_used, **drained[0]}
    return out


def parse_cell(spec: str) -> tuple[int, bool]:
    """``"4"`` -> (4, False): 4 decoders; ``"4+sink"`` -> (4, True): and a sink (`run_split`)."""
    n, plus, rest = spec.partition("+")
    if not n.isdigit() or int(n) < 1 or (plus and rest != "sink"):
        raise ValueError(f"--procs: a cell is N or N+sink with N >= 1, not {spec!r}")
    return int(n), bool(plus)


def run_cell(
    workdir: str, mode: str, spec: str, lock: str, passes: int = 1, fraction: float = 1, warm: bool = False
) -> dict:
    """One cell in a fresh process under ``flock lock``: `run_split`'s figures (children's unit lists
    dropped, their rows, sums and bytes sent kept)."""
    cmd = ["flock", lock, sys.executable, os.path.abspath(__file__), "--cell", spec, "--mode", mode,
           "--workdir", workdir, "--passes", str(passes), "--fraction", str(fraction)]  # fmt: skip
    cmd += ["--warm-parent"] if warm else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell_main(args) -> int:
    n, sink = parse_cell(args.cell)
    res = run_split(
        shard_files(args.workdir, args.mode), args.mode, n, sink, args.passes, args.fraction, args.warm_parent
    )
    times = Counter(tuple(u) for c in res["children"] for u in c["units"])
    if len(times) != res["n_units"] or set(times.values()) != {args.passes}:
        raise RuntimeError(
            f"{len(times)} of {res['n_units']} row groups decoded, {set(times.values())} times each"
        )
    for key in ("rows", "sum", "sent"):
        res[key] = sum(c[key] for c in res["children"])
    if sink and res["sink"]["received"] != res["sent"]:
        raise RuntimeError(f"the sink received {res['sink']['received']} bytes of {res['sent']} sent")
    del res["children"]
    print(json.dumps({**res, "cell": args.cell}))
    return 0


def med(xs) -> str:
    """median (min-max), three decimals (`_common.Summary`)."""
    return _common.Summary.of(xs).fmt(digits=3)


def _base(spec: str) -> str:
    """The cell a ratio divides by: 1 process (with a sink when ``spec`` has one)."""
    return "1+sink" if spec.endswith("+sink") else "1"


def summary(cells: list[dict], reps: int, specs: list[str]) -> list[str]:
    """Per cell: the decoders' CPU ms per row group (user, system), faults per row group, wall (and the
    sink's CPU); then the ratios of CPU and faults to 1 process's, paired per repetition."""
    by = {(c["cell"], c["rep"]): c for c in cells}
    per = {key: 1000 * (c["user"] + c["sys"]) / c["decoded"] for key, c in by.items()}
    lines = []
    for spec in specs:
        cs = [by[(spec, i)] for i in range(reps)]
        sink = (
            f", sink cpu s {med([c['sink']['user'] + c['sink']['sys'] for c in cs])}"
            if "sink" in cs[0]
            else ""
        )
        lines.append(f"{spec}: cpu ms/row group {med([per[(spec, i)] for i in range(reps)])} (user "
                     f"{med([1000 * c['user'] / c['decoded'] for c in cs])}, sys "
                     f"{med([1000 * c['sys'] / c['decoded'] for c in cs])}), minflt/row group "
                     f"{med([c['minflt'] / c['decoded'] for c in cs])}, wall s {med([c['wall'] for c in cs])}{sink}")  # fmt: skip
    for spec in specs:
        base = _base(spec)
        if spec != base and base in specs:
            cpu = [per[(spec, i)] / per[(base, i)] for i in range(reps)]
            flt = [by[(spec, i)]["minflt"] / by[(base, i)]["minflt"] for i in range(reps)]
            lines.append(f"{spec} / {base}: cpu {med(cpu)}, minflt {med(flt)}")
    return lines


def different_work(cells: list[dict]) -> list[str]:
    """Cells whose rows or value sums differ from the others' (empty: the same work everywhere)."""
    if len({(c["rows"], c["sum"], c["n_units"]) for c in cells}) == 1:
        return []
    return [f"{c['cell']} rep {c['rep']}: {c['rows']} rows, sum {c['sum']}" for c in cells]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=COLUMN, default="tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--procs", default="1,2,4", help="cells, comma-separated: N processes, or N+sink")
    ap.add_argument("--workdir", default="/tmp/perf-bench", help="partition_bench's shards")
    ap.add_argument("--lock", default="/tmp/quiet.lock")
    ap.add_argument("--out", default=None, help="write the cells and metadata here (JSON)")
    ap.add_argument("--passes", type=int, default=1, help="each process decodes its share this many times")
    ap.add_argument(
        "--fraction", type=float, default=1, help="decode an evenly spread fraction of the row groups"
    )
    ap.add_argument(
        "--warm-parent", action="store_true", help="the cell's parent decodes one row group first"
    )
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cell:
        return _cell_main(args)
    specs = args.procs.split(",")
    for spec in specs:
        parse_cell(spec)
    files = shard_files(args.workdir, args.mode)
    meta = {"mode": args.mode, "files": len(files), "commit": _common.git_revision(REPO), "start": _common.today(),
            "command": _common.command_line(), "machine": _common.machine_info(), "load_start": os.getloadavg()}  # fmt: skip
    print(meta, flush=True)
    decode(row_groups(files), args.mode)  # warm the page cache (not measured)
    cells = []
    for rep in range(args.reps):
        for spec in random.Random(rep).sample(specs, len(specs)):
            c = run_cell(
                args.workdir, args.mode, spec, args.lock, args.passes, args.fraction, args.warm_parent
            )
            c.update(rep=rep, load=os.getloadavg())
            cells.append(c)
            print(f"rep {rep} {spec}: cpu {c['user'] + c['sys']:.3f} s (user {c['user']:.3f}, sys {c['sys']:.3f}), "
                  f"minflt {c['minflt']}, wall {c['wall']:.3f} s, {c['decoded']} row groups decoded, {c['rows']} rows, "
                  f"load {c['load'][0]:.2f}", flush=True)  # fmt: skip
    return _common.close_run(meta, cells, args.out, summary(cells, args.reps, specs), different_work(cells),
                             "cells decoded different work:")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
