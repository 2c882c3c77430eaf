"""The weight channel: lock-free version reads (optimistic readers), claims of worker processes
(a plain DataLoader's), the grant gate of the training process, and changes."""

import multiprocessing as mp
import threading
import time

import pytest

from fastmix_data.errors import CoordinationError
from fastmix_data.stream.channel import WeightChannel


def _claim_in_child(channel: WeightChannel, batch: int, queue) -> None:
    queue.put(channel.claim(batch))


def _version_in_child(channel: WeightChannel, queue) -> None:
    queue.put(channel.version())


def test_claims_from_workers_bound_the_change_and_optimistic_readers_see_the_version():
    channel = WeightChannel([{"v": 0}], first_batch=0)
    try:
        assert channel.version() == 0 and channel.begin_change() == -1  # nobody claimed: no bound
        channel.finish_change([{"v": 0}, {"v": 1}])
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_claim_in_child, args=(channel, 12, queue))
        child.start()
        child.join(30)
        assert queue.get(timeout=5) == [{"v": 0}, {"v": 1}]  # a child's first claim returns the history
        assert channel.begin_change() == 12  # ... and its claim bounds where a change may apply
        assert channel.finish_change([{"v": 0}, {"v": 1}, {"v": 2}]) == 2
        child = ctx.Process(target=_version_in_child, args=(channel, queue))
        child.start()
        child.join(30)
        assert queue.get(timeout=5) == 2  # the version, read through the child's own mapping
        assert channel.reset([{"v": 0}], first_batch=3) == 3
        assert channel.progress()[0] == 2 and channel.claim(3) == [{"v": 0}]
    finally:
        channel.close()


def test_gate_waits_for_a_grant_and_a_failed_channel_raises_everywhere():
    channel = WeightChannel([{"v": 0}], first_batch=5, gated=True)
    asked: list[int] = []
    channel.refill = lambda batch: asked.append(batch)
    try:
        passed = threading.Event()
        t = threading.Thread(target=lambda: (channel.gate(5), passed.set()), daemon=True)
        t.start()
        time.sleep(0.1)
        assert not passed.is_set() and asked and asked[-1] == 5  # batch 5 is at the grant: it waits, asking
        channel.install(None, 7)
        t.join(5)
        assert passed.is_set() and channel.progress() == (4, -1, 7)  # no worker claimed, none waits, grant 7
        channel.fail("ranks disagree")
        with pytest.raises(CoordinationError, match="ranks disagree"):
            channel.gate(6)
        with pytest.raises(CoordinationError, match="ranks disagree"):
            channel.version()
        assert channel.version(raise_failure=False) == 0
    finally:
        channel.close()
