"""`Storage`: remote reads through the node-local cache, checked against the indexed identity.

A :class:`Storage` is the picklable handle a source carries to its DataLoader workers: the fsspec
options (never shown), the retry policy, the shard cache (directory and byte budget) and the
prefetch distance. :class:`ShardFiles` is what a format reader sees: bytes of a shard by path,
whole or as byte ranges, local or remote alike.

Every download checks the object's size and version against the index and refuses an object that
differs (:class:`ShardChangedError`, naming the shard): the same rule as a local file whose size
changed. Range reads from S3 are checked on the GETs' own answers (``Content-Range`` gives the size,
the ETag / version id header the version), with no extra request, and so are whole-object S3
downloads through obstore (a DataLoader worker's, :mod:`fastmix_data.storage.s3_get`); other
whole-object downloads and other stores ask first (one HEAD). A cached copy is keyed by (URL, size, version, ranges), so it is
always the indexed version. A read may span several cache entries of one object
(:meth:`Storage.read_parts`: a Parquet read is its footer's entry and one entry per row group), so
that every reader of a row group, whichever others it reads with it, shares one copy on the node;
the missing entries of one read are downloaded together (:meth:`Storage.fetch_parts`: touching
ranges merged into one GET, all GETs at once). With ``verify="sha256"`` the sha256 of every whole-object download is
checked against the index too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastmix_data.errors import SourceError
from fastmix_data.storage.cache import Pin, ShardCache, entry_key, parse_size
from fastmix_data.storage.fs import ObjectInfo, RemoteFS
from fastmix_data.storage.retry import RemoteError, RetryPolicy
from fastmix_data.storage.urls import is_url, redact

MIN_PREFETCH = 4096  # a plain int below this is the old count of reads ahead: refused (a unit string is not)
DEFAULT_PREFETCH = "128MB"  # bytes of this process's coming remote reads, per source, fetched ahead


class ShardChangedError(SourceError):
    """A remote shard's size or version differs from the index."""


@dataclass(frozen=True)
class Expected:
    """The indexed identity of a remote shard: bytes, version (ETag / version id) and, when it was
    computed, sha256 (``""`` otherwise)."""

    size: int
    version: str
    sha256: str = ""


class RangeFile:
    """A read-only file over some byte ranges of an object, held in memory (what pyarrow reads
    Parquet column chunks from). Reads outside the ranges go to ``fallback(offset, length)``.

    Args:
        size: the object's size in bytes.
        ranges: ``[(offset, length)]`` sorted, non-overlapping.
        data: the ranges' bytes concatenated.
        fallback: fetches bytes not in ``data`` (counted in ``fallback_bytes``).
    """

    def __init__(self, size: int, ranges: Sequence[tuple[int, int]], data: bytes, fallback=None):
        self.size = int(size)
        self.pos = 0
        self.closed = False
        self.fallback = fallback
        self.fallback_bytes = 0
        self._parts: list[tuple[int, int, int]] = []  # (offset, length, position in data)
        at = 0
        for offset, length in ranges:
            self._parts.append((int(offset), int(length), at))
            at += int(length)
        self._data = memoryview(data)

    @classmethod
    def from_pieces(cls, size: int, pieces: Sequence[tuple[int, bytes]], fallback=None) -> RangeFile:
        """A RangeFile over ``pieces`` ``[(offset, bytes)]`` (any order, non-overlapping); touching
        pieces become one range, so a read across them is served from memory."""
        ranges: list[list[int]] = []
        chunks: list[bytes] = []
        for offset, data in sorted(pieces, key=lambda p: p[0]):
            if ranges and offset == ranges[-1][0] + ranges[-1][1]:
                ranges[-1][1] += len(data)
            else:
                ranges.append([offset, len(data)])
            chunks.append(data)
        return cls(size, [(o, n) for o, n in ranges], b"".join(chunks), fallback)

    # the file protocol pyarrow's PythonFile uses
    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.size + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = max(0, min(n, self.size - self.pos))
        out = self._slice(self.pos, n)
        self.pos += n
        return out

    def sparse_buffer(self):
        """The object as one in-memory buffer of ``size`` bytes: the fetched ranges in place, zeros
        elsewhere (for small objects: a reader then decodes from memory without per-read calls)."""
        import pyarrow as pa

        buf = bytearray(self.size)
        for offset, length, at in self._parts:
            buf[offset : offset + length] = self._data[at : at + length]
        return pa.py_buffer(buf)

    def _slice(self, start: int, n: int) -> bytes:
        for offset, length, at in self._parts:
            if offset <= start and start + n <= offset + length:
                return bytes(self._data[at + start - offset : at + start - offset + n])
        if self.fallback is None:
            raise OSError(f"bytes [{start}, {start + n}) were not fetched")
        self.fallback_bytes += n
        return self.fallback(start, n)


class Storage:
    """Remote I/O settings of a source, picklable.

    Args:
        cache_dir: the shard cache directory (default :func:`~fastmix_data.storage.cache.default_shard_cache_dir`);
            ``False`` reads remote shards straight into memory without a local copy (streamed).
        cache_limit: the cache's byte budget (int or ``"20GB"``; default 80 % of the free space).
        storage_options: fsspec options (credentials, endpoint, ...). Never logged or stored.
        retry: retry policy for remote calls.
        prefetch: bytes per source (int or ``"128MB"``) of the remote reads this process's plan
            makes after its current block that the stream fetches ahead, all at once (at least the
            next read; at most a quarter of the cache budget); default 128 MB, 0 disables prefetch.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike | bool | None = None,
        cache_limit: int | str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        prefetch: int | str = DEFAULT_PREFETCH,
    ):
        self.remote = RemoteFS(storage_options, retry)
        self.cache = None if cache_dir is False else ShardCache(None if cache_dir in (None, True) else cache_dir, cache_limit)
        try:
            self.prefetch = 0 if prefetch in (0, "0") else parse_size(prefetch)
        except ValueError as exc:
            raise ValueError(f"prefetch must be a byte size such as '128MB' or 0 (no prefetch): {exc}") from None
        if isinstance(prefetch, int) and 0 < prefetch < MIN_PREFETCH:
            raise ValueError(
                f"prefetch={prefetch!r}: prefetch is a byte size (it was a count of reads ahead before); write "
                f"e.g. '128MB', a size with its unit ('1B': just the next read), or 0 for no prefetch"
            )
        self.streamed_bytes = 0  # bytes read without the cache (cache_dir=False), this process

    def __repr__(self) -> str:
        where = "no cache" if self.cache is None else f"cache {self.cache.directory}"
        return f"Storage({where}, prefetch={self.prefetch:,} B, {self.remote!r})"

    def prefetch_bytes(self) -> int:
        """Bytes of coming reads per source to fetch ahead: ``prefetch``, at most a quarter of the
        cache budget (0 without a cache)."""
        if self.cache is None or not self.prefetch:
            return 0
        return min(self.prefetch, self.cache.budget() // 4)

    # ------------------------------------------------------------------ identity
    def stat(self, url: str) -> ObjectInfo:
        return self.remote.stat(url)

    def check(self, url: str, expect: Expected, where: str = "") -> None:
        """Refuse ``url`` when its size or version now differs from ``expect`` (one HEAD).

        Raises:
            ShardChangedError: naming the shard, the indexed and current size/version.
        """
        _refuse_changed(self.stat(url), expect, where)

    # ------------------------------------------------------------------ reads
    def fetch(self, url: str, expect: Expected, where: str = "") -> Pin:
        """The whole object's bytes pinned in the cache, downloaded when missing (one download per
        node; the object's identity checked with it). Close the pin once read. Byte ranges:
        :meth:`fetch_parts`."""
        if self.cache is None:
            raise ValueError("fetch needs a cache; this Storage streams (cache_dir=False)")

        def fill(part: str) -> None:
            # the identity from the GET's own answer, before its body; another client: a HEAD first
            if not self.remote.download_identified(url, part, lambda now: _refuse_changed(now, expect, where)):
                self.check(url, expect, where)
                self.remote.download(url, part)
            if expect.sha256:
                self._verify_sha256(part, url, expect, where)

        return self.cache.get(entry_key(url, expect.size, expect.version, None), expect.size, fill)

    def fetch_parts(
        self, url: str, expect: Expected, parts: Sequence[Sequence[tuple[int, int]]], where: str = "",
        wait: bool = True,
    ) -> list[Pin | None]:  # fmt: skip
        """One pinned cache entry per part (a list of byte ranges of the object), the missing ones
        downloaded together: their ranges, merged where they touch, one GET each, all at once;
        the identity checked on the GETs' answers (S3) or with one HEAD (other stores). Entries
        another process is downloading are waited for (one download per node), or with ``wait``
        False left to it (None in their place: prefetch). Close the pins."""
        if self.cache is None:
            raise ValueError("fetch needs a cache; this Storage streams (cache_dir=False)")
        parts = [merge_ranges(p) for p in parts]
        entries = [(entry_key(url, expect.size, expect.version, p), sum(n for _, n in p)) for p in parts]
        fill = lambda idx: self._download_parts(url, expect, [parts[i] for i in idx], where)  # noqa: E731
        return self.cache.get_many(entries, fill, wait=wait)

    def _download_parts(self, url: str, expect: Expected, parts: list[list[tuple[int, int]]], where: str) -> list[bytes]:
        runs = merge_ranges([r for p in parts for r in p])
        pieces = dict(zip((o for o, _ in runs), self._read_checked(url, expect, runs, where)))
        out = []
        for ranges in parts:
            out.append(b"".join(_cut(runs, pieces, offset, length) for offset, length in ranges))
        return out

    def _read_checked(self, url: str, expect: Expected, ranges: list[tuple[int, int]], where: str) -> list[bytes]:
        """Byte ranges of the object, refused (ShardChangedError) unless it is the indexed version:
        checked on the answers themselves where the store reports size and version with them (S3),
        else by one HEAD first."""
        try:
            got = self.remote.read_ranges_identified(url, ranges)
        except RemoteError as exc:
            if exc.status == 416:  # a range past the end: the object shrank
                raise ShardChangedError(
                    f"{where or 'shard ' + redact(url)} changed since it was indexed (the indexed byte ranges are "
                    f"past its end now; {expect.size} bytes then); re-open the source to re-index it"
                ) from exc
            raise
        if got is None or any(info.size < 0 for _, info in got):
            self.check(url, expect, where)
            return self.remote.read_ranges(url, ranges) if got is None else [data for data, _ in got]
        for _, info in got:
            _refuse_changed(info, expect, where)
        return [data for data, _ in got]

    def read_bytes(self, url: str, expect: Expected, where: str = "") -> bytes:
        """The whole object, through the cache (or streamed when the cache is off)."""
        if self.cache is None:
            self.check(url, expect, where)
            data = self.remote.read(url)
            self.streamed_bytes += len(data)
            if len(data) != expect.size:
                raise ShardChangedError(f"{where or redact(url)} returned {len(data)} bytes, the index says {expect.size}")
            return data
        with self.fetch(url, expect, where) as pin:
            return pin.read()

    def read_parts(
        self, url: str, expect: Expected, parts: Sequence[Sequence[tuple[int, int]]], where: str = ""
    ) -> RangeFile:
        """A :class:`RangeFile` over several lists of byte ranges of the object, each its own cache
        entry (:meth:`fetch_parts`: hits pinned and read, misses downloaded together). Without a
        cache, every range is fetched in one round."""
        parts = [merge_ranges(p) for p in parts]

        def fallback(offset: int, length: int) -> bytes:
            return self.remote.read(url, offset, offset + length)

        if self.cache is None:
            ranges = merge_ranges([r for p in parts for r in p])
            data = b"".join(self._read_checked(url, expect, ranges, where))
            self.streamed_bytes += len(data)
            return RangeFile(expect.size, ranges, data, fallback)
        datas = [_read_pin(pin) for pin in self.fetch_parts(url, expect, parts, where)]
        pieces = []
        for ranges, data in zip(parts, datas):
            at = 0
            for offset, length in ranges:
                pieces.append((offset, data[at : at + length]))
                at += length
        return RangeFile.from_pieces(expect.size, _distinct(pieces), fallback)

    @contextlib.contextmanager
    def local_file(self, url: str, expect: Expected, where: str = "") -> Iterator[str]:
        """A local path holding the whole object while the block runs (the cache entry, pinned;
        a temporary file when the cache is off)."""
        if self.cache is not None:
            with self.fetch(url, expect, where) as pin:
                yield pin.path
            return
        fd, tmp = tempfile.mkstemp(prefix=".fastmix-shard-")
        os.close(fd)
        try:
            self.check(url, expect, where)
            self.remote.download(url, tmp)
            yield tmp
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    @staticmethod
    def _verify_sha256(path: str, url: str, expect: Expected, where: str) -> None:
        from fastmix_data.io import sha256_file

        got = sha256_file(path)
        if got != expect.sha256:
            raise ShardChangedError(
                f"{where or redact(url)} has sha256 {got[:16]}… but the index says {expect.sha256[:16]}…; "
                "re-open the source to re-index it"
            )

    def fetched_bytes(self) -> int:
        """Bytes this process downloaded from stores (cache fills and streamed reads)."""
        return self.streamed_bytes + (self.cache.downloaded_bytes if self.cache is not None else 0)


def _refuse_changed(now: ObjectInfo, expect: Expected, where: str) -> None:
    if now.size != expect.size or (expect.version and now.version and now.version != expect.version):
        raise ShardChangedError(
            f"{where or 'shard ' + redact(now.url)} changed since it was indexed ({now.size} bytes, "
            f"version {now.version!r} now; {expect.size} bytes, version {expect.version!r} then); "
            "re-open the source to re-index it"
        )


def _cut(runs: list[tuple[int, int]], pieces: dict[int, bytes], offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) out of the fetched ``runs`` (merged ranges; ``pieces``: their
    bytes by start offset)."""
    for start, n in runs:
        if start <= offset and offset + length <= start + n:
            return pieces[start][offset - start : offset - start + length]
    raise AssertionError(f"range ({offset}, {length}) is in no fetched run")


def _read_pin(pin: Pin) -> bytes:
    with pin:
        return pin.read()


def _distinct(pieces: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """``pieces`` without repeats (two parts holding the same range, e.g. the same footer)."""
    seen: dict[tuple[int, int], bytes] = {}
    for offset, data in pieces:
        seen.setdefault((offset, len(data)), data)
    return [(offset, data) for (offset, _), data in seen.items()]


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[(offset, length)]`` sorted, with touching or overlapping ranges merged."""
    out: list[list[int]] = []
    for offset, length in sorted((int(o), int(n)) for o, n in ranges if int(n) > 0):
        if out and offset <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(o, n) for o, n in out]


class ShardFiles:
    """The bytes of a source's shards, for its format reader: local files are read directly, remote
    ones through :class:`Storage` and checked against their indexed identity.

    Args:
        storage: remote settings (None: the source is local only).
        expected: URL -> :class:`Expected` for every remote shard of the source.
        layouts: path -> Parquet layout from the index (see :func:`fastmix_data.sources.parquet.layout_of`).
    """

    def __init__(
        self,
        storage: Storage | None = None,
        expected: Mapping[str, Expected] | None = None,
        layouts: Mapping[str, dict] | None = None,
    ):
        self.storage = storage
        self.expected = dict(expected or {})
        self.layouts = dict(layouts or {})

    def __repr__(self) -> str:
        return f"ShardFiles({len(self.expected)} remote shards, {self.storage!r})"

    def is_remote(self, path: str) -> bool:
        return is_url(path)

    def _remote(self, path: str) -> tuple[Storage, Expected]:
        if self.storage is None:
            raise SourceError(f"{redact(path)} is remote but the source has no storage settings; re-open it")
        try:
            return self.storage, self.expected[path]
        except KeyError:
            raise SourceError(f"{redact(path)} is not an indexed shard of this source; re-open it") from None

    def read_bytes(self, path: str) -> bytes:
        """A shard's bytes."""
        if not is_url(path):
            with open(path, "rb") as f:
                return f.read()
        storage, expect = self._remote(path)
        return storage.read_bytes(path, expect)

    def read_parts(self, path: str, parts: Sequence[Sequence[tuple[int, int]]]) -> RangeFile:
        """A remote shard's byte ranges as a file object, one cache entry per part (see
        :meth:`Storage.read_parts`)."""
        storage, expect = self._remote(path)
        return storage.read_parts(path, expect, parts)

    def cache_request(self, path: str, ranges: Sequence[tuple[int, int]] | None) -> tuple[str, int]:
        """(cache key, bytes) of a remote shard's bytes (``ranges`` None: whole), as the reads above
        will ask for them."""
        storage, expect = self._remote(path)
        if storage.cache is None:
            raise ValueError("prefetch needs the shard cache")
        merged = None if ranges is None else merge_ranges(ranges)
        size = expect.size if merged is None else sum(n for _, n in merged)
        return entry_key(path, expect.size, expect.version, merged), size

    def fetch_job(self, path: str, parts: Sequence[Sequence[tuple[int, int]] | None]) -> Callable[[], list[Pin | None]]:
        """A job fetching these cache entries of a remote shard (a part None: the whole object; else
        byte ranges, fetched together, see :meth:`Storage.fetch_parts`) and returning their pins in
        order (None for byte ranges another process is downloading: the stream's read waits for
        those): what the prefetcher runs ahead of the stream."""
        storage, expect = self._remote(path)
        ranged = [p for p in parts if p is not None]

        def job() -> list[Pin | None]:
            pins = iter(storage.fetch_parts(path, expect, ranged, wait=False) if ranged else [])
            return [storage.fetch(path, expect) if p is None else next(pins) for p in parts]

        return job

    @contextlib.contextmanager
    def local_file(self, path: str) -> Iterator[str]:
        """A local path with the shard's bytes while the block runs."""
        if not is_url(path):
            yield path
            return
        storage, expect = self._remote(path)
        with storage.local_file(path, expect) as local:
            yield local
