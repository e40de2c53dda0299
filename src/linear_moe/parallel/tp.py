"""Tensor parallelism with DTensor (`parallelize_module`), Megatron-style with sequence-parallel norms.

Per block: the residual stream stays split over the sequence (`[B, T/tp, D]` on each rank); `attn_norm` and
`ffn_norm` run sequence-parallel; the mixer input is all-gathered; q/k/v (and every per-head projection: output
gate, forget gate, beta) are column-parallel, so each rank runs `H/tp` whole heads, and `o_proj` is row-parallel
with a reduce-scatter back to the sequence split. What follows the heads follows their split: depthwise short
convolutions and per-head parameters (GDN's A_log, dt_bias) are sharded on their channel / head dimension; per-head
norms keep one replicated weight whose gradient is summed over the ranks. The mixer's head-count attributes are set
to the local counts after sharding (as torchtitan does), so the mixer code runs unchanged on its heads.

Dense SwiGLU FFNs are column- then row-parallel. MoE layers are not split by tp: each rank runs the layer on the
whole (all-gathered) sequence with replicated weights and keeps its slice of the output; split the experts with
`parallel.ep` (the tp ranks then exchange tokens with their own ep peers). The embedding is vocab-parallel, the LM head column-parallel, and the loss runs under
`loss_parallel` (the plain cross-entropy path, never fla's fused one): forward and backward of a step must run
inside `loss_context(model)`.

Mixers covered: softmax attention, gla (vector decay), gated_deltanet (delta rule), lightning_attn (scalar decay,
with `norm_per_head=True`). Others are refused with a one-line error naming the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from ..layers.conv import ShortConvolution
from ..layers.norm import RMSNorm
from .checkpointing import transformer_blocks

# mixer class name -> its column-parallel (per-head) projections; o_proj is row-parallel in all of them
HEAD_PROJECTIONS = {
    "Attention": ("q_proj", "k_proj", "v_proj"),
    "GatedLinearAttention": ("q_proj", "k_proj", "v_proj", "g_proj", "gk_proj.1"),
    "GatedDeltaNet": ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj"),
    "LightningAttention": ("q_proj", "k_proj", "v_proj", "g_proj"),
}
HEAD_PARAMS = {"GatedDeltaNet": ("A_log", "dt_bias")}  # raw per-head parameters [H]: sharded on dim 0
REPLICATED_INPUTS = {"GatedLinearAttention": ("gk_proj.0",)}  # low-rank maps shared by all heads
HEAD_COUNTS = ("num_heads", "num_kv_heads", "num_v_heads", "key_dim", "value_dim")
REFUSED = {
    "MultiScaleRetention": "its per-head decays are computed from the head count (needs a per-head decay buffer)",
}


def check_tp(model: nn.Module, tp: int) -> None:
    """One-line errors for what tensor parallelism cannot split."""
    if model.cfg.tie_embeddings:
        raise ValueError("tensor parallel: tied embeddings are not supported; set model.tie_embeddings=false")
    for i, block in enumerate(transformer_blocks(model)):
        name = type(block.mixer).__name__
        if name in REFUSED:
            raise ValueError(f"tensor parallel: layer {i} mixer {name} is not supported: {REFUSED[name]}; use tp=1")
        if name not in HEAD_PROJECTIONS:
            raise ValueError(
                f"tensor parallel: layer {i} mixer {name} has no tp plan yet (covered: "
                f"{', '.join(sorted(HEAD_PROJECTIONS))}); use parallel.tp=1"
            )
        mixer = block.mixer
        if getattr(mixer, "out_norm_dim", None) not in (None, getattr(mixer, "head_v_dim", None)):
            raise ValueError(
                f"tensor parallel: layer {i} mixer {name} normalises over all heads; set mixer_kwargs.norm_per_head"
                "=true (one norm per head) or use parallel.tp=1"
            )
        for attr in HEAD_COUNTS[:3]:
            if getattr(mixer, attr, 0) % tp:
                raise ValueError(
                    f"tensor parallel: layer {i} {attr}={getattr(mixer, attr)} is not divisible by tp={tp}"
                )


class _SumGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (a replicated weight applied to this rank's
    heads only gets each rank's share)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def localize(module: nn.Module, placements: dict[str, Placement], mesh: DeviceMesh, sum_grad: bool = False) -> None:
    """Make `module`'s own parameters DTensors with `placements` on `mesh` and run its forward on their local parts
    (its code then works on the local heads unchanged). `sum_grad`: replicated weights used on sharded activations
    (per-head norms): their gradient is summed over the mesh."""
    for name, placement in placements.items():
        p = getattr(module, name)
        if p is not None and not isinstance(p, DTensor):
            dt = distribute_tensor(p.data, mesh, [placement])
            module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
    forward, group = module.forward, mesh.get_group()

    @functools.wraps(forward)
    def local_forward(*args, **kwargs):
        saved = {n: module._parameters[n] for n in placements if module._parameters.get(n) is not None}
        for n, p in saved.items():
            local = p.to_local() if isinstance(p, DTensor) else p
            module._parameters[n] = _SumGrad.apply(local, group) if sum_grad else local
        try:
            return forward(*args, **kwargs)
        finally:
            module._parameters.update(saved)

    module.forward = local_forward


def _gather_input(mesh: DeviceMesh, local: bool, module, args, kwargs):
    """The module's first input, split over the sequence (DTensor or local `[B, T/tp, D]`), all-gathered: a
    replicated DTensor for modules whose column-parallel maps take it (their input gradients then add up as partial
    sums and are reduce-scattered once), the whole local tensor `[B, T, D]` for the replicated MoE layer."""
    x = args[0]
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Shard(1)])
    x = x.redistribute(mesh, [Replicate()])
    return (x.to_local() if local else x, *args[1:]), kwargs


def _shard_moe_output(mesh: DeviceMesh, module, args, output):
    y, aux = output
    return DTensor.from_local(y, mesh, [Replicate()]).redistribute(mesh, [Shard(1)]).to_local(), aux


def _apply_mixer(mixer: nn.Module, mesh: DeviceMesh) -> None:
    tp = mesh.size()
    name = type(mixer).__name__
    plan = {p: ColwiseParallel() for p in HEAD_PROJECTIONS[name]}
    plan["o_proj"] = RowwiseParallel(output_layouts=Shard(1))
    parallelize_module(mixer, mesh, plan)
    mixer.register_forward_pre_hook(functools.partial(_gather_input, mesh, False), with_kwargs=True)
    if name == "LightningAttention":  # per-head decays follow the heads
        decay = mixer.log_decay()
        rank = mesh.get_local_rank()
        mixer.log_decay = lambda device=None: decay.chunk(tp)[rank].to(device)
    if name in HEAD_PARAMS:
        localize(mixer, {p: Shard(0) for p in HEAD_PARAMS[name]}, mesh)
    for sub in REPLICATED_INPUTS.get(name, ()):  # runs on the replicated DTensor input, as DTensor ops
        distribute_module(mixer.get_submodule(sub), mesh)
    for m in mixer.modules():
        if isinstance(m, ShortConvolution):
            localize(m, {"weight": Shard(0), "bias": Shard(0)}, mesh)
            m.dim //= tp
        elif isinstance(m, RMSNorm):  # per-head norms (GatedRMSNorm too)
            localize(m, {"weight": Replicate()}, mesh, sum_grad=True)
    for attr in HEAD_COUNTS:
        if hasattr(mixer, attr):
            setattr(mixer, attr, getattr(mixer, attr) // tp)
    if hasattr(mixer, "proj_dims"):
        mixer.proj_dims = {k: v // tp for k, v in mixer.proj_dims.items()}


def _apply_ffn(block: nn.Module, mesh: DeviceMesh, ep: int) -> None:
    if block.is_moe:
        for m in block.ffn.modules():
            if m is block.ffn.experts and ep > 1:  # split over ep by parallel/ep.py instead
                continue
            params = {n: Replicate() for n, p in m.named_parameters(recurse=False)}
            if params:
                localize(m, params, mesh)
        block.ffn.register_forward_pre_hook(functools.partial(_gather_input, mesh, True), with_kwargs=True)
        block.ffn.register_forward_hook(functools.partial(_shard_moe_output, mesh))
        return
    plan = {
        "gate_proj": ColwiseParallel(),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    parallelize_module(block.ffn, mesh, plan)
    block.ffn.register_forward_pre_hook(functools.partial(_gather_input, mesh, False), with_kwargs=True)


def apply_tp(model: nn.Module, mesh) -> None:
    """Split `model` over the mesh's "tp" dimension in place (parameter names unchanged; the split parameters are
    DTensors). Sequences (packed: B*T tokens) must divide by tp."""
    tp_mesh: DeviceMesh = mesh["tp"] if not isinstance(mesh, DeviceMesh) else mesh
    check_tp(model, tp_mesh.size())
    parallelize_module(
        model,
        tp_mesh,
        {
            "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(use_local_output=False),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        },
    )
    # the head reads the whole sequence: vocab-split logits [B, T, V/tp] for loss_parallel
    model.norm.register_forward_hook(lambda m, a, out: out.redistribute(tp_mesh, [Replicate()]))
    for block in transformer_blocks(model):
        parallelize_module(block, tp_mesh, {"attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel()})
        _apply_mixer(block.mixer, tp_mesh)
        _apply_ffn(block, tp_mesh, getattr(getattr(mesh, "cfg", None), "ep", 1))
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor) and ".experts." not in name:
            raise ValueError(f"tensor parallel: parameter {name} has no tp placement")
    model.cfg = dataclasses.replace(model.cfg, fuse_linear_cross_entropy=False)
    forward = model.forward

    @functools.wraps(forward)
    def tp_forward(input_ids, *args, **kwargs):
        if input_ids.shape[1] % tp_mesh.size():  # sequence-parallel norms split the tokens evenly
            raise ValueError(
                f"tensor parallel: {input_ids.shape[1]} tokens do not split over tp={tp_mesh.size()} ranks "
                "(decoding token by token is not supported under tp)"
            )
        out = forward(input_ids, *args, **kwargs)
        if isinstance(out.loss, DTensor):
            out.loss = out.loss.to_local()
        if out.loss is not None:  # as with the fused loss: no [B, T, V] logits gathered when training
            out.logits = None
        elif isinstance(out.logits, DTensor):
            out.logits = out.logits.full_tensor()
        return out

    model.forward = tp_forward
    model.tensor_parallel = tp_mesh


def loss_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context a training step's forward and backward run in: `loss_parallel` for a tensor-parallel model."""
    return loss_parallel() if getattr(model, "tensor_parallel", None) is not None else contextlib.nullcontext()
