"""The one resumability check every stage must pass: save -> continue -> restore -> compare.

``check_resume(make, take, save, restore, n_before, n_after, same)``:
  1. ``a = make()``; take ``n_before`` items; ``state = save(a)``; take ``n_after`` more -> expected.
  2. ``b = make()``; ``restore(b, state)`` (the state must survive a JSON round trip); take
     ``n_after`` items -> got.
  3. ``same(expected, got)`` for every item.
Used for the planner, the stream (in-process, with DataLoader workers, with StatefulDataLoader),
probes and the search trainer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def check_resume(
    make: Callable[[], Any],
    take: Callable[[Any, int], list],
    save: Callable[[Any], Any],
    restore: Callable[[Any, Any], None],
    n_before: int,
    n_after: int,
    same: Callable[[Any, Any], bool],
) -> None:
    a = make()
    take(a, n_before)
    state = json.loads(json.dumps(save(a)))
    expected = take(a, n_after)
    b = make()
    restore(b, state)
    got = take(b, n_after)
    assert len(got) == len(expected) == n_after, (len(got), len(expected), n_after)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert same(e, g), f"item {i} after resume differs: {e!r} != {g!r}"


def batch_key(batch, *fields: str) -> tuple:
    """What identifies a served batch: its index and weight version and, per row, its source, shard
    and item, then each of ``fields`` per row (lists as tuples), to compare batches across runs."""
    rows = tuple(tuple(batch[k].tolist()) for k in ("source", "shard", "item"))
    return (batch["batch_index"], batch["weight_version"], *rows, *(_plain(batch.get(f, ())) for f in fields))


def _plain(value):
    """Tensors, arrays and lists of them as nested tuples (hashable, comparable)."""
    value = value.tolist() if hasattr(value, "tolist") else value
    return tuple(_plain(x) for x in value) if isinstance(value, (list, tuple)) else value


def check_stream_resume(new_stream, open_batches, key, n_before, n_after, change=None) -> None:
    """`check_resume` for a MixtureStream saved with ``state_dict`` and restored with
    ``load_state_dict``: ``new_stream()`` builds one, ``open_batches(stream)`` iterates it (``iter``,
    or a loader with workers), ``key(batch)`` is what must match. With ``change`` (weights), the
    first take of more than 5 batches ends with ``set_weights(change)``, so the state holds a change
    that applies after the saved position."""

    def make():
        s = new_stream()
        s._it = iter(open_batches(s))
        return s

    def take(s, n):
        out = []
        for batch in s._it:
            out.append(key(batch))
            if len(out) == n:
                break
        if change is not None and len(out) == n and n > 5 and s.state_dict()["history"][-1]["version"] == 0:
            s.set_weights(change)
        return out

    def restore(s, state):
        s.load_state_dict(state)
        s._it = iter(open_batches(s))

    check_resume(make, take, lambda s: s.state_dict(), restore, n_before, n_after, lambda a, b: a == b)
