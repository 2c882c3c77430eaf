"""File-level fault injection for every format (Parquet, WebDataset, MDS, HF datasets).

Each shard file is written by the format's own library, then damaged: truncated in every region
(header, inner boundary, payload, footer / end marker), bit-flipped, emptied to zero bytes, made
unreadable, removed between indexing and reading; a valid zero-row shard is put in the middle. The
documented policy (docs/robustness.md) must hold:

- before indexing, ``on_corrupt="raise"``: a `SourceError` naming the shard; ``"skip"``: the shard is
  left out and listed in ``source.skipped``, every other shard reads exactly as before. A damage
  that loses nothing (a truncated run of padding) may be accepted, but then with every row intact;
- after indexing: reading the shard is a `SourceError` naming it (size, modification time or
  existence changed), and a stream over it serves exactly the batches of an undamaged stream until
  the first batch that needs the shard, then raises;
- a zero-row shard is kept with ``rows=0`` and changes nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from fuzzkit import (
    FORMATS,
    add_empty_shard,
    drop_dac_capabilities,
    flip_bits,
    regions,
    truncate_at,
    write_format,
    write_mds_with_empty_shard,
)
from shardgen import make_docs

from fastmix_data import MixtureStream
from fastmix_data.errors import SourceError
from fastmix_data.sources import open_source

REGIONS = {
    "parquet": ["header", "page", "row-group-boundary", "footer-metadata", "footer-magic"],
    "webdataset": ["header", "member-data", "member-boundary", "end-marker", "end-marker-half"],
    "mds": ["header", "offset-table", "sample-boundary", "sample-data", "last-byte"],
    "hf": ["schema", "schema-boundary", "batch-data", "batch-boundary", "end-marker-half"],
}
CASES = [(fmt, region) for fmt in FORMATS for region in REGIONS[fmt]]
DOCS = make_docs(40, seed=5, prefix="doc")


@pytest.fixture
def clean(tmp_path, streaming_module):
    """Factory: a fresh 4-shard source of ``fmt`` and its rows per shard, read before any damage."""

    def make(fmt: str):
        spec, paths = write_format(fmt, tmp_path / fmt, DOCS)
        src = open_source("s", spec, cache_dir=tmp_path / "cache-clean")
        rows = {s.path: _rows(src, i) for i, s in enumerate(src.shards)}
        return spec, paths, rows

    return make


def _rows(src, i):
    data = src.read_shard(i)
    return (list(data.texts) if data.texts is not None else None, [list(x) for x in data.ids] if data.ids else None)


def _check_policy(spec, victim, rows, cache, allow_intact=False):
    """The open-time policy for a damaged ``victim``: raise names it, skip lists it, the rest intact."""
    try:
        src = open_source("s", spec, cache_dir=cache / "raise")
    except SourceError as exc:
        assert victim in str(exc), str(exc)
    else:  # accepted: only if nothing was lost
        assert allow_intact, "a damaged shard was accepted"
        assert {s.path: _rows(src, i) for i, s in enumerate(src.shards)} == rows
        return "intact"
    src = open_source("s", spec, cache_dir=cache / "skip", on_corrupt="skip")
    assert [p for p, _ in src.skipped] == [victim] and src.skipped[0][1]
    assert [s.path for s in src.shards] == [p for p in rows if p != victim]
    for i, s in enumerate(src.shards):
        assert _rows(src, i) == rows[s.path]
    return "refused"


@pytest.mark.parametrize("fmt,region", CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_truncation_in_every_region(fmt, region, clean, tmp_path):
    spec, paths, rows = clean(fmt)
    victim = paths[1]
    truncate_at(victim, regions(fmt, victim)[region])
    # a cut inside the tar's zero padding after the end marker's first block loses no member
    outcome = _check_policy(spec, victim, rows, tmp_path, allow_intact=(fmt, region) == ("webdataset", "end-marker-half"))
    if (fmt, region) != ("webdataset", "end-marker-half"):
        assert outcome == "refused"


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_byte_shard(fmt, clean, tmp_path):
    spec, paths, rows = clean(fmt)
    truncate_at(paths[2], 0)
    assert _check_policy(spec, paths[2], rows, tmp_path) == "refused"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", range(4))
def test_bit_flips_are_refused_or_change_only_that_shard(fmt, seed, clean, tmp_path):
    """Flips the format can detect (checksums, lengths, offsets, UTF-8, compression) refuse the shard;
    a flip inside an uncompressed payload is data to any reader: the other shards stay intact, the
    shard keeps its row count, and its sha256 in the index records the flipped bytes."""
    spec, paths, rows = clean(fmt)
    victim = paths[1]
    flip_bits(victim, seed=seed * 7919 + len(fmt))
    try:
        src = open_source("s", spec, cache_dir=tmp_path / "raise")
    except SourceError as exc:
        assert victim in str(exc)
        return
    for i, s in enumerate(src.shards):
        if s.path == victim:
            assert src.shards[i].rows == len(rows[victim][0])
        else:
            assert _rows(src, i) == rows[s.path]


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_shard_in_the_middle_is_kept(fmt, tmp_path, streaming_module):
    docs = make_docs(30, seed=2)
    if fmt == "mds":
        spec, paths = write_mds_with_empty_shard(tmp_path / fmt, docs, shards=3, empty_at=1)
        empty = paths[1]
    else:
        spec, paths = write_format(fmt, tmp_path / fmt, docs, shards=3)
        empty = add_empty_shard(fmt, tmp_path / fmt, after=0)
    src = open_source("s", spec)
    assert [s.rows for s in src.shards] == [10, 0, 10, 10] and src.shards[1].path == empty
    assert src.read_shard(1).rows == 0 and src.shards[1].tokens == 0
    texts = [t for i in range(len(src.shards)) for t in (src.read_shard(i).texts or [])]
    assert sorted(texts) == sorted(docs)
    stream = MixtureStream({"s": spec}, {"s": 1.0}, batch_size=5, shuffle=False)
    served = [t for _, b in zip(range(6), stream) for t in b["text"]]
    assert served == docs  # in file order, the empty shard contributes nothing
    stream.close()


# ------------------------------------------------------------------------------------------ after indexing
def _key(batch):
    return (batch["batch_index"], tuple(batch["shard"].tolist()), tuple(batch["item"].tolist()), tuple(batch["text"]))


def _damage(kind: str, fmt: str, victim: str) -> None:
    if kind == "truncate":
        truncate_at(victim, regions(fmt, victim)[REGIONS[fmt][2]])
    elif kind == "bitflip":  # same size: only the modification time tells
        st = os.stat(victim)
        flip_bits(victim, seed=3)
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif kind == "remove":
        os.remove(victim)
    elif kind == "zero-bytes":
        truncate_at(victim, 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["truncate", "bitflip", "remove", "zero-bytes"])
def test_damage_after_indexing_is_named_and_nothing_served_changes(fmt, kind, clean, tmp_path):
    spec, paths, _ = clean(fmt)
    victim = paths[2]
    make = lambda: MixtureStream({"s": spec}, {"s": 1.0}, batch_size=4, seed=9, cache_dir=tmp_path / "c")  # noqa: E731
    reference = [_key(b) for _, b in zip(range(10), make())]  # 40 items: every shard, whole
    stream = make()
    src = stream.sources[0]
    _damage(kind, fmt, victim)
    with pytest.raises(SourceError, match=f"shard {victim} of source 's'"):
        src.read_shard(paths.index(victim))
    served = []
    with pytest.raises(SourceError, match=f"shard {victim} of source 's'"):
        for batch in stream:
            served.append(_key(batch))
    assert served == reference[: len(served)]  # what was served before the damage is the same
    stream.close()


# ------------------------------------------------------------------------------------------ permissions
CHILD = textwrap.dedent(
    """
    import json, os, sys
    from fastmix_data.errors import SourceError
    from fastmix_data.sources import open_source
    results = {}
    for spec, victim, cache in json.loads(sys.argv[1]):
        out = results[victim] = {}
        src = open_source("s", spec, cache_dir=cache + "/a")      # readable: indexed
        os.chmod(victim, 0)
        i = [s.path for s in src.shards].index(victim)
        try:
            src.read_shard(i)
            out["read"] = "read"
        except SourceError as exc:
            out["read"] = str(exc)
        try:
            open_source("s", spec, cache_dir=cache + "/b")
            out["raise"] = "opened"
        except SourceError as exc:
            out["raise"] = str(exc)
        skipped = open_source("s", spec, cache_dir=cache + "/c", on_corrupt="skip")
        out["skipped"] = [p for p, _ in skipped.skipped]
        out["rows"] = [skipped.read_shard(j).rows for j in range(len(skipped.shards))]
    print(json.dumps(results))
    """
)


def test_permission_denied_in_every_format(clean, tmp_path):
    """Run as an unprivileged reader: directly when not root; as root, in a child without the
    DAC-override capabilities (chmod does not deny root otherwise). One child for all formats."""
    preexec = None
    if os.geteuid() == 0:
        try:
            subprocess.run(["true"], preexec_fn=drop_dac_capabilities, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here ({exc}): chmod would not deny a read")
        preexec = drop_dac_capabilities
    cases, expected = [], {}
    for fmt in FORMATS:
        spec, paths, rows = clean(fmt)
        cases.append((spec, paths[1], str(tmp_path / f"perm-{fmt}")))
        expected[paths[1]] = [len(rows[p][0]) for p in paths if p != paths[1]]
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True, preexec_fn=preexec, timeout=300
        )
    finally:
        for _, victim, _ in cases:
            os.chmod(victim, 0o644)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for victim, out in results.items():
        for key in ("read", "raise"):
            assert victim in out[key] and "Permission denied" in out[key], out[key]
        assert out["skipped"] == [victim]
        assert out["rows"] == expected[victim]
