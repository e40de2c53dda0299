"""Process-group start-up under torchrun (or any launcher that sets the torch.distributed environment)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started by torchrun (WORLD_SIZE and RANK set in the environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@contextlib.contextmanager
def distributed(device_type: str) -> Iterator[None]:
    """Join the default process group for the block when launched by torchrun: NCCL on CUDA (this process's GPU
    is LOCAL_RANK), gloo on CPU; left again at the end. Nothing happens outside torchrun or when a group exists."""
    if not launched() or dist.is_initialized():
        yield
        return
    if device_type == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def is_rank0() -> bool:
    """Rank 0 of the default group, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Run the block on rank 0, then on the other ranks (which then find what rank 0 wrote, e.g. the prepared
    data); every rank leaves it together."""
    waits = dist.is_initialized() and dist.get_rank() != 0
    if waits:
        dist.barrier()
    yield
    if dist.is_initialized() and not waits:
        dist.barrier()
