"""Scale on paper: the bytes each parallel dimension moves per training step, per rank, from the model and layout.

`step_traffic(cfg, layout, tokens)` lists every collective of one step on one rank (averaged over pipeline stages):
its dimension, kind, group size and input bytes (summed over the step's calls), following what this package does:

- tp (parallel/tp.py), per layer and per n = tokens of the tp group: the mixer's input all-gather (n/tp x D) and
  o_proj's reduce-scatter (n x D), the same pair for a dense FFN and for an MoE FFN under expert tp (with
  `expert_tp=false`: one all-gather, the layer replicated over tp); backward mirrors each (all-gather <->
  reduce-scatter). Embedding: one reduce-scatter (+ its all-gather in backward); head: one all-gather (+ its
  reduce-scatter). Weights every rank holds whole but applies to its share (per-head norms, shared low-rank
  gates, the router and shared-expert gate under expert tp) all-reduce their gradients in each backward.
  loss_parallel's per-token statistics are left out (kilobytes).
- cp (parallel/cp.py), per forward call of a layer: a linear mixer all-gathers its last document's final states
  and transitions (float32: R x H x K x (V + K) for a "matrix" state [H, K, V], twice the state for a "diagonal"
  one) and, with short convolutions or token shift, the last W-1 (or 1) inputs; a softmax layer all-gathers K and
  V of the slice; backward reduce-scatters the gathered tensors (cp x the input).
- ep (parallel/ep.py): per MoE layer each routed row (tokens x top_k) goes through an all-to-all to its expert's
  rank and back, forward and backward (4 all-to-alls of rows x D); with uniform routing a fraction (ep-1)/ep leaves
  the rank. The count exchange (E integers) is left out.
- fsdp (parallel/fsdp.py): each block's parameter shard is all-gathered in forward and again in backward (the last
  block and the root stay gathered), gradients reduce-scattered in float32, per forward-backward; shards are padded
  so that dim 0 divides the shard count, as FSDP2 does. Experts (E/ep of them on a rank, each F/tp wide under
  expert tp) are sharded over dp_shard*cp/ep ranks; HSDP adds an all-reduce of the gradient shards over
  dp_replicate.
- pp (parallel/pp.py): each stage boundary sends the activations (and int64 document indices) forward and their
  gradients backward, once per micro-batch; a rank has `virtual` stages.

Bytes moved per rank (ring algorithms): all-gather input x (g-1), reduce-scatter and all-to-all input x (g-1)/g,
all-reduce 2 x input x (g-1)/g, send input. `moved_bytes` sums them per dimension; `layout_table` prints
the table of docs/scaling.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.config import ModelConfig
from .config import ParallelConfig

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "send")


@dataclass
class Traffic:
    dim: str  # tp | cp | ep | fsdp | pp
    what: str
    kind: str  # one of KINDS
    group: int  # ranks in the collective (2 for a send)
    input_bytes: float  # this rank's input tensors, summed over the step's calls

    @property
    def moved(self) -> float:
        """Bytes this rank sends."""
        g = self.group
        factor = {
            "all_gather": g - 1,
            "reduce_scatter": (g - 1) / g,
            "all_to_all": (g - 1) / g,
            "all_reduce": 2 * (g - 1) / g,
            "send": 1.0,
        }[self.kind]
        return self.input_bytes * factor


def _meta_model(cfg: ModelConfig):
    from ..model import LinearMoEForCausalLM

    with torch.device("meta"):
        return LinearMoEForCausalLM(cfg)


def _shard_bytes(params, shards: int, nbytes: int) -> tuple[float, float]:
    """(padded shard bytes, padded full bytes) of `params` sharded on dim 0 over `shards` ranks (FSDP2)."""
    shard = sum(math.ceil(p.shape[0] / shards) * (p.numel() // max(p.shape[0], 1)) for p in params) * nbytes
    return shard, shard * shards


def step_traffic(
    cfg: ModelConfig,
    layout: ParallelConfig,
    tokens: int,
    *,
    calls: int = 1,
    act_bytes: int = 2,
    param_bytes: int = 2,
    grad_bytes: int = 4,
    rows: int = 1,
    virtual: int = 1,
) -> list[Traffic]:
    """The collectives of one training step on one rank (averaged over pipeline stages).

    `tokens`: global tokens per step; `calls`: forward-backward calls per step on a rank (gradient accumulation x
    pipeline micro-batches), each over `rows` sequences crossing the cp boundaries (1 when packed); `virtual`:
    pipeline stages per rank. Byte widths: activations, parameters as gathered (bf16 under FSDP mixed precision),
    gradients as reduced (float32)."""
    model = _meta_model(cfg)
    D, L = cfg.hidden_size, cfg.num_layers
    dp, tp, cp, ep, pp = layout.dp_replicate * layout.dp_shard, layout.tp, layout.cp, layout.ep, layout.pp
    n = tokens / dp / cp  # tokens of one rank's sequence slice (a tp group shares them)
    layers = list(model.layers)
    share = 1 / pp  # every layer's traffic lands on one of pp stages: average rank
    out: list[Traffic] = []

    def add(dim, what, kind, group, b):
        if group > 1 and b > 0:
            out.append(Traffic(dim, what, kind, group, b))

    if tp > 1:
        from .tp import summed_over_tp

        u = n / tp * D * act_bytes  # one rank's sequence slice of hidden states
        split = sum(layout.expert_tp or not b.is_moe for b in layers)  # FFNs split over tp (dense; MoE: expert tp)
        moe = L - split  # MoE layers replicated over tp (expert_tp=false)
        add("tp", "layer inputs (all-gather fwd, RS->AG bwd)", "all_gather", tp, share * (2 * L + 2 * split) * u)
        add("tp", "MoE FFN output grads (bwd)", "all_gather", tp, share * moe * u)
        add("tp", "MoE FFN inputs (fwd)", "all_gather", tp, share * moe * u)
        add("tp", "o_proj / down_proj (RS fwd, AG->RS bwd)", "reduce_scatter", tp, share * (2 * L + 2 * split) * tp * u)
        add("tp", "embedding and head", "all_gather", tp, share * 2 * u)
        add("tp", "embedding and head", "reduce_scatter", tp, share * 2 * tp * u)
        summed = sum(p.numel() for b in layers for p in summed_over_tp(b, tp, layout.expert_tp))
        add("tp", "shared weights' gradients (bwd)", "all_reduce", tp, share * calls * summed * param_bytes)
    if cp > 1:
        from .cp import exchange_numbers

        state = conv = kv = 0.0
        for b in layers:
            mixer = b.mixer
            if type(mixer).__name__ == "Attention":
                kv += 2 * rows * (mixer.num_kv_heads // tp) * (n / rows) * mixer.head_dim * act_bytes
                continue
            numbers, window = exchange_numbers(mixer)
            state += rows * numbers // tp * 4
            conv += rows * window * D * act_bytes
        for what, b in (("linear states (S, P)", state), ("short-conv / token-shift halos", conv), ("softmax K/V", kv)):
            add("cp", what, "all_gather", cp, share * calls * b)
            add("cp", what + " (bwd)", "reduce_scatter", cp, share * calls * cp * b)
    if ep > 1:
        k = cfg.moe.top_k
        moe = sum(b.is_moe for b in layers)
        add(
            "ep",
            "routed rows to experts and back, fwd + bwd",
            "all_to_all",
            ep,
            share * moe * 4 * n * k * D * act_bytes,
        )
    fsdp = layout.dp_shard * cp
    if fsdp > 1 or layout.dp_replicate > 1:
        efsdp = fsdp // ep
        blocks_ag = blocks_rs = experts_ag = experts_rs = 0.0
        for i, b in enumerate(layers):
            expert = list(b.ffn.experts.parameters()) if b.is_moe else []
            dense = [p for p in b.parameters() if all(p is not e for e in expert)]
            times = 2 if i < L - 1 else 1  # resharded after forward: gathered again in backward
            s, f = _shard_bytes([_tp_shard(p, tp) for p in dense], fsdp, param_bytes)
            blocks_ag += times * s
            blocks_rs += f / param_bytes * grad_bytes
            if expert:
                s, f = _shard_bytes([_expert_shard(p, ep, tp, layout.expert_tp) for p in expert], efsdp, param_bytes)
                experts_ag += times * s
                experts_rs += f / param_bytes * grad_bytes
        root = [p for name, p in model.named_parameters() if not name.startswith("layers.")]
        s, f = _shard_bytes([_tp_shard(p, tp) for p in root], fsdp, param_bytes)
        add("fsdp", "dense parameters", "all_gather", fsdp, calls * (share * blocks_ag + s / pp))
        add(
            "fsdp",
            "dense gradients",
            "reduce_scatter",
            fsdp,
            calls * (share * blocks_rs + f / param_bytes * grad_bytes / pp),
        )
        add("fsdp", "expert parameters", "all_gather", efsdp, calls * share * experts_ag)
        add("fsdp", "expert gradients", "reduce_scatter", efsdp, calls * share * experts_rs)
        if layout.dp_replicate > 1:
            grads = (blocks_rs * share + f / param_bytes * grad_bytes / pp) / fsdp + experts_rs * share / max(efsdp, 1)
            add("fsdp", "HSDP gradient shards", "all_reduce", layout.dp_replicate, grads)
    if pp > 1:
        per_token = 2 * D * act_bytes + 8  # activations forward, their gradients backward, document indices
        boundaries = (pp * virtual - 1) / pp  # stage boundaries per rank, averaged
        add("pp", "activations and gradients between stages", "send", 2, boundaries * n * per_token)
    return out


def _tp_shard(p: torch.Tensor, tp: int) -> torch.Tensor:
    """A meta tensor of `p`'s tp shard size (dim 0 split; a stand-in for the mixed colwise/rowwise split)."""
    return torch.empty(
        math.ceil(p.shape[0] / tp) if tp > 1 and p.shape[0] % tp == 0 else p.shape[0], *p.shape[1:], device="meta"
    )


def _expert_shard(p: torch.Tensor, ep: int, tp: int, expert_tp: bool) -> torch.Tensor:
    """Experts w13 [E, D, 2F] / w2 [E, F, D] split over ep ranks and, under expert tp, their width F over tp: this
    rank's [E/ep, D, 2F/tp] / [E/ep, F/tp, D] (stand-in: the last two dims' product divided by tp)."""
    width = tp if expert_tp else 1
    return torch.empty(p.shape[0] // ep, p.shape[1] * p.shape[2] // width, device="meta")


def moved_bytes(traffic: list[Traffic]) -> dict[str, float]:
    """Bytes each rank sends per step, per dimension."""
    total: dict[str, float] = {}
    for t in traffic:
        total[t.dim] = total.get(t.dim, 0.0) + t.moved
    return total


# ---------------------------------------------------------------- time on paper (docs/scaling.md)

GPUS_PER_NODE = 8
NVLINK_BPS = 360e9  # H200 NVLink 4: 450 GB/s per direction per GPU; ~80% reached by NCCL rings
IB_BPS = 40e9  # 8 x 400 Gb/s InfiniBand per node: 50 GB/s per GPU per direction; ~80% reached
PEAK_FLOPS, MFU = 989e12, 0.4  # H200 dense bf16, and the fraction a good step reaches
MESH_ORDER = ("tp", "cp", "dp_shard", "dp_replicate", "pp")  # innermost first, as parallel/mesh.py lays them out


def _stride(layout: ParallelConfig, dim: str) -> int:
    """Rank distance between neighbours of a dimension's group (ep sits next to tp, inside dp_shard * cp)."""
    if dim in ("ep", "fsdp"):
        return layout.tp
    inner = MESH_ORDER[: MESH_ORDER.index(dim)]
    return math.prod(getattr(layout, d) for d in inner)


def bandwidth(layout: ParallelConfig, t: Traffic) -> float:
    """NVLink when the collective's group fits in one node, else InfiniBand."""
    dim = {"fsdp": "fsdp"}.get(t.dim, t.dim)
    if t.kind == "all_reduce":  # HSDP: across replicas
        dim = "dp_replicate"
    span = _stride(layout, dim) * (t.group if t.kind != "send" else 2)
    return NVLINK_BPS if span <= GPUS_PER_NODE else IB_BPS


def estimate(cfg: ModelConfig, layout: ParallelConfig, seq_len: int, tokens_per_gpu: int) -> dict[str, float]:
    """Per-rank bytes moved per step by each dimension (GB), the communication time at NVLink / InfiniBand rates
    (seconds, no overlap) and the compute time at `MFU` of the H200's peak, for `tokens_per_gpu` tokens per GPU."""
    from ..model.flops import flops_per_token

    gpus = layout.world_size
    tokens = tokens_per_gpu * gpus
    rows = 1
    traffic = step_traffic(cfg, layout, tokens, rows=rows, calls=max(1, layout.pp))
    out: dict[str, float] = {f"{d}_GB": b / 1e9 for d, b in moved_bytes(traffic).items()}
    out["comm_s"] = sum(t.moved / bandwidth(layout, t) for t in traffic)
    out["compute_s"] = tokens_per_gpu * flops_per_token(cfg, seq_len) / (PEAK_FLOPS * MFU)
    return out


TABLE_LAYOUTS = {  # gpus -> candidate layouts (dimensions other than 1)
    8: [dict(dp_shard=8), dict(dp_shard=8, ep=8), dict(dp_shard=4, tp=2, ep=4), dict(dp_shard=4, cp=2, ep=8)],
    64: [dict(dp_shard=64, ep=8), dict(dp_replicate=8, dp_shard=8, ep=8), dict(dp_replicate=4, dp_shard=8, pp=2, ep=8)],
    512: [
        dict(dp_shard=512, ep=8),
        dict(dp_replicate=64, dp_shard=8, ep=8),
        dict(dp_replicate=32, dp_shard=8, pp=2, ep=8),
        dict(dp_replicate=16, dp_shard=8, cp=4, ep=8),
    ],
}


def layout_table(presets=("A0.3B-2B", "A1B-7B"), mixer: str = "gated_deltanet", seq_len: int = 2048) -> str:
    """The markdown table of docs/scaling.md (32K tokens per GPU per step)."""
    from ..model.presets import get_preset

    dims = ("fsdp", "ep", "tp", "cp", "pp")
    lines = [
        "| preset | GPUs | layout | " + " | ".join(f"{d} GB" for d in dims) + " | comm s | compute s |",
        "|---|---|---|" + "---|" * (len(dims) + 2),
    ]
    for name in presets:
        cfg = get_preset(name).replace(mixer=mixer)
        for gpus, layouts in TABLE_LAYOUTS.items():
            for kw in layouts:
                layout = ParallelConfig(**{"dp_shard": 1, **kw})
                if layout.world_size != gpus:
                    raise ValueError(f"layout {kw} covers {layout.world_size} GPUs, not {gpus}")
                est = estimate(cfg, layout, seq_len, 32768)
                desc = " ".join(f"{k}={v}" for k, v in kw.items())
                gb = " | ".join(f"{est.get(f'{d}_GB', 0):.2f}" for d in dims)
                lines.append(f"| {name} | {gpus} | {desc} | {gb} | {est['comm_s']:.3f} | {est['compute_s']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(layout_table())
