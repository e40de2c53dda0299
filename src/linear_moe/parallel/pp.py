"""Pipeline parallelism with `torch.distributed.pipelining`: stages are contiguous slices of `model.layers`; the
first stage holds the embedding, the last the final norm and the LM head (the loss runs in the schedule's
`loss_fn`). Schedules: GPipe, 1F1B (one stage per rank) and Interleaved1F1B (`PP_VIRTUAL` stages per rank).

A micro-batch is a group of rows of the step's batch: the packed `[1, B*T]` batch is viewed as `[B, T]` rows (each
row boundary is a document boundary) and split into `microbatches` groups. The document index of every token
travels with the hidden states (an integer stage output), so every stage rebuilds its micro-batch's `cu_seqlens`;
tensors of the `MixerContext` (RWKV-7's `v_first`) travel as extra stage outputs. MoE aux losses reach the
objective from every stage: each stage ties its layers' aux loss to its output with `AttachAux`, whose backward
feeds the aux loss its gradient (Megatron's MoEAuxLossAutoScaler), so no stage needs the aux losses of another.

The objective of a pipelined step is sum over micro-batches of (CE sum / `token_count` + aux / `microbatches` *
`aux_weight`): with `token_count` the step's target count (over all data-parallel ranks) it equals the
single-process objective whose aux losses are computed per micro-batch of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..mixers.base import MixerContext
from ..model.lm import LMOutput
from ..model.loss import causal_lm_loss

SCHEDULES = {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B}
PP_VIRTUAL = {"GPipe": 1, "1F1B": 1, "Interleaved1F1B": 2}  # stages per rank
CONTEXT_PRODUCERS = {"RWKV7Attention": ("v_first",)}  # mixers that put tensors into the MixerContext


class AttachAux(torch.autograd.Function):
    """`h` unchanged; in backward the aux loss gets gradient `scale` (its weight in the objective)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_shape = scale, aux.shape
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, torch.full(ctx.aux_shape, ctx.scale, device=g.device, dtype=torch.float32), None


def doc_boundaries(doc_N: torch.Tensor) -> torch.Tensor:
    """Document offsets [N+1] (int32) of a flattened micro-batch from its tokens' document indices [N]."""
    starts = torch.nonzero(doc_N[1:] != doc_N[:-1]).flatten() + 1
    ends = torch.tensor([0, doc_N.numel()], device=doc_N.device)
    return torch.cat([ends[:1], starts, ends[1:]]).to(torch.int32)


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Equal contiguous slices of the layers, one per stage (the layout check makes them divide)."""
    if num_layers % num_stages:
        raise ValueError(f"pipeline: {num_layers} layers do not split into {num_stages} equal stages")
    n = num_layers // num_stages
    return [range(s * n, (s + 1) * n) for s in range(num_stages)]


@dataclass
class AuxRecord:
    loss: torch.Tensor  # detached sum of this stage's aux losses for one micro-batch
    load_LE: torch.Tensor  # [local MoE layers, E]
    dropped_L: torch.Tensor  # [local MoE layers] assignments dropped by the capacity limit


class StageModule(nn.Module):
    """One pipeline stage: `layers` {global index: block} (+ `embed_tokens` first, `norm` and `lm_head` last), with
    the full model's parameter names. forward(ids or h [m, T(, D)], doc [m, T], *context) -> (h, doc, *context), the
    last stage: final-norm hidden states [m, T, D]."""

    def __init__(self, model: nn.Module, layer_ids: range, first: bool, last: bool, ctx_in, ctx_out):
        super().__init__()
        self.first, self.last, self.ctx_in, self.ctx_out = first, last, ctx_in, ctx_out
        if first:
            self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if last:
            self.norm, self.lm_head = model.norm, model.lm_head
        self.aux_scale = 0.0
        self.records: list[AuxRecord] = []

    def forward(self, x: torch.Tensor, doc_BT: torch.Tensor, *ctx: torch.Tensor):
        m, T = doc_BT.shape
        h = self.embed_tokens(x) if self.first else x
        h = h.reshape(1, m * T, -1)
        cu = doc_boundaries(doc_BT.flatten())
        context = MixerContext(**{k: t.reshape(1, m * T, -1) for k, t in zip(self.ctx_in, ctx, strict=True)})
        auxes = []
        for block in self.layers.values():
            h, _, aux = block(h, None, cu, False, context)
            if aux is not None:
                auxes.append(aux)
        if auxes:
            aux_sum = torch.stack([a.loss for a in auxes]).sum()
            loads, dropped = torch.stack([a.load for a in auxes]), torch.stack([a.dropped for a in auxes])
            self.records.append(AuxRecord(aux_sum.detach().float(), loads, dropped))
            h = AttachAux.apply(h, aux_sum, self.aux_scale)
        h = h.view(m, T, -1)
        if self.last:
            return self.norm(h)
        return (h, doc_BT, *(getattr(context, k).view(m, T, -1) for k in self.ctx_out))


class PipelinedModel(nn.Module):
    """This rank's part of the model: the union of its stages' modules under the full model's names (for the
    optimizer, checkpoints and `moe_layers`); `pipeline_stages` are the stage modules (FSDP roots)."""

    def __init__(self, model: nn.Module, stages: list[StageModule]):
        super().__init__()
        for s in stages:
            for name in ("embed_tokens", "norm", "lm_head"):
                if hasattr(s, name):
                    self.add_module(name, getattr(s, name))
        ids = sorted(int(i) for s in stages for i in s.layers)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in ids})
        self.cfg = model.cfg
        self.pipeline_stages = stages
        moe_ids = [i for i, b in enumerate(model.layers) if b.is_moe]
        self.moe_rows = [moe_ids.index(i) for i in ids if model.layers[i].is_moe]  # rows of the full expert load
        self.num_moe_layers = len(moe_ids)

    def moe_layers(self) -> list[nn.Module]:
        return [b.ffn for b in self.layers.values() if b.is_moe]


def _context_fields(model: nn.Module, layer_ids: range) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(context tensors a stage receives, those it sends): set by a layer before the stage's end and not after it."""
    producers = {}
    for i, block in enumerate(model.layers):
        for f in CONTEXT_PRODUCERS.get(type(block.mixer).__name__, ()):
            producers.setdefault(f, i)
    ins = tuple(f for f, i in producers.items() if i < layer_ids.start)
    outs = tuple(f for f, i in producers.items() if i < layer_ids.stop)
    return ins, outs


class PipelineRunner:
    """Builds this rank's stages of `model` over the mesh's "pp" dimension and runs one pipelined step."""

    def __init__(self, model: nn.Module, mesh, schedule: str, microbatches: int, device: torch.device):
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline: unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        pp_mesh = mesh["pp"]
        self.group, self.rank, self.pp = pp_mesh.get_group(), pp_mesh.get_local_rank(), pp_mesh.size()
        self.device, self.microbatches = device, microbatches or self.pp
        v = PP_VIRTUAL[schedule]
        n_stages = self.pp * v
        slices = split_layers(len(model.layers), n_stages)
        self.stages = []
        for k in range(v):
            s = self.rank + k * self.pp
            ctx_in, ctx_out = _context_fields(model, slices[s])
            self.stages.append(StageModule(model, slices[s], s == 0, s == n_stages - 1, ctx_in, ctx_out))
        self.model = PipelinedModel(model, self.stages)
        self.model.runner = self  # the trainer runs steps through it
        self.fuse = model.cfg.fuse_linear_cross_entropy
        self.has_last = any(s.last for s in self.stages)
        self.schedule_cls, self.n_stages = SCHEDULES[schedule], n_stages
        self._schedule = None
        self.token_count = 1.0

    def _build_schedule(self):
        pipeline_stages = [
            PipelineStage(s, self.rank + k * self.pp, self.n_stages, self.device, group=self.group)
            for k, s in enumerate(self.stages)
        ]
        kwargs = dict(n_microbatches=self.microbatches, loss_fn=self._loss, scale_grads=False)
        if self.schedule_cls is ScheduleInterleaved1F1B:
            return self.schedule_cls(pipeline_stages, **kwargs)
        return self.schedule_cls(pipeline_stages[0], **kwargs)

    def _loss(self, h_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        last = next(s for s in self.stages if s.last)
        loss, _ = causal_lm_loss(
            h_BTD.reshape(1, -1, h_BTD.shape[-1]), last.lm_head.weight, labels_BT.reshape(1, -1), self.fuse
        )
        return loss * ((labels_BT != -100).sum() / self.token_count)

    def step(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        rows: int,
        token_count: float,
        aux_weight: float = 1.0,
        train: bool = True,
    ) -> LMOutput:
        """Forward and backward (forward only unless `train`) of one batch: `input_ids`, `labels` [1, rows*T]
        packed with `cu_seqlens`, or [rows, T]. The output, the same on every pipeline rank, has detached losses: the
        batch's mean CE, the aux loss (summed over stages, mean over micro-batches) and the expert load of every MoE
        layer [num MoE layers, E] and its capacity drops [num MoE layers] summed over micro-batches
        (`PipelinedModel.moe_rows` are this rank's)."""
        ids_BT, labels_BT = input_ids.reshape(rows, -1), labels.reshape(rows, -1)
        if rows % self.microbatches:
            raise ValueError(f"pipeline: {rows} rows do not split into {self.microbatches} micro-batches")
        if cu_seqlens is not None:
            doc = torch.searchsorted(cu_seqlens[1:], torch.arange(ids_BT.numel(), device=ids_BT.device), right=True)
        else:
            doc = torch.arange(rows, device=ids_BT.device).repeat_interleave(ids_BT.shape[1])
        self.token_count = token_count
        for s in self.stages:
            s.aux_scale, s.records = aux_weight / self.microbatches, []
        if self._schedule is None:
            self._schedule = self._build_schedule()
        losses: list[torch.Tensor] = []
        args = (ids_BT, doc.view(rows, -1)) if self.stages[0].first else ()
        run = self._schedule.step if train else self._schedule.eval
        run(*args, target=labels_BT if self.has_last else None, losses=losses)
        lm = torch.stack(losses).sum().detach().float() if losses else torch.zeros((), device=self.device)
        for s in self.stages:  # the first step also runs each stage once to infer shapes: not a micro-batch
            s.records = s.records[-self.microbatches :]
        aux = sum((r.loss for s in self.stages for r in s.records), lm.new_zeros(())) / self.microbatches
        stats = [lm[None], aux[None]]
        L = self.model.num_moe_layers
        if L:  # this rank's rows (its MoE layers, stage by stage), zeros elsewhere; drops in the last column
            load = torch.zeros(L, self.model.cfg.moe.num_experts + 1, device=self.device)
            per_stage = [
                torch.cat(
                    [
                        torch.stack([r.load_LE for r in s.records]).sum(0).float(),
                        torch.stack([r.dropped_L for r in s.records]).sum(0).float()[:, None],
                    ],
                    1,
                )
                for s in self.stages
                if s.records
            ]
            if per_stage:
                load[self.model.moe_rows] = torch.cat(per_stage)
            stats.append(load.flatten())
        stats = torch.cat(stats)
        dist.all_reduce(stats, group=self.group)
        count = int((labels != -100).sum())
        loss = stats[0] * token_count / count if count else stats[0]  # sum of CE sums / token_count -> mean CE
        if not L:
            return LMOutput(loss, None, None, None, None)
        load = stats[2:].view(L, -1)
        return LMOutput(loss, stats[1], None, None, load[:, :-1], load[:, -1].round().long())
