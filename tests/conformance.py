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
