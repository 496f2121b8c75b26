"""Several processes: `accelerate launch` (or torchrun) starts one build per GPU; this module says who does what.

Only the train stage runs on every process. The main process (global rank 0) runs every other stage and is the only
one that writes markers, report.json and logs; the other ranks wait for it at a barrier where they need its output
(the data stage, the checkpoint folder) and stop once training ends. With one process nothing here does anything.

Nothing here imports torch at import time: `python build/run.py --help` stays instant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from .common import BuildError

# The other ranks wait at a barrier while the main process prepares the data (and downloads the base model the first
# time: 7.6 GB for Phi-3.5-mini). torch's default process-group timeout (10 min NCCL, 30 min gloo) would kill them.
BARRIER_TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class Procs:
    """This process's place in the run: global rank, rank on its machine, number of processes in all."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.world_size > 1


def from_env() -> Procs:
    """accelerate launch and torchrun both set RANK, LOCAL_RANK and WORLD_SIZE; a plain `python` sets none."""
    get = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
    return Procs(rank=get("RANK", 0), local_rank=get("LOCAL_RANK", 0), world_size=get("WORLD_SIZE", 1))


def fsdp() -> bool:
    """Launched with an FSDP accelerate config (accelerate launch exports its settings as ACCELERATE_* variables)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def accumulation_steps(single_gpu_steps: int, procs: Procs) -> int:
    """Gradient accumulation per process so that the global batch stays the single-GPU recipe's:
    per_device_train_batch_size x gradient_accumulation_steps (x 1 process)."""
    if single_gpu_steps % procs.world_size:
        raise BuildError(
            f"gradient_accumulation_steps {single_gpu_steps} is not divisible by the {procs.world_size} processes, so "
            "the global batch cannot stay the recipe's: launch a number of processes that divides it, or set "
            "--gradient_accumulation_steps to a multiple of it"
        )
    return single_gpu_steps // procs.world_size


def start(procs: Procs) -> None:
    """Join the process group before any stage runs (so the barriers below work before the Trainer exists), with a
    timeout long enough for the main process's data stage. The Trainer later reuses this group."""
    if not procs.multi:
        return
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
    PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)


def barrier(procs: Procs) -> None:
    if procs.multi:
        import torch.distributed as dist

        dist.barrier()


def from_main(procs: Procs, value):
    """The main process's `value` on every rank (a small picklable object); also a barrier."""
    if not procs.multi:
        return value
    import torch.distributed as dist

    box = [value if procs.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
