"""The training loop: AdamW + schedule, gradient accumulation and clipping, bf16 autocast on CUDA,
activation checkpointing, per-block torch.compile, MoE aux losses and aux-loss-free bias updates,
DCP checkpoints, logging.

Determinism: the model is initialised from `train.seed`, batches are a pure function of
(`data.seed`, micro-step) and everything else is restored from checkpoints, so the losses of a run
depend only on its config, and a resumed run continues exactly (bitwise on CPU).

Parallelism stays outside: `linear_moe.parallel.parallelize` applies the run's layout (and activation
checkpointing and compilation) to the built model. Under torchrun the data-parallel ranks read disjoint rows of
each global batch; each rank's loss is scaled by its share of the global batch's target tokens (and FSDP sums the
gradients), so every layout follows the same losses as one process reading the whole global batch. Losses, token
counts, expert loads and capacity drops are summed over the ranks holding different tokens; only rank 0 writes logs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml
from torch import nn

from ..ops.autotune import limit_autotune
from ..parallel import ParallelConfig, StepOptions, build_mesh, moe_layers, parallelize
from ..parallel.config import run_layout
from ..parallel.cp import shard_batch
from ..parallel.grads import clip_grad_norm_
from ..parallel.tp import loss_context
from . import checkpoint as ckpt
from .config import RunConfig
from .interrupt import Interrupted, StopSignals
from .logging import RunLogger
from .metrics import load_fractions, load_imbalance, memory_gb, mfu, peak_flops
from .optim import build_optimizer, set_lr
from .schedule import lr_at


class Batch(Protocol):
    input_ids: torch.Tensor  # [1, B*T]
    labels: torch.Tensor  # [1, B*T], aligned targets, -100 = ignored
    cu_seqlens: torch.Tensor | None  # [N+1]


class BatchSource(Protocol):
    def get_batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch: ...


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown train.device {name!r}; choose one of auto, cpu, cuda")
    return torch.device(name)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA for `auto`/`bf16`, none (fp32) on CPU for `auto`/`fp32`."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown train.dtype {dtype!r}; choose one of auto, bf16, fp32")
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@dataclass
class StepResult:
    loss: float  # LM loss (token-weighted over the micro-batches)
    aux_loss: float  # MoE aux loss (mean over micro-batches)
    grad_norm: float | torch.Tensor
    tokens: int  # input tokens processed
    expert_load_LE: torch.Tensor | None  # summed over micro-batches
    expert_dropped_L: torch.Tensor | None = None  # assignments dropped by the capacity limit, summed likewise


class Trainer:
    """Train `model` on batches from `data` (and validate on `val_data`) under `cfg` (a RunConfig).

    Under torchrun, `data` gives each data-parallel rank its rows: built with `data.micro_batch_size / dp` rows,
    `get_batch(step, dp_rank, dp)` is that rank's block of the step's global micro-batch."""

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        data: BatchSource,
        val_data: BatchSource | None = None,
        *,
        config_yaml: str = "",
        flops_per_token: float | None = None,
        extra_files: dict[str, Path] | None = None,
    ) -> None:
        self.cfg, self.tc = cfg, cfg.train
        self.device = resolve_device(self.tc.device)
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        self.layout: ParallelConfig = run_layout(cfg)
        if distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.mesh = build_mesh(self.layout, self.device.type) if distributed else None
        self.rank0 = not distributed or dist.get_rank() == 0
        self.dp_rank = self.mesh.dp_rank if self.mesh is not None else 0
        token_mesh = self.mesh["dp_cp"] if self.mesh is not None else None
        self.token_ranks = token_mesh.size() if token_mesh is not None else 1  # ranks holding different tokens
        self.token_group = token_mesh.get_group() if self.token_ranks > 1 else None
        self.amp_dtype = autocast_dtype(self.tc.dtype, self.device)
        if self.tc.autotune != "full":  # before the first fla kernel call imports fla's kernel modules
            limit_autotune(self.tc.autotune)
        self.model = parallelize(
            model,
            self.layout,
            self.mesh,
            device=self.device,
            options=StepOptions.of(self.tc),
            param_dtype=self.amp_dtype,
            seq_len=cfg.data.seq_len,
        )
        self.optimizer = build_optimizer(self.model, self.tc.lr, self.tc.weight_decay, tuple(self.tc.betas))
        self.data, self.val_data = data, val_data
        self.run_dir = Path(self.tc.run_dir)
        self.ckpt_root = self.run_dir / ckpt.CKPT_DIRNAME
        self.config_yaml = config_yaml
        self.extra_files = extra_files or {}
        self.flops_per_token = flops_per_token
        peak = peak_flops(self.device)
        self.peak = peak * world if peak else None  # tokens/s are counted over all ranks
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []  # the logged records (also in metrics.jsonl)

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        micro_step = self.step * self.tc.grad_accum
        epoch_of = getattr(self.data, "epoch_of", None)
        meta = {
            "tokens_seen": self.tokens_seen,
            "data": {
                "step": micro_step,
                "seed": self.cfg.data.seed,
                "epoch": epoch_of(micro_step, self.layout.dp) if epoch_of else 0,
            },
        }
        return ckpt.save_checkpoint(
            self.ckpt_root,
            self.step,
            self.model,
            self.optimizer,
            config_yaml=self.config_yaml,
            meta=meta,
            keep_last=self.tc.keep_last,
            extra_files=self.extra_files,
        )

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path`: model, optimizer, RNG, step and data position."""
        meta = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step = int(meta["step"])
        self.tokens_seen = int(meta.get("tokens_seen", 0))

    # ------------------------------------------------------------------ steps

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The batch on the device; under context parallelism this rank's slice of the sequence."""
        cu = batch.cu_seqlens.to(self.device) if batch.cu_seqlens is not None else None
        input_ids, labels = batch.input_ids.to(self.device), batch.labels.to(self.device)
        if self.layout.cp > 1:
            return shard_batch(self.model, input_ids, labels, cu)
        return input_ids, labels, cu

    def _micro_batches(self, step: int) -> Iterator[Batch]:
        for micro in range(self.tc.grad_accum):
            yield self.data.get_batch(step * self.tc.grad_accum + micro, self.dp_rank, self.layout.dp)

    def _sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the ranks holding different tokens (itself in one process)."""
        if self.token_group is not None:
            dist.all_reduce(x, group=self.token_group)
        return x

    def train_step(self, step: int) -> StepResult:
        """One optimizer update (gradient accumulation over `grad_accum` micro-batches)."""
        with loss_context(self.model):  # tensor parallel: the vocab-parallel loss, forward and backward
            return self._train_step(step)

    def _forward_backward(self, input_ids, labels, cu_seqlens, total: int, train: bool = True):
        """The model's output on one micro-batch; a pipeline rank runs forward and backward (when `train`) in its
        schedule (the output's losses are then detached) and reports its own MoE layers' loads."""
        runner = getattr(self.model, "runner", None)
        if runner is None:
            with self._autocast():
                return self.model(input_ids, labels=labels, cu_seqlens=cu_seqlens)
        rows = input_ids.numel() // self.cfg.data.seq_len
        with self._autocast():
            aux_weight = 1 / (self.tc.grad_accum * self.token_ranks)
            return runner.step(input_ids, labels, cu_seqlens, rows, total, aux_weight, train)

    def _train_step(self, step: int) -> StepResult:
        set_lr(self.optimizer, self.lr(step))
        batches = [self._to_device(b) for b in self._micro_batches(step)]
        # weight each micro-batch's mean CE by its share of target tokens: the update then follows the
        # token-mean loss of the whole step, also when SFT masks make micro-batches uneven
        counts = [int((labels != -100).sum()) for _, labels, _ in batches]
        total = max(1, int(self._sum_over_ranks(torch.tensor(sum(counts), device=self.device))))  # global targets
        lm_sum = torch.zeros((), device=self.device)  # accumulated on the device: one sync per step
        aux_sum = torch.zeros((), device=self.device)
        tokens, load_LE, dropped_L = 0, None, None
        for (input_ids, labels, cu_seqlens), count in zip(batches, counts, strict=True):
            out = self._forward_backward(input_ids, labels, cu_seqlens, total)
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=self.device)
            lm = out.loss * (count / total) if count else torch.zeros((), device=self.device)  # no targets: no NaN
            objective = lm + aux / (self.tc.grad_accum * self.token_ranks)  # the ranks' mean: one process's aux
            if objective.requires_grad:
                objective.backward()
            if count:
                lm_sum += out.loss.detach().float() * count
            aux_sum += aux.detach().float()
            tokens += input_ids.numel()
            if out.expert_load is not None:
                load = out.expert_load.detach().float()
                load_LE = load if load_LE is None else load_LE + load
            if out.expert_dropped is not None:
                dropped_L = out.expert_dropped if dropped_L is None else dropped_L + out.expert_dropped
        clip = self.tc.grad_clip if self.tc.grad_clip > 0 else math.inf
        pipeline = self.mesh["pp"].get_group() if self.layout.pp > 1 else None
        grad_norm = clip_grad_norm_(self.model.parameters(), clip, pipeline)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.token_group is not None:  # one all-reduce: losses, tokens, loads and drops of every rank
            stats = [lm_sum.view(1), aux_sum.view(1), torch.tensor([float(tokens)], device=self.device)]
            stats += [load_LE.flatten()] if load_LE is not None else []
            stats += [dropped_L] if dropped_L is not None else []
            packed = self._sum_over_ranks(torch.cat([x.double() for x in stats]))  # exact counts beyond 2**24
            lm_sum, aux_sum, tokens = packed[0], packed[1] / self.token_ranks, int(packed[2])
            rest = packed[3:]
            if load_LE is not None:
                load_LE, rest = rest[: load_LE.numel()].float().view_as(load_LE), rest[load_LE.numel() :]
            if dropped_L is not None:
                dropped_L = rest.long()
        if load_LE is not None:
            with torch.no_grad():
                rows = getattr(self.model, "moe_rows", None)  # a pipeline rank: the rows of its own MoE layers
                loads = load_LE if rows is None else load_LE[rows]
                for layer, load_E in zip(moe_layers(self.model), loads, strict=True):
                    layer.update_bias(load_E)
        loss, aux_loss = float(lm_sum) / total, float(aux_sum) / self.tc.grad_accum
        return StepResult(loss, aux_loss, grad_norm, tokens, load_LE, dropped_L)

    def lr(self, step: int) -> float:
        tc = self.tc
        return lr_at(
            step,
            lr=tc.lr,
            min_lr=tc.min_lr,
            warmup=tc.warmup,
            total=tc.steps,
            schedule=tc.schedule,
            decay_fraction=tc.decay_fraction,
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean validation loss over `eval_batches` fixed micro-batches (None without val data)."""
        if self.val_data is None or self.tc.eval_batches <= 0:
            return None
        self.model.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss * targets, targets
        for i in range(self.tc.eval_batches):
            input_ids, labels, cu_seqlens = self._to_device(self.val_data.get_batch(i, self.dp_rank, self.layout.dp))
            count = int((labels != -100).sum())
            with loss_context(self.model):
                out = self._forward_backward(input_ids, labels, cu_seqlens, max(count, 1), train=False)
            if count:
                sums += torch.stack([out.loss.double() * count, sums.new_tensor(count)])
        self.model.train()
        loss_sum, count_sum = self._sum_over_ranks(sums).tolist()
        return loss_sum / max(1, count_sum)

    # ------------------------------------------------------------------ loop

    def _train_record(self, res: StepResult, lr: float, tok_per_s: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "split": "train",
            "loss": res.loss,
            "aux_loss": res.aux_loss,
            "lr": lr,
            "grad_norm": float(res.grad_norm),
            "tokens": self.tokens_seen,
            "tokens_per_s": tok_per_s,
            "mfu": mfu(tok_per_s, self.flops_per_token, self.peak) if self.flops_per_token else None,
            "memory_gb": memory_gb(self.device),
        }
        if res.expert_load_LE is not None:
            record["expert_load"] = [[round(x, 5) for x in row] for row in load_fractions(res.expert_load_LE).tolist()]
            record["load_imbalance"] = load_imbalance(res.expert_load_LE)
        moe = self.cfg.model.moe
        if res.expert_dropped_L is not None and moe is not None and moe.capacity_factor is not None:
            record["dropped"] = res.expert_dropped_L.tolist()  # per MoE layer, over the step's micro-batches and ranks
            if res.expert_load_LE is not None:  # of the assignments routed (the loads count them before dropping)
                record["drop_fraction"] = float(res.expert_dropped_L.sum()) / max(1.0, float(res.expert_load_LE.sum()))
        return record

    def _log(self, logger: RunLogger, record: dict[str, Any]) -> None:
        logger.log(self.step, record)
        self.history.append({"step": self.step, **record})

    def _agreed_signal(self, signum: int | None) -> int | None:
        """The stop signal any rank received this step (None if none did), the same on every rank, so that all ranks
        save the same step and stop together. Exchanged over a gloo group: a host-side flag that never waits for the
        GPU stream."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return signum
        if getattr(self, "_signal_group", None) is None:
            self._signal_group = dist.new_group(backend="gloo")
        flag = torch.tensor([signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._signal_group)
        return int(flag) or None

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train from `self.step` to `train.steps` (or stop early after update `stop_at`, saving a
        checkpoint there, as an interruption would), logging, evaluating and saving on the way.

        Returns a summary: first/last logged train loss, last val loss, steps, seconds, checkpoint path."""
        tc = self.tc
        logger = (RunLogger if self.rank0 else _SilentLogger)(
            self.run_dir,
            total_steps=tc.steps,
            start_step=self.step,
            tensorboard=tc.tensorboard,
            wandb_project=tc.wandb,
            progress=tc.progress,
            config=yaml.safe_load(self.config_yaml) if self.config_yaml else None,
        )
        self.model.train()
        last_ckpt, val_loss = None, None
        t_start = t_window = time.perf_counter()
        tokens_window = 0
        stop = StopSignals().install()  # SIGINT/SIGTERM: finish the step, save, raise Interrupted
        try:
            if self.step == 0 and tc.eval_every:  # the starting point of the validation curve
                val_loss = self.evaluate()
                if val_loss is not None:
                    self._log(logger, {"split": "val", "loss": val_loss})
            end = tc.steps if stop_at is None else min(stop_at, tc.steps)
            while self.step < end:
                lr = self.lr(self.step)
                res = self.train_step(self.step)
                self.step += 1
                self.tokens_seen += res.tokens
                tokens_window += res.tokens
                if self.step % tc.log_every == 0 or self.step == tc.steps or self.step == 1:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    tok_per_s = tokens_window / max(now - t_window, 1e-9)
                    t_window, tokens_window = now, 0
                    record = self._train_record(res, lr, tok_per_s)
                    self._log(logger, record)
                    logger.progress(self.step, _postfix(record))
                if (tc.eval_every and self.step % tc.eval_every == 0) or self.step == tc.steps:
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        self._log(logger, {"split": "val", "loss": val_loss})
                        logger.write(f"step {self.step}: train loss {res.loss:.3f}, val loss {val_loss:.3f}")
                signum = self._agreed_signal(stop.signum)
                if (tc.save_every and self.step % tc.save_every == 0) or self.step == end or signum is not None:
                    last_ckpt = self.save()
                if signum is not None:
                    raise Interrupted(signum, self.step, last_ckpt)
        finally:
            stop.restore()
            logger.close()
        train_losses = [r["loss"] for r in self.history if r["split"] == "train"]
        return {
            "steps": self.step,
            "first_loss": train_losses[0] if train_losses else None,
            "last_loss": train_losses[-1] if train_losses else None,
            "val_loss": val_loss,
            "seconds": time.perf_counter() - t_start,
            "checkpoint": str(last_ckpt or ckpt.find_latest(self.ckpt_root) or ""),
        }


class _SilentLogger:
    """The logger of ranks other than 0: they compute the same (reduced) records and write nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, step: int, record: dict[str, Any]) -> None:
        pass

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        pass

    def write(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.1e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
    if record.get("mfu") is not None:
        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
    if record.get("memory_gb") is not None:
        postfix["mem"] = f"{record['memory_gb']:.1f}GB"
    return postfix
