"""Gloo worker processes shared by the distributed tests: one pool per world size per pytest session (spawning and
importing torch costs seconds per process, so every test runs its job on the same warm workers).

    results = dist_pool(2).run(job, *args)   # job(*args) on every rank; returns the per-rank results

A job is a module-level function of a test module (the workers import it by name); it sees an initialised default
process group. A failing rank's traceback is raised in the test, and the pool is discarded (other ranks may be stuck
in a collective).
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

_POOLS: dict[int, DistPool] = {}
TIMEOUT_S = 240
PRELOAD = ["torch", "torch.distributed", "linear_moe.model", "linear_moe.parallel"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while (job := jobs.get()) is not None:
        module, name, args = job
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - the test shows the traceback
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int):
        # forkserver: one server imports torch and the package once, every worker is a cheap fork of it (spawn
        # would import them again per process; fork from pytest would inherit OpenMP's threads)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        port = _free_port()
        self.world = world
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, self.jobs[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        for q in self.jobs:
            q.put((fn.__module__, fn.__name__, args))
        out: list[Any] = [None] * self.world
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{fn.__name__}: no result from every rank within {TIMEOUT_S} s") from None
            if not ok:
                self.close()
                raise RuntimeError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            out[rank] = value
        return out

    def close(self) -> None:
        _POOLS.pop(self.world, None)
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def dist_pool(world: int) -> DistPool:
    """The session's pool of `world` gloo processes (started on first use)."""
    if world not in _POOLS:
        _POOLS[world] = DistPool(world)
    return _POOLS[world]


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS.values()):
        pool.close()


# ---------------------------------------------------------------- tiny models and single-process reference runs


def tiny_model(mixer: str, pattern: str | None = None, preset: str = "debug-dense", layers: int = 2, **kwargs):
    """A float32 debug model, initialised from seed 0 (every rank builds the same one)."""
    import torch

    from linear_moe.model import LinearMoEForCausalLM, get_preset

    cfg = get_preset(preset).replace(mixer=mixer, num_layers=layers, layer_pattern=pattern, mixer_kwargs=kwargs)
    torch.manual_seed(0)
    return LinearMoEForCausalLM(cfg)


def packed_batches(steps: int, rows: int = 1, row_len: int = 48, seed: int = 1):
    """`steps` packed batches ([1, rows*row_len] ids and labels, cu_seqlens), documents of random lengths (some
    targets ignored): boundaries fall anywhere, so documents cross the ranks' slices."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        n = rows * row_len
        ids = torch.randint(0, 512, (1, n), generator=g)
        labels = ids.roll(-1, 1)
        labels[0, torch.randint(0, n, (3,), generator=g)] = -100
        cuts = set()
        for r in range(rows):
            inner = torch.randint(1, row_len, (2,), generator=g).tolist()
            cuts |= {r * row_len, *(r * row_len + c for c in inner)}
        out.append((ids, labels, torch.tensor(sorted(cuts | {n}), dtype=torch.int32)))
    return out


def train_reference(model, batches, lr: float = 1e-2) -> tuple[list[float], dict]:
    """Single-process AdamW steps on whole batches: (losses (mean CE, + aux), the first step's gradients by name)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, grads = [], {}
    for ids, labels, cu in batches:
        out = model(ids, labels=labels, cu_seqlens=cu)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
        loss.backward()
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, grads


def grad_error(grads: dict, ref: dict) -> float:
    """Largest gradient difference over the tensors in `grads` (DTensors made whole), relative to each reference
    tensor's largest entry."""
    from torch.distributed.tensor import DTensor

    errs = []
    for n, g in grads.items():
        g = g.full_tensor() if isinstance(g, DTensor) else g
        errs.append(((g - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item())
    return max(errs)
