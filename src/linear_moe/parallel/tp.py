"""Tensor parallelism with DTensor, Megatron-style with sequence-parallel norms.

Per block: the residual stream stays split over the sequence (`[B, T/tp, D]` on each rank); `attn_norm` and
`ffn_norm` run sequence-parallel; the mixer input is all-gathered and each rank runs the mixer's own code on `H/tp`
whole heads. Every parameter of the mixer becomes a DTensor placed by the mixer's plan (`PLANS`, one entry per
mixer class), and the mixer runs on the local parts:

- split with the heads (`Shard(0)`): the per-head projections (column-parallel q, k, v, output and forget gates,
  beta, the up half of a low-rank gate, Mamba2's z, x and dt), per-head and per-channel parameters (GDN's and
  Mamba2's `A_log` / `dt_bias`, Mamba2's `D`, RWKV's `bonus`, `k_k`, `r_k`, HGRN's forget-gate floor); depthwise
  short convolutions and per-head GroupNorms follow their channels, found by type;
- shared (`Replicate`): weights that every rank applies to its own heads (per-head RMSNorms, feature maps) or to
  the whole input (GLA's and RWKV's low-rank down projections, RWKV's token-shift lerps); a rank's gradient is its
  heads' share, summed over the ranks in backward;
- split with the groups or shared (`MixerPlan.groups`): weights of groups of consecutive heads, Mamba2's B and C
  projections and convolutions (head h reads group h // (H/G)): split when tp divides the G groups (a rank's heads
  read only its own G/tp groups), else shared (each rank computes all G and its heads pick theirs from
  `head_offset`), as any shared weight;
- `o_proj` is row-parallel with a reduce-scatter back to the sequence split; the input's gradient (each rank's
  share, like the shared weights') is reduce-scattered once.

An output norm with groups that span ranks (`Mixer.out_norm_dim` channels normalised together: one group of all
heads in lightning attention's MiniMax-01 norm, HGRN, HGRN2; Mamba2's n_groups groups when tp does not divide them)
keeps its weight split with the channels and sums each group's mean square over the ranks holding a piece of it:
each rank puts the sums of squares of its pieces in their groups' slots of one `[B, T, groups]` all-reduce per
layer. The mixer's head counts (`MixerPlan.sizes`) are set to the local counts after sharding (as torchtitan does)
and `head_offset` to the rank's first head, so per-head constants made from the head index (RetNet's and lightning
attention's decays, Mamba2's B/C group of each head) follow.

Mamba2 splits like the others because of how its parameters are laid out. fla's and mamba-ssm's fused `in_proj`
([z, x, B, C, dt] rows) and `conv1d` ([x, B, C] channels) would put one rank's heads in several row blocks of one
weight, which no DTensor `Shard` describes: re-laying the rows per rank (as Megatron does) makes a parameter's
global layout depend on tp, so DCP checkpoints no longer move between layouts; and with n_groups < tp the B/C rows
must be shared while the rest is split, which one tensor cannot be. Our Mamba2 holds separate z/x/B/C/dt
projections and x/B/C convolutions instead (the same function: a depthwise convolution splits by channel;
`mixers/mamba2.py` converts to and from the fused layout), so every parameter has one name and one global shape
under every tp.

Dense SwiGLU FFNs are column- then row-parallel the same way. MoE layers (expert tensor parallelism, the MoE section
below; `expert_tp`, on by default): each rank routes every token of the all-gathered sequence with the whole
router (the same routing, drops, loads and balance losses on every rank, those of one process) through its slice of
every expert's width: `w13` [E, D, 2F] (gate | up) as `_StridedShard(2, split_factor=2)`, so its local part is
its gate and up columns side by side, `w2` split on F, shared experts as a dense SwiGLU; the partial outputs are
reduce-scattered back to the sequence split (one reduce-scatter, instead of keeping a slice of a replicated
output). The strided shard keeps `w13`'s name and global shape, so checkpoints move between layouts
(`parallel/strided.py` writes it to DCP as plain column blocks). With `parallel.ep` the experts are split over
(ep, tp) by `parallel/ep.py`, and each tp rank exchanges tokens with the ep peers of its tp index. `expert_tp=False`
keeps the layer replicated: whole weights on every rank, its slice of the output kept. The embedding is
vocab-parallel, the LM head column-parallel (tied: one `[V, D]` weight split on the vocabulary serves both), and
the loss runs under `loss_parallel` (the plain cross-entropy path, never fla's fused one): forward and backward of a
step must run inside `loss_context(model)`.

Mixers covered: softmax attention, retnet, gla, lightning_attn, linear_attn, based, rebased, deltanet,
gated_deltanet, mamba2, hgrn, hgrn2, rwkv6, rwkv7. Refused with a one-line reason: a mixer without a plan, a
parameter its plan does not place, head or channel counts that tp does not divide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from ..layers.conv import ShortConvolution
from ..layers.norm import RMSNorm
from .checkpointing import moe_layers, transformer_blocks

HEAD_COUNTS = ("num_heads", "num_kv_heads", "num_v_heads", "key_dim", "value_dim")


@dataclasses.dataclass(frozen=True)
class MixerPlan:
    """How tp splits one mixer class. Entries are parameter or module paths inside the mixer (a module: all of its
    parameters); entries absent from a mixer (options turned off) are skipped. Found by type, not listed: short
    convolutions and GroupNorms (one group per head) are split with their channels; RMSNorms are per head (shared),
    except an output norm over all heads (split with its channels, its mean square summed over the ranks)."""

    heads: tuple[str, ...]  # split with the heads on dim 0 (column-parallel projections, per-head parameters)
    shared: tuple[str, ...] = ()  # the same on every rank, gradient summed over the ranks
    sizes: tuple[str, ...] = HEAD_COUNTS  # attributes counting heads or channels: divided by tp
    out: str = "o_proj"  # the row-parallel output projection
    # weights of groups of consecutive heads (Mamba2's B/C): split with the groups on dim 0 when tp divides the
    # group count (each rank's heads then read its own groups), else shared (a group serves heads of several ranks)
    groups: tuple[str, ...] = ()
    num_groups: str = "n_groups"  # the attribute counting those groups: divided by tp when they are split


QKV = ("q_proj", "k_proj", "v_proj")
RWKV7_LORAS = ("w_lora", "a_lora", "g_lora", "v_lora")
PLANS = {
    "Attention": MixerPlan(QKV),
    "MultiScaleRetention": MixerPlan((*QKV, "g_proj")),
    "GatedLinearAttention": MixerPlan((*QKV, "g_proj", "gk_proj.1"), shared=("gk_proj.0",)),
    "LightningAttention": MixerPlan((*QKV, "g_proj")),
    "LinearAttention": MixerPlan(QKV, shared=("feature_map_q", "feature_map_k")),
    "BasedLinearAttention": MixerPlan(QKV, shared=("feature_map",)),
    "ReBasedLinearAttention": MixerPlan(QKV, shared=("feature_map",)),
    "DeltaNet": MixerPlan((*QKV, "b_proj", "g_proj")),
    "GatedDeltaNet": MixerPlan((*QKV, "g_proj", "a_proj", "b_proj", "A_log", "dt_bias")),
    # element-wise: the channels are split, `num_heads` means nothing
    "HGRNAttention": MixerPlan(("i_proj", "f_proj", "g_proj", "lower_bound_logit"), sizes=("input_dim",)),
    "HGRN2Attention": MixerPlan(("q_proj", "f_proj", "i_proj", "lower_bound_logit"), sizes=("num_heads", "forget_dim")),
    "RWKV6Attention": MixerPlan(
        ("r_proj.linear", "w_proj.linear.lora.2", "k_proj.linear", "v_proj.linear", "g_proj.linear", "bonus"),
        shared=("x_proj", "x_bias", "w_proj.linear.lora.0"),
    ),
    "RWKV7Attention": MixerPlan(
        ("r_proj", "k_proj", "v_proj", "k_k", "k_a", "r_k", *(f"{n}.lora.2" for n in RWKV7_LORAS)),
        shared=("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", *(f"{n}.lora.0" for n in RWKV7_LORAS)),
    ),
    # x_conv1d follows its channels by type; the norm's weight is per channel ([I])
    "Mamba2": MixerPlan(
        ("z_proj", "x_proj", "dt_proj", "dt_bias", "A_log", "D", "norm"),
        groups=("b_proj", "c_proj", "b_conv1d", "c_conv1d"),
        sizes=("num_heads", "intermediate_size"),
        out="out_proj",
    ),
}


def _matches(path: str, entries: tuple[str, ...]) -> bool:
    return any(path == e or path.startswith(e + ".") for e in entries)


def _spanning_norm(mixer: nn.Module, plan: MixerPlan, tp: int) -> nn.Module | None:
    """The output norm (`Mixer.out_norm_name`) when one of its groups of `out_norm_dim` channels spans ranks (a norm
    over all heads; Mamba2's with fewer groups than ranks), else None."""
    if mixer.out_norm_name is None or (mixer.get_submodule(plan.out).in_features // tp) % mixer.out_norm_dim == 0:
        return None
    return getattr(mixer, mixer.out_norm_name)


def _groups_split(mixer: nn.Module, plan: MixerPlan, tp: int) -> bool:
    return bool(plan.groups) and getattr(mixer, plan.num_groups) % tp == 0


def _placements(mixer: nn.Module, plan: MixerPlan, tp: int) -> dict[str, Placement]:
    """Every parameter of `mixer` outside its output projection -> Shard(0) (split with the heads or groups) or
    Replicate (shared); a one-line error for a parameter the plan does not place."""
    span = _spanning_norm(mixer, plan, tp)
    by_group = Shard(0) if _groups_split(mixer, plan, tp) else Replicate()
    out = {}
    for mod_name, m in mixer.named_modules():
        if _matches(mod_name, (plan.out,)):
            continue
        for p_name, _ in m.named_parameters(recurse=False):
            path = f"{mod_name}.{p_name}" if mod_name else p_name
            if _matches(path, plan.groups):
                out[path] = by_group
            elif _matches(path, plan.heads) or m is span or isinstance(m, (ShortConvolution, nn.GroupNorm)):
                out[path] = Shard(0)
            elif _matches(path, plan.shared) or isinstance(m, RMSNorm):  # RMSNorm: per head (span is over all)
                out[path] = Replicate()
            else:
                raise ValueError(
                    f"tensor parallel: {type(mixer).__name__}.{path} has no placement in its plan (parallel/tp.py "
                    "PLANS); add it there or use parallel.tp=1"
                )
    return out


def _check_mixer(mixer: nn.Module, tp: int, where: str) -> tuple[MixerPlan, dict[str, Placement]]:
    name = type(mixer).__name__
    if name not in PLANS:
        raise ValueError(
            f"tensor parallel: {where} mixer {name} has no tp plan (covered: {', '.join(sorted(PLANS))}); "
            "use parallel.tp=1"
        )
    plan = PLANS[name]
    for attr in plan.sizes:
        if getattr(mixer, attr, 0) % tp:
            raise ValueError(f"tensor parallel: {where} {attr}={getattr(mixer, attr)} is not divisible by tp={tp}")
    return plan, _placements(mixer, plan, tp)


def check_tp(model: nn.Module, tp: int) -> None:
    """One-line errors for what tensor parallelism cannot split."""
    for i, block in enumerate(transformer_blocks(model)):
        _check_mixer(block.mixer, tp, f"layer {i}")


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


class _AllReduceShares(torch.autograd.Function):
    """Sum over the group, forward and backward: each rank uses the sum for its own heads only, so the gradient
    arriving on a rank is that rank's share."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def localize(module: nn.Module, placements: dict[str, Placement], mesh: DeviceMesh, sum_grad: bool = False) -> None:
    """Make the parameters `placements` names (paths inside `module`) DTensors with those placements on `mesh`, and
    run `module`'s forward on their local parts (its code then works on the local heads unchanged, reading
    submodules' weights directly too). `sum_grad`: replicated weights are used on this rank's share of the work, so
    their gradient is summed over the mesh."""
    owners = []
    for path, placement in placements.items():
        owner_path, _, name = path.rpartition(".")
        owner = module.get_submodule(owner_path)
        p = owner._parameters.get(name)
        if p is None:
            continue
        if not isinstance(p, DTensor):
            dt = distribute_tensor(p.data, mesh, [placement])
            owner.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        owners.append((owner, name, sum_grad and placement.is_replicate()))
    forward, group = module.forward, mesh.get_group()

    @functools.wraps(forward)
    def local_forward(*args, **kwargs):
        saved = [(owner, name, owner._parameters[name]) for owner, name, _ in owners]
        for owner, name, summed in owners:
            p = owner._parameters[name]
            local = p.to_local() if isinstance(p, DTensor) else p
            owner._parameters[name] = _SumGrad.apply(local, group) if summed else local
        try:
            return forward(*args, **kwargs)
        finally:
            for owner, name, p in saved:
                owner._parameters[name] = p

    module.forward = local_forward


def _norm_pieces(start: int, width: int, group: int) -> tuple[int, list[int]]:
    """Channels [start, start + width) cut where a norm group of `group` channels ends: (the first piece's group,
    the pieces' widths)."""
    widths, c = [], start
    while c < start + width:
        end = min((c // group + 1) * group, start + width)
        widths.append(end - c)
        c = end
    return start // group, widths


def _spanning_rms_norm(norm: nn.Module, group: dist.ProcessGroup, rank: int, width: int, norm_dim: int, groups: int):
    """The forward of an RMSNorm (or GatedRMSNorm, gate after the norm) over groups of `norm_dim` channels of which
    some span ranks (one group of all heads; Mamba2's n_groups < tp), run on this rank's `width` channels: each
    piece of the local channels in one group adds its sum of squares to that group's slot of a `[B, T, groups]`
    all-reduce; the rest is `RMSNorm` / `rms_norm_gated_torch` on the local channels."""
    first, widths = _norm_pieces(rank * width, width, norm_dim)

    def forward(x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        pieces = x.to(acc).split(widths, -1)
        ss_BTg = torch.cat([p.square().sum(-1, keepdim=True) for p in pieces], -1)
        ss_BTG = F.pad(ss_BTg, (first, groups - first - len(widths)))  # zero for the groups other ranks hold
        ms_BTg = _AllReduceShares.apply(ss_BTG, group)[..., first : first + len(widths)] / norm_dim
        y = torch.cat([p * torch.rsqrt(ms_BTg[..., i : i + 1] + norm.eps) for i, p in enumerate(pieces)], -1)
        if norm.weight is not None:
            y = y * norm.weight.to(acc)
        if g is not None:
            g = g.to(acc)
            y = y * (F.silu(g) if norm.activation == "swish" else torch.sigmoid(g))
        return y.to(x.dtype)

    return forward


def _gather_input(mesh: DeviceMesh, grad: Placement, module, args, kwargs):
    """The module's first input, split over the sequence (DTensor or local `[B, T/tp, D]`), all-gathered to the
    whole local `[B, T, D]`. `grad`: what its gradient is on each rank: Partial() for a mixer or FFN split over
    heads or columns (each rank's share; the shares are reduce-scattered once), Replicate() for the MoE layer (the
    same whole gradient on every rank)."""
    x = args[0]
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Shard(1)])
    return (x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[grad]), *args[1:]), kwargs


def _shard_moe_output(mesh: DeviceMesh, module, args, output):
    y, aux = output
    return DTensor.from_local(y, mesh, [Replicate()]).redistribute(mesh, [Shard(1)]).to_local(), aux


def _apply_mixer(mixer: nn.Module, mesh: DeviceMesh) -> None:
    tp, rank = mesh.size(), mesh.get_local_rank()
    plan, placements = _check_mixer(mixer, tp, f"layer {mixer.layer_idx}")
    span = _spanning_norm(mixer, plan, tp)
    channels = mixer.get_submodule(plan.out).in_features
    parallelize_module(mixer, mesh, {plan.out: RowwiseParallel(output_layouts=Shard(1))})
    mixer.register_forward_pre_hook(functools.partial(_gather_input, mesh, Partial()), with_kwargs=True)
    if span is not None:  # reads its weight at call time: the local part, under localize
        width, norm_dim = channels // tp, mixer.out_norm_dim
        span.forward = _spanning_rms_norm(span, mesh.get_group(), rank, width, norm_dim, channels // norm_dim)
        mixer.out_norm_dim = width  # the local channels go to the norm as one piece
    if _groups_split(mixer, plan, tp):
        setattr(mixer, plan.num_groups, getattr(mixer, plan.num_groups) // tp)
    localize(mixer, placements, mesh, sum_grad=True)
    for name, m in mixer.named_modules():
        if isinstance(m, ShortConvolution) and placements[f"{name}.weight"].is_shard():
            m.dim //= tp
        elif isinstance(m, nn.GroupNorm):  # one group per head
            m.num_groups, m.num_channels = m.num_groups // tp, m.num_channels // tp
    for attr in plan.sizes:
        if hasattr(mixer, attr):
            setattr(mixer, attr, getattr(mixer, attr) // tp)
    if "num_heads" in plan.sizes:
        mixer.head_offset = rank * mixer.num_heads


def _apply_ffn(block: nn.Module, mesh: DeviceMesh, ep: int, expert_tp: bool) -> None:
    if block.is_moe:
        _apply_moe(block.ffn, mesh, ep, expert_tp)
        return
    parallelize_module(block.ffn, mesh, {"down_proj": RowwiseParallel(output_layouts=Shard(1))})
    localize(block.ffn, {"gate_proj.weight": Shard(0), "up_proj.weight": Shard(0)}, mesh)
    block.ffn.register_forward_pre_hook(functools.partial(_gather_input, mesh, Partial()), with_kwargs=True)


# ---------------------------------------------------------------- MoE layers (expert tensor parallelism)

# Under expert tp each rank holds the same slice of every expert's FFN width. w13 [E, D, 2F] fuses gate | up on its
# last dim: `_StridedShard(2, split_factor=2)` gives rank r the columns [r F/tp, (r+1) F/tp) of both halves, so the
# local [E, D, 2F/tp] is again gate_r | up_r and `GroupedExperts` runs unchanged on it; w2 [E, F, D] is split on F.
# The parameters keep their names and global shapes: DCP stores the same tensors as at tp=1 (parallel/strided.py
# writes the strided shard as plain column blocks), so checkpoints move between layouts.
EXPERT_TP: dict[str, Placement] = {"w13": _StridedShard(2, split_factor=2), "w2": Shard(1)}
MOE_TP: dict[str, Placement] = {  # the MoE layer's other parameters, run on their local parts (`localize`)
    "router.weight": Replicate(),  # every rank routes every token alike; its gradient shares are summed
    "shared_experts.gate_proj.weight": Shard(0),  # shared experts: column- then row-parallel, as a dense FFN
    "shared_experts.up_proj.weight": Shard(0),
    "shared_experts.down_proj.weight": Shard(1),
    "shared_expert_gate.weight": Replicate(),  # scales this rank's partial shared output: gradient shares summed
}


def check_expert_tp(model: nn.Module, tp: int) -> None:
    """One-line errors for MoE widths that tp does not divide."""
    for moe in moe_layers(model):
        for name, width in (
            ("expert_ffn_hidden_size", moe.cfg.expert_ffn_hidden_size),
            ("shared_expert_ffn_hidden_size", moe.cfg.shared_ffn_size),
        ):
            if width % tp:
                raise ValueError(
                    f"tensor parallel: model.moe.{name}={width} is not divisible by tp={tp} (each tp rank holds a "
                    "slice of every expert); change it or set parallel.expert_tp=false"
                )


def summed_over_tp(block: nn.Module, tp: int, expert_tp: bool = True) -> list[nn.Parameter]:
    """The block's parameters that every tp rank holds whole but applies to its own share of the work (the mixer's
    shared weights; under expert tp the router and the shared-expert gate): their gradients are all-reduced over
    tp in every backward (parallel/scaling.py counts them)."""
    _, placements = _check_mixer(block.mixer, tp, "")
    params = [block.mixer.get_parameter(path) for path, p in placements.items() if p.is_replicate()]
    if block.is_moe and expert_tp:
        own = dict(block.ffn.named_parameters())
        params += [own[path] for path, p in MOE_TP.items() if p.is_replicate() and path in own]
    return params


class _ShareGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by `n`: a loss that every one of n ranks computes whole (the
    aux loss of a MoE layer run on the all-gathered sequence) then contributes each rank's share, like the rest of
    the layer's gradients, whose shares are summed over the ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g / ctx.n, None


def _reduce_moe_output(mesh: DeviceMesh, module, args, output):
    """The rank's partial output (its slice of every routed and shared expert) summed over the ranks and split over
    the sequence, one reduce-scatter (its backward: one all-gather of the output gradient); the aux loss's gradient
    becomes this rank's share."""
    y, aux = output
    y = DTensor.from_local(y, mesh, [Partial()]).redistribute(mesh, [Shard(1)]).to_local()
    return y, dataclasses.replace(aux, loss=_ShareGrad.apply(aux.loss, mesh.size()))


def _apply_moe(moe: nn.Module, mesh: DeviceMesh, ep: int, expert_tp: bool) -> None:
    """Expert tp (`expert_tp`): each rank runs the layer on the all-gathered sequence with the whole router (the same
    routing, drops and loads on every rank) and its slice of every expert's width, and the partial outputs are
    reduce-scattered; gradients are shares (the input's reduce-scattered once, the router's and the shared gate's
    summed, the aux loss's 1/tp on each rank). With ep > 1 the routed experts are split over (ep, tp) by
    parallel/ep.py. Without expert tp the layer runs replicated: whole weights, the whole output's slice kept."""
    if not expert_tp:
        for m in moe.modules():
            if m is moe.experts and ep > 1:  # split over ep by parallel/ep.py instead
                continue
            params = {n: Replicate() for n, p in m.named_parameters(recurse=False)}
            if params:
                localize(m, params, mesh)
        moe.register_forward_pre_hook(functools.partial(_gather_input, mesh, Replicate()), with_kwargs=True)
        moe.register_forward_hook(functools.partial(_shard_moe_output, mesh))
        return
    placements = {}
    for name, _ in moe.named_parameters():
        if name.startswith("experts."):
            continue
        if name not in MOE_TP:
            raise ValueError(
                f"tensor parallel: MoE parameter {name} has no placement (parallel/tp.py MOE_TP); add it there or "
                "set parallel.expert_tp=false"
            )
        placements[name] = MOE_TP[name]
    localize(moe, placements, mesh, sum_grad=True)
    if ep == 1:
        for name, placement in EXPERT_TP.items():
            weight = getattr(moe.experts, name)
            setattr(moe.experts, name, nn.Parameter(distribute_tensor(weight.detach(), mesh, [placement])))
    moe.register_forward_pre_hook(functools.partial(_gather_input, mesh, Partial()), with_kwargs=True)
    moe.register_forward_hook(functools.partial(_reduce_moe_output, mesh))


def apply_tp(model: nn.Module, mesh, expert_tp: bool = True) -> None:
    """Split `model` over the mesh's "tp" dimension in place (parameter names unchanged; the split parameters are
    DTensors). Sequences (packed: B*T tokens) must divide by tp. `expert_tp`: split every expert's FFN width over
    the tp ranks (False: run the MoE layers replicated over tp)."""
    tp_mesh: DeviceMesh = mesh["tp"] if not isinstance(mesh, DeviceMesh) else mesh
    check_tp(model, tp_mesh.size())
    if expert_tp:
        check_expert_tp(model, tp_mesh.size())
    parallelize_module(
        model,
        tp_mesh,
        {
            "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(use_local_output=False),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        },
    )
    if model.cfg.tie_embeddings:  # both split the [V, D] weight on the vocabulary: one DTensor serves both
        model.lm_head.weight = model.embed_tokens.weight
    # the head reads the whole sequence: vocab-split logits [B, T, V/tp] for loss_parallel
    model.norm.register_forward_hook(lambda m, a, out: out.redistribute(tp_mesh, [Replicate()]))
    for block in transformer_blocks(model):
        parallelize_module(block, tp_mesh, {"attn_norm": SequenceParallel(), "ffn_norm": SequenceParallel()})
        _apply_mixer(block.mixer, tp_mesh)
        _apply_ffn(block, tp_mesh, getattr(getattr(mesh, "cfg", None), "ep", 1), expert_tp)
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
