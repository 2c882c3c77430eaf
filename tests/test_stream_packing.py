"""The vectorised packer: rows given as several row groups pack exactly as the same rows in one array."""

import numpy as np
import pytest

from fastmix_data.sources.base import IdRows
from fastmix_data.stream.packing import SHORT_DOCS, pack


def _rows(rng, n, mean):
    lengths = rng.integers(0, 2 * mean, size=n)
    return IdRows.of([rng.integers(0, 60000, size=k).astype(np.uint16) for k in lengths])


def _reference(rows: IdRows, order, eos):
    """Per-row Python: each row of ``order``, then ``eos``; doc_start at every non-empty document."""
    ids, starts = [], []
    for r in order:
        doc = list(rows[r]) + ([] if eos is None else [eos])
        ids += doc
        starts += [True] + [False] * (len(doc) - 1) if doc else []
    return np.array(ids, dtype=np.uint16), np.array(starts, dtype=bool)


@pytest.mark.parametrize("mean", [3, 4 * SHORT_DOCS])  # the short-document gather and the slice path
@pytest.mark.parametrize("eos", [None, 7])
def test_pack_over_row_groups_equals_one_array_and_reference(mean, eos):
    rng = np.random.default_rng(mean)
    groups = [_rows(rng, n, mean) for n in (5, 0, 11, 3)]
    whole = IdRows.concat(groups)
    order = rng.permutation(len(whole))
    ids, starts = pack(groups, order, eos, np.uint16)
    ref_ids, ref_starts = _reference(whole, order, eos)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(starts, ref_starts)
    one_ids, one_starts = pack(whole, order, eos, np.uint16)
    np.testing.assert_array_equal(one_ids, ids)
    np.testing.assert_array_equal(one_starts, starts)
    assert ids.dtype == np.uint16
