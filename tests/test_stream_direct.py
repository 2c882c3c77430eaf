"""`loader()` workers write their batches straight into shared-memory rings that the training
process reads; the DataLoader only starts, feeds and stops them (fastmix_data.stream.direct_ring).
Real worker processes, real shards, real files; no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conformance import batch_key
from procs import alive, descendants
from shardgen import write_code_web_sources

from fastmix_data import MixtureStream
from fastmix_data.stream.direct_ring import DONE, DirectRings, DirectWriter
from fastmix_data.stream.loader import direct_slots

W = {"code": 0.6, "web": 0.4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_code_web_sources(tmp_path_factory.mktemp("direct"))


def _keys(batches) -> list:
    out = []
    for b in batches:
        ids = tuple(tuple(x.tolist()) for x in b["input_ids"]) if "input_ids" in b else None
        out.append((*batch_key(b, "epoch"), b.get("text"), ids))
    return out


def _children() -> set[int]:
    """Pids of this process's live descendants (its DataLoader workers)."""
    return {p for p in descendants(os.getpid())[1:] if alive(p)}


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_the_direct_path_serves_what_num_workers_0_serves_to_the_end(data, workers):
    """Equal batches, texts and ids for 1, 2 and 4 workers, to the stream's end (a budget of 13
    batches and a bit), and no batch came through the DataLoader."""
    kw = {"batch_size": 5, "seed": 7, "max_items": 5 * 13 + 3}
    ref = _keys(MixtureStream(data, W, **kw))
    assert len(ref) == 13
    stream = MixtureStream(data, W, **kw)
    loader = stream.loader(num_workers=workers, prefetch_factor=2)
    assert _keys(loader) == ref
    assert (loader.transport, loader.items_delivered, loader.spilled) == ("direct", 0, 0)
    assert stream.state_dict()["next_batch"] == 13
    stream.close()


def test_resume_mid_stream_with_a_fresh_loader(data):
    ref = _keys(b for _, b in zip(range(30), MixtureStream(data, W, batch_size=4, seed=2)))
    stream = MixtureStream(data, W, batch_size=4, seed=2)
    it = iter(stream.loader(num_workers=2, prefetch_factor=3))
    first = _keys(next(it) for _ in range(11))
    state = stream.state_dict()
    del it
    again = MixtureStream(data, W, batch_size=4, seed=2)
    again.load_state_dict(state)
    rest = _keys(b for _, b in zip(range(19), again.loader(num_workers=2, prefetch_factor=3)))
    assert first + rest == ref
    stream.close()
    again.close()


def test_early_break_stops_the_workers_at_once(data):
    """The iterator's end sets the rings' closed flag: the workers return (no DataLoader shutdown
    wait of 5 s and no terminate); they are gone well before that."""
    before = _children()
    stream = MixtureStream(data, W, batch_size=4, seed=1)  # endless: repeat
    loader = stream.loader(num_workers=2, prefetch_factor=2)
    it = iter(loader)
    for _ in range(5):
        next(it)
    workers = _children() - before
    assert len(workers) == 2
    time.sleep(0.5)  # the workers fill their rings and wait for a free slot
    t0 = time.monotonic()
    del it  # as `break` does
    while workers & _children() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not workers & _children(), "the workers were still alive 10 s after the iterator was dropped"
    assert time.monotonic() - t0 < 3.0  # generous: the DataLoader alone would wait 5 s, then terminate
    stream.close()


def _rings_header(directory: str) -> list[tuple[int, int]]:
    """(acknowledged, written) of each ring file in ``directory`` (direct_ring's header)."""
    out = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("ring-") and not name.endswith(".spill"):
            with open(os.path.join(directory, name), "rb") as f:
                out.append(tuple(np.frombuffer(f.read(16), dtype="<i8").tolist()))
    return out


def test_a_full_ring_holds_the_worker_and_loses_nothing(data):
    """A worker is at most S = max(prefetch_factor + 2, 16) batches ahead of what the training
    process took (and, once full, waits until half of it is free): a loop that pauses finds its
    rings full and the workers held, then every batch is served in order."""
    ref = _keys(b for _, b in zip(range(80), MixtureStream(data, W, batch_size=3, seed=5)))
    stream = MixtureStream(data, W, batch_size=3, seed=5)
    loader = stream.loader(num_workers=2, prefetch_factor=20)
    slots = 20 + 2
    assert direct_slots(20) == slots and direct_slots(2) == 16
    got = []
    it = iter(loader)
    for i in range(80):
        got.append(next(it))
        if i in (3, 50):
            time.sleep(1.0)  # the workers run ahead until their rings are full
            held = _rings_header(loader.ring.directory)
            assert all(slots // 2 < written - acked <= slots for acked, written in held), held
            time.sleep(0.5)
            assert _rings_header(loader.ring.directory) == held  # nothing more written meanwhile
    assert _keys(got) == ref
    del it
    stream.close()


def test_batches_larger_than_a_slot_come_through_spill_files(data):
    ref = _keys(b for _, b in zip(range(25), MixtureStream(data, W, batch_size=6, seed=3)))
    stream = MixtureStream(data, W, batch_size=6, seed=3)
    loader = stream.loader(num_workers=2, prefetch_factor=2)
    loader.slot_bytes = 4096  # most batches of 6 texts and ids are larger
    it = iter(loader)
    assert _keys(next(it) for _ in range(25)) == ref
    del it
    assert loader.spilled > 0 and loader.items_delivered == 0
    assert not [n for n in os.listdir(loader.ring.directory) if n.endswith(".spill")]  # read, removed
    stream.close()


_FULL_SHM = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from conformance import batch_key
    from fastmix_data import MixtureStream
    from fastmix_data.stream.batch_ring import temp_spill_directory
    keys = lambda bs: [(*batch_key(b, "epoch"), b.get("text")) for b in bs]
    kw = dict(batch_size=64, seed=9)
    ref = keys(b for _, b in zip(range(30), MixtureStream({sources!r}, {weights!r}, **kw)))
    stream = MixtureStream({sources!r}, {weights!r}, **kw)
    loader = stream.loader(num_workers=2, prefetch_factor=2)
    it = iter(loader)
    got = keys(next(it) for _ in range(30))
    del it
    twin = temp_spill_directory(loader.ring.directory)
    left = os.listdir(twin)
    stream.close()
    print(json.dumps({{"equal": got == ref, "transport": loader.transport, "spilled": loader.spilled,
                      "ring_dir": loader.ring.directory, "twin": twin, "left": left,
                      "twin_gone": not os.path.exists(twin)}}))
    """
)


def test_with_shared_memory_full_batches_are_spilled_to_the_temp_dir(data, tmp_path):
    """A 16 KiB tmpfs as FASTMIX_DATA_SHM (mounted in a user and mount namespace of its own): the
    rings' headers fit (2 x 4 KiB); a batch of 64 texts does not (> 8 KiB), so no slot can be backed
    (posix_fallocate fails) and no spill file can be written there: every batch comes through a
    spill file in a directory of the ring directory's name in the temp directory; nothing is lost."""
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    tmp.mkdir()
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user and mount namespaces here to mount a small tmpfs")
    script = tmp_path / "full_shm.py"
    script.write_text(_FULL_SHM.format(tests=os.path.dirname(__file__), sources=data, weights=W))
    env = dict(os.environ, FASTMIX_DATA_SHM=str(shm), TMPDIR=str(tmp))
    cmd = f"mount -t tmpfs -o size=16k tmpfs {shm} && exec {sys.executable} {script}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert out["equal"] and out["transport"] == "direct"
    assert out["ring_dir"].startswith(str(shm)) and out["twin"].startswith(str(tmp))
    assert out["spilled"] >= 30 and out["left"] == []  # every batch served; the files read and removed
    assert out["twin_gone"]  # the temp directory's spill directory went with stream.close()


def _failing_tokenizer(text: str) -> list[int]:
    info = torch.utils.data.get_worker_info()
    if info is not None and info.id == 1:
        raise ValueError(f"tokenizer refused a text in worker {info.id}")
    return list(text.encode()[:50])


def _killing_tokenizer(text: str) -> list[int]:
    info = torch.utils.data.get_worker_info()
    if info is not None and info.id == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return list(text.encode()[:50])


def test_a_workers_exception_reaches_the_training_loop_with_its_message(data):
    """Worker 1 raises while worker 0 keeps writing (an endless stream): its exception, message and
    type, is raised in the training loop (the DataLoader delivers it once worker 0 returned)."""
    stream = MixtureStream(data, W, batch_size=2, seq_len=16, seed=1, tokenizer=_failing_tokenizer)
    loader = stream.loader(num_workers=2, prefetch_factor=2)
    with pytest.raises(ValueError, match="tokenizer refused a text in worker 1"):
        for _ in loader:
            pass
    assert loader.transport == "direct"
    stream.close()


def test_a_killed_worker_raises(data):
    before = _children()
    stream = MixtureStream(data, W, batch_size=2, seq_len=16, seed=1, tokenizer=_killing_tokenizer)
    loader = stream.loader(num_workers=2, prefetch_factor=2)
    with pytest.raises(RuntimeError, match="DataLoader worker .* (killed by signal|exited unexpectedly)"):
        for _ in loader:
            pass
    deadline = time.monotonic() + 30
    while _children() - before and time.monotonic() < deadline:  # the other worker is stopped too
        time.sleep(0.05)
    assert not _children() - before
    stream.close()


_ORPHAN = textwrap.dedent(
    """
    import os, sys, time
    from fastmix_data import MixtureStream
    stream = MixtureStream({sources!r}, {weights!r}, batch_size=4, seed=1)
    it = iter(stream.loader(num_workers=2, prefetch_factor=2))
    next(it)
    kids = set()
    for task in os.listdir(f"/proc/{{os.getpid()}}/task"):
        kids.update(open(f"/proc/{{os.getpid()}}/task/{{task}}/children").read().split())
    print(" ".join(sorted(kids)), flush=True)
    time.sleep(600)
    """
)


def test_workers_return_when_the_training_process_is_killed(data, tmp_path):
    """A training process killed with SIGKILL sets no flag: its workers see their parent gone."""
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN.format(sources=data, weights=W))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(0.5)
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in workers)
    finally:
        proc.kill()
        proc.stdout.close()


def test_persistent_workers_after_an_early_break(data):
    """An iteration left early (its iterator still referenced) then a new one: the first's workers
    are told to return before the second starts; the second serves from the start again."""
    kw = {"batch_size": 4, "seed": 6, "max_items": 4 * 12}
    ref = _keys(MixtureStream(data, W, **kw))
    stream = MixtureStream(data, W, **kw)
    loader = stream.loader(num_workers=2, prefetch_factor=2, persistent_workers=True)
    first = iter(loader)
    assert _keys(next(first) for _ in range(3)) == ref[:3]
    stream.load_state_dict(MixtureStream(data, W, **kw).state_dict())  # start over
    assert _keys(loader) == ref  # `first` is still alive here
    assert (loader.transport, loader.items_delivered) == ("direct", 0)
    del first
    stream.close()


_UNOPENED = textwrap.dedent(
    """
    import os, torch
    from fastmix_data import MixtureStream
    from fastmix_data.stream import direct_ring

    def lose_ring(worker_id):  # worker 1's ring file removed before its stream opens it
        if worker_id == 1:
            directory, name = torch.utils.data.get_worker_info().dataset.worker_output.direct
            os.unlink(direct_ring.ring_path(directory, name, 1))

    stream = MixtureStream({sources!r}, {weights!r}, batch_size=4, seed=1)
    loader = stream.loader(num_workers=2, prefetch_factor=2, worker_init_fn=lose_ring)
    try:
        for _ in loader:
            pass
    except Exception as exc:
        print("RAISED", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", loader.transport)
    """
)


def test_a_worker_that_cannot_open_its_ring_raises_instead_of_hanging(data, tmp_path):
    """Worker 1 cannot open its ring (removed by its worker_init_fn) while worker 0 writes an
    endless stream: the training loop raises the worker's error (it would wait for batch 1 forever
    without the worker's marker file). In a subprocess, so that a hang fails the test."""
    script = tmp_path / "unopened.py"
    script.write_text(_UNOPENED.format(sources=data, weights=W))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "RAISED FileNotFoundError" in done.stdout, done.stdout + done.stderr
    assert "direct" in done.stdout


_LEFT_OPEN = textwrap.dedent(
    """
    import os
    from fastmix_data import MixtureStream
    stream = MixtureStream({sources!r}, {weights!r}, batch_size=4, seed=1)
    it = iter(stream.loader(num_workers=2, prefetch_factor=2))
    for _ in range(3):
        next(it)
    kids = set()
    for task in os.listdir(f"/proc/{{os.getpid()}}/task"):
        kids.update(open(f"/proc/{{os.getpid()}}/task/{{task}}/children").read().split())
    print("PIDS", " ".join(sorted(kids)), flush=True)
    # the script ends with the iteration never closed: it is finalised at interpreter exit
    """
)


def test_an_iteration_left_open_at_exit_ends_quietly(data, tmp_path):
    """A training script that leaves its loop (or never finishes the iteration) and exits: no
    traceback at exit from the iteration's clean-up, and the workers are gone soon after."""
    script = tmp_path / "left_open.py"
    script.write_text(_LEFT_OPEN.format(sources=data, weights=W))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    pids = [int(p) for p in done.stdout.split("PIDS", 1)[1].split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def _slot_batch(i: int) -> dict:
    """Batch i of `test_the_record_carries_index_and_version_and_descriptors_are_reused_only_when_equal`:
    two shapes; batches 5 and 6 (of the same shape) also carry the same values of their own."""
    rows = 3 if i in (1, 3, 8) else 2
    batch = {"_meta": np.arange(5 * rows, dtype=np.int64).reshape(5, rows) + i,
             "tokens": (np.arange(rows * 6, dtype=np.uint16) + 1000 * i).reshape(rows, 6),
             "batch_index": 10 + i, "weight_version": i // 3}  # fmt: skip
    if i in (5, 6):
        batch["note"] = [7, {"k": 7}]
    return batch


def test_the_record_carries_index_and_version_and_descriptors_are_reused_only_when_equal(tmp_path):
    """A slot's descriptor leaves the batch index and weight version to the slot's record, and the
    training process unpickles it only when its bytes differ from the previous slot's without values
    of its own: batches whose shapes change, some with values of their own, come out as sent
    (keys in the same order, values not shared between batches), and unsigned arrays as int64 when
    asked to widen."""
    rings = DirectRings(str(tmp_path / "rings"), "t", workers=1, slots=4)
    ring = rings.rings[0]
    writer = DirectWriter(ring.path, rings.fifo)
    got = []
    try:
        for i in range(9):
            assert writer.put(_slot_batch(i))
            got.append(ring.take(widen=i % 4 == 1))
        writer.finish(DONE)
    finally:
        rings.release()
    for i, batch in enumerate(got):
        want = _slot_batch(i)
        assert list(batch) == ["batch_index", "weight_version", *(["note"] if i in (5, 6) else []), "_meta", "tokens"]
        assert (batch["batch_index"], batch["weight_version"], batch.get("note")) == (10 + i, i // 3, want.get("note"))
        assert batch["_meta"].dtype == np.int64 and np.array_equal(batch["_meta"], want["_meta"])
        assert batch["tokens"].dtype == (np.int64 if i % 4 == 1 else np.uint16)
        assert np.array_equal(batch["tokens"], want["tokens"]), i
    got[5]["note"][1]["k"] = "changed"
    assert got[6]["note"] == [7, {"k": 7}]
