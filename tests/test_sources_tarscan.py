"""The tar scanner agrees with tarfile on valid archives and refuses damaged ones."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from fastmix_data.sources.tarscan import TarFormatError, iter_members
from fastmix_data.sources.webdataset import decode_ids


def _tar(fmt: int, members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """members: (name, content or None, type); content None means a non-regular member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "target"
            info.size = len(content or b"")
            info.mtime = 1_700_000_000.5
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


MEMBERS = [
    ("dir", None, tarfile.DIRTYPE),
    ("dir/k1.txt", b"hello", tarfile.REGTYPE),
    ("dir/k1.npy", b"\x00" * 700, tarfile.REGTYPE),
    ("link", None, tarfile.SYMTYPE),
    ("d/" * 60 + "long.txt", b"long path", tarfile.REGTYPE),
    ("x" * 120 + ".txt", b"long name", tarfile.REGTYPE),
    ("ünïcode.txt", "é".encode(), tarfile.REGTYPE),
    ("empty.txt", b"", tarfile.REGTYPE),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_agrees_with_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if not m[0].startswith("x")]
    data = _tar(fmt, members)
    assert list(iter_members(data)) == _reference(data)


def test_empty_archive():
    assert list(iter_members(_tar(tarfile.PAX_FORMAT, []))) == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],
        lambda d: d[:512],
        lambda d: d[: -1024 * 9 - 512],
        lambda d: d[:512] + b"zz" + d[514:],
        lambda d: d[:1024] + b"junk" + d[1028:],
        lambda d: d + b"trailing garbage",
        lambda d: b"",
    ],
)
def test_damage_is_detected(damage):
    data = _tar(tarfile.PAX_FORMAT, [(f"k{i}.txt", b"x" * 600, tarfile.REGTYPE) for i in range(4)])
    with pytest.raises(TarFormatError):
        list(iter_members(damage(data)))


@pytest.mark.parametrize("dtype", ["<i4", ">i8", "<u2", "|u1", "<i8"])
def test_npy_fast_path_matches_np_load(dtype):
    arr = np.arange(50).astype(dtype)
    buf = io.BytesIO()
    np.save(buf, arr)
    out = decode_ids("npy", buf.getvalue())
    assert out.dtype == np.int64 and out.tolist() == list(range(50))


def test_npy_non_1d_or_float_is_not_ids():
    for arr in (np.zeros((2, 3), np.int32), np.zeros(3, np.float32), np.zeros(0, np.int16)):
        buf = io.BytesIO()
        np.save(buf, arr)
        out = decode_ids("npy", buf.getvalue())
        assert (out is None) if arr.ndim != 1 or arr.dtype.kind == "f" else out.tolist() == []
