"""One timer for every bench mode: warm-up calls, then CUDA events around the timed calls.

On CUDA the time is the span between two CUDA events recorded around `iters` calls (after `warmup` calls that
compile and autotune the Triton kernels), and the peak memory is `torch.cuda.max_memory_allocated` over the timed
calls. On CPU the same loop is timed with `time.perf_counter`; that only smoke-tests a bench (no peak memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """`seconds` for `iters` timed calls; `peak_mem_gib` None off CUDA."""

    seconds: float
    iters: int
    peak_mem_gib: float | None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object],
    device: torch.device | str,
    iters: int,
    warmup: int = 1,
    label: str | None = None,
) -> Timing:
    """Run `fn` `warmup` times (printing each call's wall time when `label` is given: the first call compiles and
    autotunes fla's kernels), then time `iters` calls with CUDA events (wall clock off CUDA)."""
    device = torch.device(device)
    if iters < 1:
        raise ValueError(f"iterations must be >= 1, got {iters}")
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if label is not None:
            print(f"  {label}: warm-up {i + 1}/{warmup} {time.perf_counter() - t0:.1f} s", flush=True)
    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        end.record()
        torch.cuda.synchronize(device)
        return Timing(start.elapsed_time(end) / 1e3, iters, torch.cuda.max_memory_allocated(device) / 2**30)
    return Timing(time.perf_counter() - t0, iters, None)


def resolve_device(name: str) -> torch.device:
    """`cuda` or `cpu`; asking for CUDA without a GPU is a one-line error that names the CPU smoke mode."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("this bench needs a CUDA GPU (none found); --device cpu only smoke-tests it")
    return torch.device(name)


def free_memory(device: torch.device) -> None:
    """Give cached blocks back between models, so each one's peak memory is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
