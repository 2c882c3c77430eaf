"""The weight channel: claims from the training process and from worker processes, and changes."""

from __future__ import annotations

import multiprocessing as mp

from fastmix_data.stream.channel import WeightChannel


def _claim_in_child(channel: WeightChannel, batch: int, queue) -> None:
    queue.put(channel.claim(batch))


def test_claims_from_this_process_and_from_workers_bound_the_change():
    channel = WeightChannel([{"v": 0}], first_batch=0)
    try:
        assert channel.claim(0) == [{"v": 0}]  # first claim: the history
        assert channel.claim(7) is None  # in-process claims: kept in memory
        assert channel.begin_change() == 7  # ... and still bound where a change may apply
        channel.finish_change([{"v": 0}, {"v": 1}])
        assert channel.claim(8) == [{"v": 0}, {"v": 1}]  # the change is seen at the next claim
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_claim_in_child, args=(channel, 12, queue))
        child.start()
        assert queue.get(timeout=60) is None  # a forked worker holds the current history already ...
        child.join(60)
        assert channel.max_claimed() == 12  # ... and its claim reaches the training process
        assert channel.begin_change() == 12
        channel.finish_change([{"v": 0}, {"v": 1}, {"v": 2}])
        channel.reset([{"v": 0}], first_batch=3)
        assert channel.max_claimed() == 2 and channel.claim(3) == [{"v": 0}]
    finally:
        channel.close()
