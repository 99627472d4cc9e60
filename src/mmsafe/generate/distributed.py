"""Data-parallel generation: which process am I, and waiting for the others.

Under a launcher that starts N processes (``accelerate launch --multi_gpu
--num_processes N``, ``torchrun --nproc_per_node N``) every process runs the same
command; each takes every N-th item of the to-do list, writes its own part file, and the
first process merges the parts once all are done. The launcher's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``) is read directly and the process group is
NCCL on GPUs, gloo on CPUs. A single process (no launcher) never initialises
torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from mmsafe.data.resumable import Launch

#: A rank that finishes its shard early waits at the final barrier for the slowest one;
#: the default collective timeout (30 minutes) would kill long uneven runs.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class ProcessInfo(Launch):
    """This process's place among the data-parallel workers (rank, world size, the barrier) and its device."""

    device: str | None = None


def launched_world_size() -> int:
    """How many processes a launcher (accelerate, torchrun) started; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _init_process_group() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)


def process_info() -> ProcessInfo:
    """Rank, world size and device of this process (initialises the process group when launched)."""
    if launched_world_size() <= 1:
        return ProcessInfo()
    import torch
    import torch.distributed as dist

    _init_process_group()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return ProcessInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def wait_for_everyone() -> None:
    """Barrier across the launched processes (a no-op in a single process)."""
    if launched_world_size() > 1:
        import torch.distributed as dist

        _init_process_group()
        dist.barrier()
