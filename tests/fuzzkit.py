"""Shared generators of the fuzz, fault and crash suites (tests/test_fuzz_*.py, test_faults_*.py,
test_crash_*.py).

- **Budget.** ``FASTMIX_FUZZ=long`` runs every property with ``LONG_FACTOR`` times its examples and a
  fresh random seed (printed by hypothesis on failure), and the crash tests at more kill points;
  the default (CI) budget is small and derandomised, so CI is reproducible. ``FASTMIX_FUZZ_EXAMPLES=N``
  sets the examples per property exactly. See docs/robustness.md.
- **Mutations** of real JSON documents (states, manifests, configs): drop, duplicate, retype, negate,
  huge, NaN/inf, zero, empty, applied at any path of the document, one to three at a time.
- **Values** that users pass where numbers are expected: every JSON type, NaN/inf, huge and tiny
  floats, huge ints, booleans, numeric strings, numpy and torch scalars.
- **Processes** for the crash tests: start a command in its own process group and SIGKILL the group.
"""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG = os.environ.get("FASTMIX_FUZZ", "").lower() == "long"
LONG_FACTOR = 25
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for a property worth ``examples`` examples in CI."""
    exact = int(os.environ.get("FASTMIX_FUZZ_EXAMPLES", "0"))
    n = exact or (examples * LONG_FACTOR if LONG else examples)
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )


def kill_points(ci: int, long: int) -> int:
    """How many random kill points a crash test tries."""
    return long if LONG else ci


class KillPoints:
    """The random kill points of a crash test: ``ci`` (``long`` with FASTMIX_FUZZ=long) of them must
    land while the job works; one that lands after the job finished (a loaded machine) is replaced,
    up to 4x as many attempts. ``FASTMIX_CRASH_SEED`` replays a run (the seed is in ``self.seed``)::

        points = KillPoints(1, 4, default_seed=5)
        for attempt in points:
            ...kill at points.rng's choice...; if the job had finished: continue
            points.landed(); ...check...
    """

    def __init__(self, ci: int, long: int, default_seed: int):
        import random

        self.wanted = kill_points(ci, long)
        self.seed = int(os.environ.get("FASTMIX_CRASH_SEED", "0")) or (random.randrange(1 << 30) if LONG else default_seed)
        self.rng = random.Random(self.seed)
        self.count = 0

    def __iter__(self) -> Iterator[int]:
        for attempt in range(4 * self.wanted):
            if self.count == self.wanted:
                return
            yield attempt
        assert self.count == self.wanted, f"every kill came after the job had finished (FASTMIX_CRASH_SEED={self.seed})"

    def landed(self) -> None:
        self.count += 1


# ------------------------------------------------------------------------------------------ values
ODD_NUMBERS = [
    0, -1, 1, -0.0, 1e-320, 1e308, -1e308, 10**30, -(10**30), 2**63, float("nan"), float("inf"),
    float("-inf"), True, False, "0.5", "1", "", "nan", None, [], {}, [1.0], {"x": 1}, 2.5,
]  # fmt: skip


def scalars() -> st.SearchStrategy:
    """Anything a user might put where a number is expected."""
    import numpy as np

    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.sampled_from(ODD_NUMBERS),
        st.booleans(),
        st.text(max_size=6),
        st.none(),
        st.builds(np.float64, st.floats(allow_nan=True, allow_infinity=True)),
        st.builds(np.int64, st.integers(min_value=-(2**62), max_value=2**62)),
        st.builds(np.float32, st.floats(width=32)),
        st.builds(Fraction, st.integers(-5, 5), st.integers(1, 5)),
        st.builds(np.bool_, st.booleans()),
    )


# ------------------------------------------------------------------------------------------ mutations
OPS = ("drop", "duplicate", "retype", "negate", "huge", "nan", "inf", "zero", "empty")
RETYPES = ("a string", True, None, 3.5, [], {}, 7)


def paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (tuple of keys / indices) to a node of a JSON document, the root excluded."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for key, value in items:
        yield (*prefix, key)
        yield from paths(value, (*prefix, key))


def _parent(doc: Any, path: tuple) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


def _changed(value: Any, op: str, retype: Any) -> Any:
    if op == "retype":
        return retype if type(retype) is not type(value) else "retyped"
    if op == "negate":
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return -value if value else -1
        return f"-{value}" if isinstance(value, str) else value
    if op == "huge":
        if isinstance(value, float):
            return 1e308
        if isinstance(value, str):  # long, but bounded however often it is applied
            return ((value or "x") * (1 + 1000 // max(len(value), 1)))[:1000]
        if isinstance(value, list):
            return (value or [0]) * (1 + 50 // max(len(value), 1))
        return 10**30
    if op == "nan":
        return float("nan")
    if op == "inf":
        return float("inf")
    if op == "zero":
        return [0.0] * len(value) if isinstance(value, list) else (0 if not isinstance(value, str) else "0")
    if op == "empty":
        return type(value)() if isinstance(value, (list, dict, str)) else None
    raise AssertionError(op)


def mutate(doc: Any, path: tuple, op: str, retype: Any = None) -> Any:
    """A deep copy of ``doc`` with ``op`` applied at ``path``."""
    doc = copy.deepcopy(doc)
    parent, key = _parent(doc, path), path[-1]
    if op == "drop":
        del parent[key]
    elif op == "duplicate":
        if isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            parent[f"{key}_copy"] = copy.deepcopy(parent[key])
            parent[key] = copy.deepcopy(parent[key])
    else:
        parent[key] = _changed(parent[key], op, retype)
    return doc


@st.composite
def mutations(draw, doc: Any, max_mutations: int = 3) -> tuple[Any, list[tuple]]:
    """(mutated copy of ``doc``, [(path, op), ...]): one to ``max_mutations`` mutations."""
    applied = []
    for _ in range(draw(st.integers(1, max_mutations))):
        candidates = list(paths(doc))
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        op = draw(st.sampled_from(OPS))
        doc = mutate(doc, path, op, draw(st.sampled_from(RETYPES)))
        applied.append((path, op))
    return doc, applied


def path_names(path: tuple) -> list[str]:
    """The names a message about ``path`` may use: its string keys (innermost first), and the form
    ``key[i]`` for indices."""
    names = [str(k) for k in reversed(path) if isinstance(k, str)]
    return names or ["["]


def names_field(message: str, path: tuple, also: tuple[str, ...] = ()) -> bool:
    """True when ``message`` names a key on ``path`` (or one of ``also``)."""
    lowered = message.lower()
    return any(n.lower() in lowered for n in (*path_names(path), *also))


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------ processes
def start(args: list[str], env: dict | None = None, log: str | None = None) -> subprocess.Popen:
    """Start ``python args...`` in its own process group (so a kill takes its children too)."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), ROOT])},
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (as a crash of the node would) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def kill_when(proc: subprocess.Popen, ready, rng, what: str, timeout: float = 180, jitter: float = 0.05) -> None:
    """Wait until ``ready()`` (the random point the test chose), then a random jitter of up to
    ``jitter`` s, then SIGKILL the process group."""
    try:
        wait_for(ready, timeout, proc, what)
        time.sleep(rng.uniform(0.0, jitter))
    finally:
        kill_group(proc)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` s or when ``proc`` exits first."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None and not predicate():
            raise AssertionError(f"process exited with {proc.returncode} before {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def our_leftovers(directory: str, pid: int) -> list[str]:
    """Names in ``directory`` that belong to process ``pid`` (run dirs and temporary files)."""
    pat = re.compile(rf"^(fastmix-(channel|rings|shards)-{pid}-|\..*\.{pid}\.[a-z0-9_]{{8}}\.tmp$|\..*\.tmp-?{pid}$)")
    try:
        return [n for n in os.listdir(directory) if pat.match(n)]
    except OSError:
        return []


# ------------------------------------------------------------------------------------------ file faults
FORMATS = ("parquet", "webdataset", "mds", "hf")


def write_format(fmt: str, directory, docs: list[str], shards: int = 4) -> tuple[str, list[str]]:
    """A source of ``fmt`` in ``directory`` written by the real library, several row groups / members
    / samples / batches per shard; returns (spec for open_source, shard paths in source order)."""
    import glob
    import json

    from shardgen import write_hf_source, write_mds_source, write_parquet_source, write_wds_source

    directory = os.fspath(directory)
    if fmt == "parquet":
        write_parquet_source(directory, docs, shards=shards, row_group_size=3)
        return directory, sorted(glob.glob(os.path.join(directory, "*.parquet")))
    if fmt == "webdataset":
        write_wds_source(directory, docs, shards=shards, ids_member="input_ids.npy")
        return os.path.join(directory, "*.tar"), sorted(glob.glob(os.path.join(directory, "*.tar")))
    if fmt == "mds":
        write_mds_source(directory, docs, shards=shards)
        with open(os.path.join(directory, "index.json")) as f:
            names = [s["raw_data"]["basename"] for s in json.load(f)["shards"]]
        return directory, [os.path.join(directory, n) for n in names]
    write_hf_source(directory, docs, shards=shards)
    with open(os.path.join(directory, "state.json")) as f:
        names = [e["filename"] for e in json.load(f)["_data_files"]]
    return directory, sorted(os.path.join(directory, n) for n in names)


def regions(fmt: str, path: str) -> dict[str, int]:
    """Truncation points of one shard, by region: inside the header, at an inner boundary (row
    group, tar member, MDS sample, Arrow message), inside a payload, and in the footer / end marker."""
    size = os.path.getsize(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path).metadata
        col0, col1 = md.row_group(0).column(0), md.row_group(1).column(0)
        start0 = col0.dictionary_page_offset or col0.data_page_offset
        start1 = col1.dictionary_page_offset or col1.data_page_offset
        with open(path, "rb") as f:
            f.seek(size - 8)
            footer = int.from_bytes(f.read(4), "little")
        return {"header": 2, "page": (start0 + start1) // 2, "row-group-boundary": start1,
                "footer-metadata": size - 8 - footer // 2, "footer-magic": size - 2}  # fmt: skip
    if fmt == "webdataset":
        import tarfile

        with tarfile.open(path) as tar:
            members = tar.getmembers()
        end = members[-1].offset_data + -(-members[-1].size // 512) * 512
        return {"header": 100, "member-data": members[0].offset_data + 3, "member-boundary": members[2].offset,
                "end-marker": end, "end-marker-half": end + 512}  # fmt: skip
    if fmt == "mds":
        import numpy as np

        with open(path, "rb") as f:
            data = f.read()
        count = int(np.frombuffer(data, np.uint32, count=1)[0])
        offsets = np.frombuffer(data, np.uint32, count=count + 1, offset=4)
        return {"header": 2, "offset-table": 4 + 4 * (count // 2), "sample-boundary": int(offsets[count // 2]),
                "sample-data": int(offsets[count // 2]) + 1, "last-byte": size - 1}  # fmt: skip
    import pyarrow as pa

    with open(path, "rb") as f:
        src = pa.BufferReader(f.read())
    reader = pa.ipc.MessageReader.open_stream(src)
    ends = []
    while (msg := _next_message(reader)) is not None:
        ends.append((msg.type, src.tell()))
    schema_end = ends[0][1]
    return {"schema": 6, "schema-boundary": schema_end, "batch-data": (schema_end + ends[1][1]) // 2,
            "batch-boundary": ends[-1][1], "end-marker-half": size - 4}  # fmt: skip


def _next_message(reader):
    try:
        return reader.read_next_message()
    except StopIteration:
        return None


def truncate_at(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(offset)


def flip_bits(path: str, seed: int, count: int = 3) -> list[int]:
    """Flip ``count`` random bits of the file in place (same size); returns the byte offsets."""
    import random

    rng = random.Random(seed)
    size = os.path.getsize(path)
    where = sorted(rng.randrange(size) for _ in range(count))
    with open(path, "r+b") as f:
        for off in where:
            f.seek(off)
            byte = f.read(1)[0]
            f.seek(off)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return where


def add_empty_shard(fmt: str, directory, after: int = 1) -> str:
    """Add a valid zero-row shard that sorts after shard ``after``, written by the format's own
    library; returns its path."""
    import json

    import pyarrow as pa

    directory = os.fspath(directory)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        path = os.path.join(directory, f"part-{after:05d}x-empty.parquet")
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    elif fmt == "webdataset":
        import webdataset as wds

        path = os.path.join(directory, f"shard-{after:05d}x-empty.tar")
        with wds.TarWriter(path):
            pass
    elif fmt == "hf":
        path = os.path.join(directory, f"data-{after:05d}x-empty.arrow")
        with open(os.path.join(directory, "state.json")) as f:
            first = json.load(f)["_data_files"][0]["filename"]
        schema = pa.ipc.open_stream(pa.memory_map(os.path.join(directory, first))).schema
        with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, schema):
            pass
        with open(os.path.join(directory, "state.json")) as f:
            state = json.load(f)
        state["_data_files"].insert(after + 1, {"filename": os.path.basename(path)})
        with open(os.path.join(directory, "state.json"), "w") as f:
            json.dump(state, f)
    else:
        raise ValueError("MDS: write the empty shard with write_mds_with_empty_shard")
    return path


def write_mds_with_empty_shard(directory, docs: list[str], shards: int = 4, empty_at: int = 2) -> tuple[str, list[str]]:
    """An MDS dataset (streaming.MDSWriter) whose shard ``empty_at`` holds no samples."""
    import json

    from shardgen import split_evenly

    from fastmix_data.sources.mds_compat import import_streaming

    streaming = import_streaming()
    groups = split_evenly(list(docs), shards)
    groups.insert(empty_at, [])
    with streaming.MDSWriter(out=os.fspath(directory), columns={"text": "str"}, size_limit=None) as w:
        for group in groups:
            for doc in group:
                w.write({"text": doc})
            w.flush_shard()
            w._reset_cache()
    with open(os.path.join(directory, "index.json")) as f:
        names = [s["raw_data"]["basename"] for s in json.load(f)["shards"]]
    return os.fspath(directory), [os.path.join(directory, n) for n in names]


def drop_dac_capabilities() -> None:
    """preexec_fn: remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that a
    root child obeys file permissions (raises OSError where the container does not allow it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
