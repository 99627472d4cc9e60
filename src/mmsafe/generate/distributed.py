"""Data-parallel generation: which process am I, and waiting for the others.

Under ``accelerate launch --num_processes N`` every process runs the same command; each
takes every N-th item of the to-do list, writes its own part file, and the first process
merges the parts once all are done. A single process (no launcher) needs none of this
and never initialises torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

#: A rank that finishes its shard early waits at the final barrier for the slowest one;
#: the default collective timeout (30 minutes) would kill long uneven runs.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place among the data-parallel workers."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """How many processes a launcher (accelerate, torchrun) started; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _state() -> Any:
    from accelerate import PartialState

    return PartialState(timeout=BARRIER_TIMEOUT)


def process_info() -> ProcessInfo:
    """Rank, world size and device of this process (initialises the process group when launched)."""
    if launched_world_size() <= 1:
        return ProcessInfo()
    state = _state()
    return ProcessInfo(rank=state.process_index, world_size=state.num_processes, device=str(state.device))


def wait_for_everyone() -> None:
    """Barrier across the launched processes (a no-op in a single process)."""
    if launched_world_size() > 1:
        _state().wait_for_everyone()
