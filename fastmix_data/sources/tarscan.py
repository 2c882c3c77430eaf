"""A fast, strict scanner of uncompressed tar archives held in memory.

:mod:`tarfile` costs ~70 us per member (two header objects per member for WebDataset's PAX
headers), which dominated WebDataset shard reads. This scanner slices headers directly (~5 us per
member) and is stricter than :mod:`tarfile`, which silently stops at a damaged header: every header
checksum is verified, every member must lie inside the data, and the archive must end with its
zero-block end marker followed by nothing but zero padding.

Supported: POSIX ustar (with the name prefix field), PAX extended headers (``path``, ``size``), GNU
long names. Non-regular members (directories, links, devices) are skipped, as WebDataset does.
"""

from __future__ import annotations

import struct

import numpy as np

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_SKIP_DATA = (b"1", b"2", b"3", b"4", b"5", b"6", b"g", b"K")


class TarFormatError(ValueError):
    """The bytes are not a well-formed tar archive (message says where and why)."""


def _number(field: bytes, what: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 encoding for large values
        if field[0] == 0xFF:
            raise TarFormatError(f"negative {what} in header at byte {offset}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"invalid {what} {bytes(field)!r} in header at byte {offset}") from None


def _verify_checksums(data: bytes, offsets: list[int]) -> None:
    """Check every header's checksum at once (a per-header Python ``sum`` would cost ~4 us each)."""
    if not offsets:
        return
    whole = len(data) // BLOCK * BLOCK  # headers sit on block boundaries
    blocks = np.frombuffer(data, np.uint8, count=whole).reshape(-1, BLOCK)[np.asarray(offsets) // BLOCK]
    # The checksum is the byte sum of the header with its own 8-byte field read as spaces.
    sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    for i in np.flatnonzero(sums != [_number(data[o + 148 : o + 156], "checksum", o) for o in offsets]):
        offset = offsets[i]
        header = data[offset : offset + BLOCK]
        signed = 256 + sum(struct.unpack_from("148b8x356b", header))  # some old writers
        if signed != _number(header[148:156], "checksum", offset):
            raise TarFormatError(f"bad header checksum at byte {offset} (damaged archive)")


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes, offset: int) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"invalid PAX record in header at byte {offset}") from None
        if space < 0 or length <= 0 or pos + length > len(data):
            raise TarFormatError(f"invalid PAX record in header at byte {offset}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def iter_members(data: bytes) -> list[tuple[str, bytes]]:
    """``(name, content)`` of every regular member, in archive order.

    Raises:
        TarFormatError: bad checksum or field, member past the end, unsupported member type, or a
            missing / non-zero end of archive (truncated or damaged file).
    """
    headers: list[int] = []
    members: list[tuple[str, bytes]] = []
    try:
        _scan(data, headers, members)
    except TarFormatError:
        _verify_checksums(data, headers)  # a damaged header explains the failure best
        raise
    _verify_checksums(data, headers)
    return members


def _scan(data: bytes, headers: list[int], members: list[tuple[str, bytes]]) -> None:
    end = len(data)
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        if pos + BLOCK > end:
            raise TarFormatError(f"archive ends at byte {end} without its end-of-archive marker (truncated)")
        header = data[pos : pos + BLOCK]
        if header.count(0) == BLOCK:
            tail = data[pos:]
            if len(tail) < 2 * BLOCK or tail.count(0) != len(tail):
                raise TarFormatError(f"damaged or truncated archive after the zero block at byte {pos}")
            return
        headers.append(pos)
        kind = header[156:157]
        if "size" in pax and kind in _REGULAR:
            size = (
                _number(pax["size"].encode(), "PAX size", pos)
                if not pax["size"].isdigit()
                else int(pax["size"])
            )
        else:
            size = _number(header[124:136], "size", pos)
        start = pos + BLOCK
        if start + size > end:
            raise TarFormatError(
                f"member at byte {pos} needs {size} bytes but the archive ends at {end} (truncated)"
            )
        pos = start + _padded(size)
        if kind in _REGULAR:
            name = pax.get("path") or long_name
            if name is None:
                name = _name(header[0:100])
                if header[257:263] == b"ustar\x00":
                    prefix = _name(header[345:500])
                    name = f"{prefix}/{name}" if prefix else name
            long_name, pax = None, {}
            members.append((name, data[start : start + size]))
        elif kind == b"x":
            pax = _pax(data[start : start + size], start - BLOCK)
        elif kind == b"L":
            long_name = _name(data[start : start + size])
        elif kind in _SKIP_DATA:
            long_name, pax = (long_name, pax) if kind in (b"g", b"K") else (None, {})
        else:
            raise TarFormatError(f"unsupported tar member type {kind!r} at byte {start - BLOCK}")
