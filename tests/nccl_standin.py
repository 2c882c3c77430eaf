"""A process-group backend that, like NCCL, has no CPU implementation.

It is registered for the "cuda" device type only, so a collective on a CPU tensor fails in torch's
dispatcher exactly as on an NCCL group ("No backend type associated with device type cpu"). Tests
make it the default group to stand for "the training job's group is NCCL" on a machine without GPUs.
It implements no collective at all (nothing here imitates a library): whatever works on such a group
does not use it.
"""

from __future__ import annotations

import torch.distributed as dist

NAME = "cudaonly"


class CudaOnlyGroup(dist.ProcessGroup):
    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return NAME


def _create(store, rank: int, world_size: int, timeout) -> CudaOnlyGroup:
    return CudaOnlyGroup(rank, world_size)


def register() -> None:
    """Make ``init_process_group("cudaonly", ...)`` available in this process."""
    if NAME not in dist.Backend.backend_list:
        dist.Backend.register_backend(NAME, _create, devices=["cuda"])
