"""Decide which columns a source reads, by comparing the cached stats of all its shards.

For text and for ids, the candidates (the user's field, then conventional aliases) are tried in
order; the first one present in the shards is used. It must have the same kind in every shard (else
a schema-mismatch error naming two disagreeing shards) and the right kind (else a type error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastmix_data.errors import SourceError
from fastmix_data.sources.reader import IDS, MISSING, TEXT, Candidate, Columns, ShardReader, ShardStats

_EXPECTED = {TEXT: "text (a string per row)", IDS: "ids (a list of integers per row)"}


def _kinds(stats: Mapping[str, ShardStats], column: str) -> dict[str, str]:
    """Per shard, the kind of ``column``; zero-row shards that lack it are left out (an empty tar
    has no members at all, and a shard without rows has no values to disagree with)."""
    return {
        p: s.columns.get(column, MISSING)
        for p, s in stats.items()
        if s.rows > 0 or column in s.columns
    }


def _all_columns(stats: Mapping[str, ShardStats]) -> list[str]:
    return sorted({c for s in stats.values() for c in s.columns})


def _mismatch(source: str, column: str, by_shard: Mapping[str, str]) -> SourceError:
    paths = list(by_shard)
    first = paths[0]
    other = next(p for p in paths if by_shard[p] != by_shard[first])
    return SourceError(
        f"schema mismatch in source {source!r}: column {column!r} is {by_shard[first]} in {first} but "
        f"{by_shard[other]} in {other}; all shards of a source need the same columns and types "
        "(re-write the odd shards, or split them into another source)"
    )


def _resolve(
    source: str, role: str, cands: Sequence[Candidate], kind: str, stats: Mapping[str, ShardStats]
) -> str | None:
    for cand in cands:
        by_shard = _kinds(stats, cand.name)
        kinds = set(by_shard.values())
        if kinds <= {MISSING}:
            continue
        if cand.lenient and not kinds <= {kind, MISSING}:
            continue
        if len(kinds) > 1:
            raise _mismatch(source, cand.name, by_shard)
        if kinds != {kind}:
            raise SourceError(
                f"column {cand.name!r} of source {source!r} has type {kinds.pop()}, but the {role} "
                f"column must be {_EXPECTED[kind]}; name another column with {role}_field="
            )
        return cand.name
    if any(c.required for c in cands):
        names = " or ".join(repr(c.name) for c in cands)
        raise SourceError(
            f"source {source!r} has no {role} column {names} in any shard; columns present: "
            f"{_all_columns(stats)}. Pass {role}_field= with one of those"
        )
    return None


def resolve_columns(
    source: str, reader: ShardReader, stats: Mapping[str, ShardStats], extra: Sequence[str] = ()
) -> Columns:
    """The columns ``source`` reads, given the stats of every readable shard (in path order).

    Raises:
        SourceError: schema mismatch, wrong column type, unknown column, or no text/ids column.
    """
    text = _resolve(source, "text", reader.text_candidates, TEXT, stats)
    ids = _resolve(source, "ids", reader.ids_candidates, IDS, stats)
    if text is None and ids is None:
        wanted = [c.name for c in (*reader.text_candidates, *reader.ids_candidates)]
        raise SourceError(
            f"source {source!r} has neither a text nor an ids column (looked for {wanted}); columns "
            f"present: {_all_columns(stats)}. Pass text_field= or ids_field= with one of those"
        )
    for name in extra:
        by_shard = _kinds(stats, name)
        if set(by_shard.values()) <= {MISSING}:
            raise SourceError(
                f"source {source!r} has no column {name!r}; columns present: {_all_columns(stats)}"
            )
        if len(set(by_shard.values())) > 1:
            raise _mismatch(source, name, by_shard)
    return Columns(text=text, ids=ids, extra=tuple(extra))


def shard_tokens(stats: ShardStats, columns: Columns) -> int | None:
    """Tokens of a shard: the ids lengths, else UTF-8 bytes plus one EOS per row, else None."""
    # (a zero-row shard may lack the column: it holds no tokens)
    if columns.ids is not None:
        return stats.ids_tokens.get(columns.ids, 0)
    if columns.text is not None:
        return stats.text_bytes.get(columns.text, 0) + stats.rows
    return None
