"""Where a text batch's per-batch CPU goes on the loader's direct path, stage by stage (issue 16).

A timing script: run it under ``flock /tmp/quiet.lock``. partition_bench's text cell (batches of 32
texts, ``--workers`` W: the partitions of worker 0 of W) in this process, with whatever
``fastmix_data`` is first on the path. ``--batches`` consecutive batches of worker 0 are built once
(their row groups decoded and cached), then each stage runs over all of them, ``--reps`` times; per
stage the best pass, in microseconds per batch (``time.perf_counter``; the Parquet decode is not
in any stage):

* ``plan``: the blocks' plans (`MixtureStream._plan_of`);
* ``build_views`` / ``build_str``: building the blocks' batches as a loader worker does (texts as
  UTF-8 views of the Arrow column) / as the in-process stream does (texts as ``str``);
* ``encode``: `batch_ring.encode` of a worker's batch; ``put``: `DirectWriter.put` (encode, slot
  write, record); ``take``: `_Ring.take` in the training process (descriptor, arrays copied, texts
  decoded to ``str``); ``unpack``: `batches.unpack` of the taken batch (as the in-process stream);
* ``texts_to_str``: `batch_ring._texts` alone (the take's decode of the rows to ``str``);
* ``join`` / ``join_write``: ``bytes.join`` of a batch's rows / and its write into a slot;
  ``utf8_floor``: one ``bytes.decode`` of the batch's joined rows (the column decoded at once);
* alternatives to ``join_write`` measured on the same rows: ``arrow_take`` (pyarrow ``take`` of the
  rows from their row groups' columns, then the data buffer written), ``np_concatenate`` (the rows
  as numpy views, ``np.concatenate(out=slot)``), ``pwritev`` (the rows written into the ring file by
  one ``os.pwritev``), ``mm_write`` (``mmap.write`` of each row, through ``map``).

Prints one JSON object (also written to ``--out``)::

    flock /tmp/quiet.lock python benchmarks/text_path_split.py --out /tmp/split.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

if "--no-thp" in sys.argv:  # as a DataLoader worker runs (before pyarrow is imported)
    _common.disable_huge_pages()

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import mmap  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import partition_bench as pb  # noqa: E402


def _best(fn, items, reps: int) -> float:
    """Microseconds per item of ``fn`` over ``items``: the best of ``reps`` passes."""
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t)
    return 1e6 * best / max(len(items), 1)


def _blocks(stream, workers: int, batches: int) -> list[list[int]]:
    """Worker 0's batch indices, in blocks of the stream's ``block_batches``."""
    mine = [j * workers for j in range(batches)]
    size = stream.block_batches
    return [mine[i : i + size] for i in range(0, len(mine), size)]


def _put_take(writer, ring, batches: list[dict], reps: int) -> tuple[float, float]:
    """Microseconds per batch of `DirectWriter.put` and of `_Ring.take` right after it (the best
    of ``reps`` passes each)."""
    put = take = math.inf
    for _ in range(reps):
        tp = tt = 0.0
        for b in batches:
            t0 = time.perf_counter()
            writer.put(b)
            t1 = time.perf_counter()
            ring.take()
            tt += time.perf_counter() - t1
            tp += t1 - t0
        put, take = min(put, tp), min(take, tt)
    n = max(len(batches), 1)
    return 1e6 * put / n, 1e6 * take / n


def _texts_to_str(batches: list[dict], reps: int) -> float:
    """Microseconds per batch of `batch_ring._texts` alone (the take's decode of the rows to
    ``str``), the batches' payloads written one after another into an anonymous map first."""
    from fastmix_data.stream import batch_ring

    encoded = [batch_ring.encode({"text": b["text"]}) for b in batches]
    bases = np.cumsum([0] + [size for *_, size in encoded]).tolist()
    mm = mmap.mmap(-1, max(bases[-1], 1))
    cells = []
    for (_, layout, pieces, _), base in zip(encoded, bases):
        batch_ring.write_pieces(mm, base, pieces)
        _, _, rows, at_lengths, at_text = layout[0]
        cells.append((rows, base + at_lengths, base + at_text))
    try:
        return _best(lambda cell: batch_ring._texts(mm, *cell), cells, reps)
    finally:
        mm.close()


def _check_same(writer, ring, views: list[dict], strs: list[dict]) -> None:
    """The timed batches are the stream's: each worker batch, through a slot, gives the in-process
    batch's texts (else the figures would be of other work)."""
    for i, (view, text) in enumerate(zip(views, strs)):
        writer.put(view)
        if ring.take()["text"] != text["text"]:
            raise RuntimeError(f"batch {i}: the texts through the slot differ from the in-process batch's")


def _built(stream, blocks, plans, raw: bool) -> list[dict]:
    for item_source in stream.items:
        item_source.raw_text = raw
    return [b for sl, idx in zip(plans, blocks) for b in stream._materialise(sl, idx, own=not raw)]


def _arrow_blocks(stream, batches: list[dict], per_block: int) -> list[tuple]:
    """Per block of ``per_block`` batches, what one pyarrow ``take`` per row group needs: the row
    groups' text columns (Arrow arrays over the cached units' buffers), each one's rows in the
    block, and the permutation back to the block's position order (made here, not timed)."""
    import pyarrow as pa

    out = []
    for lo in range(0, len(batches), per_block):
        meta = np.concatenate([b["_meta"] for b in batches[lo : lo + per_block]], axis=1)
        by_unit: dict = {}
        for pos, (src, shard, item) in enumerate(meta[:3].T.tolist()):
            source = stream.items[src]
            g = int(np.searchsorted(source._group_starts(shard), item, side="right")) - 1
            by_unit.setdefault((src, shard, g), []).append((pos, item))
        arrays, rows, order = [], [], []
        for (src, shard, g), picks in by_unit.items():
            unit = stream.items[src]._units(shard, [g])[0]
            texts = unit.data.texts  # Utf8Rows: the unit's offsets and values
            buffers = [None, pa.py_buffer(texts.offsets), pa.py_buffer(texts.values)]
            kind = pa.large_string() if texts.offsets.dtype == np.int64 else pa.string()
            arrays.append(pa.Array.from_buffers(kind, len(texts), buffers))
            rows.append(pa.array([item - unit.start for _, item in picks], pa.int64()))
            order += [pos for pos, _ in picks]
        out.append((arrays, rows, pa.array(np.argsort(order), pa.int64())))
    return out


def _alternatives(stream, batches: list[dict], mm, fd: int, reps: int, per_block: int) -> dict:
    """Each batch's rows copied into a slot, four ways besides ``join_write``."""
    import pyarrow as pa

    texts = [b["text"] for b in batches]
    slot = np.frombuffer(mm, dtype=np.uint8)
    numpy_rows = [[np.frombuffer(v, dtype=np.uint8) for v in rows] for rows in texts]
    blocks = _arrow_blocks(stream, batches, per_block)

    def arrow_take(block):  # one take per row group, one to position order, a write per batch
        arrays, rows, back = block
        column = pa.concat_arrays([a.take(r) for a, r in zip(arrays, rows)]).take(back)
        _, offsets, data = column.buffers()
        ends = np.frombuffer(offsets, dtype=np.int32)[column.offset :: pb.BATCH].tolist()
        data = memoryview(data)
        for a, b in zip(ends, ends[1:]):
            mm[: b - a] = data[a:b]

    def np_concatenate(rows):
        np.concatenate(rows, out=slot[: sum(map(len, rows))])

    def mm_write(rows):
        mm.seek(0)
        collections.deque(map(mm.write, rows), 0)

    return {"arrow_take": _best(arrow_take, blocks, reps) * len(blocks) / max(len(batches), 1),
            "np_concatenate": _best(np_concatenate, numpy_rows, reps),
            "pwritev": _best(lambda rows: os.pwritev(fd, rows, 0), texts, reps),
            "mm_write": _best(mm_write, texts, reps)}  # fmt: skip


def run(args, data: dict | None = None) -> dict:
    from fastmix_data.stream import batch_ring, direct_ring
    from fastmix_data.stream.batches import unpack

    data = data or pb.prepare(args.workdir, 22, 3)
    stream = pb.text_stream(data, args.seed)
    for item_source in stream.items:  # the partitions worker 0 of W serves
        item_source.cursors = stream.mixture.partitions // math.gcd(args.workers, stream.mixture.partitions)
    blocks = _blocks(stream, args.workers, args.batches)
    plans = [stream._plan_of(idx) for idx in blocks]
    n = len(blocks) and sum(len(idx) for idx in blocks)
    out = {"plan": _best(stream._plan_of, blocks, args.reps) * len(blocks) / max(n, 1)}
    built = {}
    for name, raw in (("build_str", False), ("build_views", True)):  # each right after its blocks' decode
        built[raw] = _built(stream, blocks, plans, raw)
        out[name] = _best(lambda sl_idx: stream._materialise(*sl_idx, own=not raw), list(zip(plans, blocks)),  # noqa: B023
                          args.reps) * len(blocks) / max(n, 1)  # fmt: skip
    views, strs = built[True], built[False]
    out["batches"] = len(views)
    out["text_bytes_per_batch"] = sum(len(v) for b in views for v in b["text"]) / max(len(views), 1)
    directory = tempfile.mkdtemp(prefix="text-split-", dir=batch_ring._shared_root())
    try:
        rings = direct_ring.DirectRings(directory, "split", 1, slots=4)
        writer = direct_ring.DirectWriter(direct_ring.ring_path(directory, "split", 0), rings.fifo)
        ring = rings.rings[0]
        out["encode"] = _best(batch_ring.encode, views, args.reps)
        out["put"], out["take"] = _put_take(writer, ring, views, args.reps)
        out["unpack"] = _best(lambda b: unpack(dict(b)), strs, args.reps)
        _check_same(writer, ring, views, strs)
        texts = [b["text"] for b in views]
        joined = [b"".join(t) for t in texts]
        out["join"] = _best(b"".join, texts, args.reps)
        writer.finish(direct_ring.DONE)
        rings.release()
        fd = os.open(os.path.join(directory, "scratch"), os.O_RDWR | os.O_CREAT, 0o600)  # a slot's stand-in
        os.posix_fallocate(fd, 0, direct_ring.SLOT_BYTES)
        mm = mmap.mmap(fd, direct_ring.SLOT_BYTES)
        out["join_write"] = _best(lambda t: mm.__setitem__(slice(0, sum(map(len, t))), b"".join(t)), texts, args.reps)
        out["texts_to_str"] = _texts_to_str(views, args.reps)
        out["utf8_floor"] = _best(lambda d: d.decode("utf-8", "surrogatepass"), joined, args.reps)
        out["non_ascii_batches"] = sum(not d.isascii() for d in joined)
        out.update(_alternatives(stream, views, mm, fd, args.reps, stream.block_batches))
        mm.close()
        os.close(fd)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        stream.close()
    import fastmix_data

    out["code"] = os.path.dirname(os.path.dirname(os.path.abspath(fastmix_data.__file__)))
    return out


def main(argv=None, data: dict | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="the batches and partitions of worker 0 of W")
    ap.add_argument("--batches", type=int, default=600)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/perf-bench")
    ap.add_argument("--no-thp", action="store_true", help="transparent huge pages off in this process")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("BENCH_CACHE", os.path.join(args.workdir, "index-cache"))
    out = run(args, data)
    _common.write_atomic(args.out, json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
