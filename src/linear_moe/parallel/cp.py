"""Context parallelism: the sequence of a step split over `cp` ranks, LASP-2 style (arXiv:2502.07563).

Each rank holds one contiguous slice of the packed sequence and runs every layer on it. A linear mixer's state
S [K, V] (per head) evolves linearly in its initial state, so over a slice

    S_final(S0) = P S0 + S_final(0),        P [K, K] the slice's transition

(a scalar decay makes P a multiple of I, a vector decay a diagonal, the delta rule a full matrix). Each rank gets
S_final(0) and P of its last document by running the mixer once more on that document with a zero initial state
and with identity blocks as initial states (the difference is P; no knowledge of the family is needed), all-gathers
the pairs (communication per layer: cp * H * K * (K + V) numbers, independent of the sequence length), combines the
earlier ranks' pairs into its own initial state, and runs its slice with that state through the mixer's explicit
`state` argument. Everything else a state carries comes from the previous rank: short-convolution states from its
last W-1 mixer inputs (all-gathered, run through the mixer as a halo), RoPE offsets (`pos`) from the global
document layout. Softmax attention layers of hybrid stacks all-gather K/V of the documents that cross into a rank
and pass them as a KV cache. A document boundary (cu_seqlens) resets whatever is carried.

Gradients flow through the all-gathers (functional collectives), so each rank's loss share backpropagates into the
slices of the earlier ranks; the trainer sums gradients over the `dp_cp` ranks as for data parallelism.

Applied from outside the layers: `apply_cp(model, mesh)` wraps each mixer's `forward`; `shard_batch` cuts a batch
into this rank's slice; the slice's layout travels on its local `cu_seqlens` tensor (attribute `cp_layout`), so the
wrappers need no per-step state (an unpacked batch of whole rows needs no layout). fla's own context parallelism
(`fla.ops.cp`) needs the mixers to hand a `cp_context` to their kernels: see docs/parallel.md.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_gather_tensor_autograd
from torch.distributed.tensor import DTensor

from ..layers.conv import ShortConvolution
from ..mixers.attention import Attention
from ..mixers.base import MixerState
from .checkpointing import transformer_blocks

LINEAR_KEYS = ("recurrent",)  # states that evolve linearly in their initial value: S [H, K, V]


@dataclass
class CPLayout:
    """Where every rank's slice sits in the documents of one global batch (host ints, computed once per step).

    Per rank j: `continues[j]` its first token continues a document of rank j-1; `single[j]` no document starts
    inside the slice (after its first token); `first_offset[j]` the position of its first token in its document;
    `last_offset[j]` / `last_len[j]` the position in its document of the first token of its last document, and how
    many tokens of that document the slice holds. `rows`: sequences crossing the boundaries together (1 for a
    packed batch, B for an unpacked [B, T] batch)."""

    rank: int
    size: int
    rows: int
    local_len: int
    continues: list[bool]
    single: list[bool]
    first_offset: list[int]
    last_offset: list[int]
    last_len: list[int]

    def chain(self, r: int) -> list[int]:
        """The earlier ranks whose last document continues into rank r's first token, in order."""
        ranks: list[int] = []
        j = r - 1
        while j >= 0 and self.continues[j + 1]:
            ranks.insert(0, j)
            if not (self.single[j] and self.continues[j]):
                break
            j -= 1
        return ranks


def cp_layout(cu_seqlens: list[int] | None, total_len: int, rows: int, rank: int, size: int) -> CPLayout:
    """The layout of a batch of `total_len` tokens per row (document offsets `cu_seqlens`, None: one sequence per
    row) over `size` ranks."""
    T = total_len // size
    starts = sorted(set(cu_seqlens[:-1])) if cu_seqlens is not None else [0]
    cont, single, first, last_off, last_len = [], [], [], [], []
    for j in range(size):
        a, b = j * T, (j + 1) * T
        doc_a = starts[bisect.bisect_right(starts, a) - 1]  # start of the document holding token a
        doc_last = starts[bisect.bisect_right(starts, b - 1) - 1]  # ... holding the slice's last token
        cont.append(doc_a < a)
        single.append(doc_last <= a)
        first.append(a - doc_a)
        last_off.append(max(0, a - doc_last))
        last_len.append(b - max(a, doc_last))
    return CPLayout(rank, size, rows, T, cont, single, first, last_off, last_len)


class ContextParallel:
    """The process group of the `cp` dimension."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[*shape] on every rank -> [size, *shape] (differentiable: gradients return to their rank). A replicated
        DTensor (the input of a tensor-parallel mixer) is gathered as its local tensor."""
        if isinstance(t, DTensor):
            t = t.to_local()
        return all_gather_tensor_autograd(t.contiguous()[None], 0, self.group).view(self.size, *t.shape)


def shard_batch(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """This rank's slice of a step's batch (`input_ids`, `labels` [B, T]; cu_seqlens [N+1] with B = 1), and its
    local document offsets, which carry the slice's layout for the model's context-parallel mixers (`apply_cp`)."""
    cp: ContextParallel = model.context_parallel
    B, T = input_ids.shape
    if T % cp.size:
        raise ValueError(f"context parallel: sequence length {T} must be divisible by cp={cp.size}")
    cu = cu_seqlens.tolist() if cu_seqlens is not None else None  # one host sync per micro-batch
    layout = cp_layout(cu, T, B, cp.rank, cp.size)
    a, b = cp.rank * layout.local_len, (cp.rank + 1) * layout.local_len
    local_cu = None
    if cu is not None:
        inner = [c - a for c in cu if a < c < b]
        local_cu = torch.tensor([0, *inner, b - a], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
        local_cu.cp_layout = layout
    return input_ids[:, a:b], None if labels is None else labels[:, a:b], local_cu


def apply_cp(model: nn.Module, mesh) -> None:
    """Make every mixer of `model` context parallel over the mesh's "cp" dimension (in place; parameter names are
    unchanged). Batches then go through `shard_batch` first."""
    cp = ContextParallel(mesh["cp"].get_group())
    model.context_parallel = cp
    for block in transformer_blocks(model):
        check_supported(block.mixer)
        block.mixer.forward = functools.partial(_cp_forward, block.mixer, block.mixer.forward, cp)


def check_supported(mixer: nn.Module) -> None:
    """One-line error for a mixer whose state the state exchange does not know how to carry."""
    if isinstance(mixer, Attention):
        return
    spec = getattr(mixer, "state_spec", lambda: {})()
    unknown = [k for k in spec if k not in LINEAR_KEYS and not k.startswith("conv_") and k != "pos"]
    rec = spec.get("recurrent")
    if unknown or rec is None or len(rec.shape) != 3:
        raise ValueError(
            f"context parallel: mixer {type(mixer).__name__} keeps state {sorted(spec)}, which cp cannot carry yet "
            "(supported: a matrix state 'recurrent' [H, K, V] plus 'conv_*' and 'pos'); use parallel.cp=1"
        )


def _cp_forward(
    mixer: nn.Module,
    forward,
    cp: ContextParallel,
    x: torch.Tensor,
    state: MixerState | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_cache: bool = False,
    context=None,
) -> tuple[torch.Tensor, None]:
    if state is not None or use_cache:  # decoding is not split: every rank runs the whole input
        return forward(x, state, cu_seqlens, use_cache, context)
    if cu_seqlens is None:  # whole rows, split evenly
        lay = cp_layout(None, x.shape[1] * cp.size, x.shape[0], cp.rank, cp.size)
    else:
        lay = getattr(cu_seqlens, "cp_layout", None)
        if lay is None:
            raise ValueError("context parallel: packed batches must go through linear_moe.parallel.cp.shard_batch")
    run = functools.partial(forward, context=context)
    if isinstance(mixer, Attention):
        return _attention_forward(mixer, run, cp, lay, x, cu_seqlens), None
    return _linear_forward(mixer, run, cp, lay, x, cu_seqlens), None


def _rows_state(carried: dict[str, torch.Tensor], zero: MixerState, packed: bool) -> dict[str, torch.Tensor]:
    """The state of a slice's rows: the carried values for the first document (all rows when unpacked), zeros
    for the documents that start inside the slice."""
    if not packed:
        return {k: carried.get(k, v) for k, v in zero.items()}
    return {k: torch.cat([carried[k].to(v.dtype), v[1:]]) if k in carried else v for k, v in zero.items()}


def _conv_carry(mixer: nn.Module, run, cp: ContextParallel, lay: CPLayout, x: torch.Tensor) -> MixerState:
    """The short-convolution states at this rank's first token: the mixer run on the previous rank's last W-1
    inputs of the same document (zeros where the document starts here). {} for a mixer without convolutions."""
    widths = {m.kernel_size for m in mixer.modules() if isinstance(m, ShortConvolution)}
    if not widths:
        return {}
    r = cp.rank
    w = max(widths) - 1
    if lay.local_len < w:
        raise ValueError(f"context parallel: each rank needs at least {w} tokens for the short convolutions")
    tails = cp.gather(x[:, x.shape[1] - w :])  # [cp, R, w, D]
    # Every rank keeps the gathered tensor in its graph (times 0 where nothing is carried), so that every rank
    # joins the gather's backward collective.
    live = r > 0 and lay.continues[r]
    h = min(w, lay.last_len[r - 1]) if live else 1
    _, st = run(tails[r - 1 if live else 0, :, w - h :], use_cache=True)
    return {k: v if live else v * 0 for k, v in st.items() if k.startswith("conv_")}


def final_state_and_transition(
    mixer: nn.Module, run, x_RLD: torch.Tensor, carried: MixerState, with_transition: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_final(0) [R, H, K, V] and the transition P [R, H, K, K] (S_final(S0) = P S0 + S_final(0)) of the mixer over
    the sequences `x_RLD`, with the other state entries `carried` (conv, pos; [R, ...]): one batched run from a zero
    recurrent state and from ceil(K/V) identity blocks (P's columns; P = 0 without `with_transition`)."""
    R = x_RLD.shape[0]
    zero = mixer.init_state(R, x_RLD.device, x_RLD.dtype)
    H, K, V = zero["recurrent"].shape[1:]
    probes = -(-K // V) if with_transition else 0
    eye = torch.eye(K, probes * V, device=x_RLD.device, dtype=zero["recurrent"].dtype)  # [K, probes*V]
    blocks = eye.view(K, probes, V).permute(1, 0, 2)[:, None, None].expand(probes, R, H, K, V)
    state = {k: v.repeat(1 + probes, *[1] * (v.dim() - 1)) for k, v in _rows_state(carried, zero, False).items()}
    state["recurrent"] = torch.cat([zero["recurrent"], blocks.reshape(probes * R, H, K, V)])
    _, st = run(x_RLD.repeat(1 + probes, 1, 1), state=state)
    out_NHKV = st["recurrent"].view(1 + probes, R, H, K, V)
    s0_RHKV = out_NHKV[0]
    if not probes:
        return s0_RHKV, torch.zeros(R, H, K, K, device=x_RLD.device, dtype=s0_RHKV.dtype)
    return s0_RHKV, (out_NHKV[1:] - s0_RHKV).permute(1, 2, 3, 0, 4).reshape(R, H, K, probes * V)[..., :K]


def _linear_forward(
    mixer: nn.Module, run, cp: ContextParallel, lay: CPLayout, x: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    r = cp.rank
    packed = cu_seqlens is not None
    R = x.shape[0]
    conv = _conv_carry(mixer, run, cp, lay, x)
    zero = mixer.init_state(R, x.device, x.dtype)
    V = zero["recurrent"].shape[-1]
    # 1. this rank's last document: S_final(0) and P. The conv carry always enters (times 0 when the last
    # document starts here): the gathers' backward collectives then run in the same order on every rank.
    last_carried = {k: v if lay.single[r] else v * 0 for k, v in conv.items()}
    if "pos" in zero:
        last_carried["pos"] = torch.full_like(zero["pos"], lay.last_offset[r])
    x_last = x[:, x.shape[1] - lay.last_len[r] :]
    s0_RHKV, P_RHKK = final_state_and_transition(mixer, run, x_last, last_carried, lay.single[r])
    # 2. all-gather (S_final(0), P) and combine the earlier ranks' into this rank's initial state
    both = cp.gather(torch.cat([s0_RHKV, P_RHKK], dim=-1))  # [cp, R, H, K, V+K]
    s_in = both[0, ..., :V] * 0  # (kept in the graph on every rank, as above)
    for j in range(r):
        s_j, P_j = both[j, ..., :V], both[j, ..., V:]
        s_in = (P_j @ s_in if lay.single[j] else 0) + s_j
        if not lay.continues[j + 1]:
            s_in = s_in * 0
    # 3. the slice from its true initial state
    carried = {"recurrent": s_in, **conv}
    if "pos" in zero:
        carried["pos"] = torch.full_like(zero["pos"][:R], lay.first_offset[r])
    if packed:
        zero = mixer.init_state(len(cu_seqlens) - 1, x.device, x.dtype)
    y, _ = run(x, state=_rows_state(carried, zero, packed), cu_seqlens=cu_seqlens)
    return y


def _attention_forward(
    mixer: Attention, run, cp: ContextParallel, lay: CPLayout, x: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """All-gather K/V: each rank's last document's keys (rotated to their positions in the document) and values,
    padded to the slice length; a rank takes those of its chain of earlier ranks as a KV cache for its first
    document."""
    r = cp.rank
    R, T = x.shape[:2]
    L = lay.last_len[r]
    _, st = run(x[:, T - L :], use_cache=True)
    k_RGLD, v_RGLD = st["k"], st["v"]
    if mixer.rotary is not None and lay.last_offset[r]:
        pos = torch.full((R, L), lay.last_offset[r], device=x.device)
        k_RGLD = mixer.rotary(k_RGLD.transpose(1, 2), pos).transpose(1, 2)
    pad = (0, 0, 0, T - L)
    kv = cp.gather(torch.stack([nn.functional.pad(k_RGLD, pad), nn.functional.pad(v_RGLD, pad)]))
    ranks = lay.chain(r)
    if not ranks:  # nothing carried in; kv stays in the graph so that this rank joins the backward collective
        y, _ = run(x, cu_seqlens=cu_seqlens)
        return y + 0 * kv.sum()
    cache = torch.cat([kv[j, :, :, :, : lay.last_len[j]] for j in ranks], dim=3)  # [2, R, G, S, D]
    k, v = cache[0], cache[1]
    S = k.shape[2]
    if cu_seqlens is None:
        state = {"k": k, "v": v, "valid": torch.ones(R, S, dtype=torch.bool, device=x.device)}
    else:  # the first document continues (its cache is valid); the others start here (nothing valid)
        N = len(cu_seqlens) - 1
        fill = k.new_zeros(N - 1, *k.shape[1:])
        valid = torch.arange(N, device=x.device)[:, None].eq(0).expand(N, S).contiguous()
        state = {"k": torch.cat([k, fill]), "v": torch.cat([v, fill]), "valid": valid}
    y, _ = run(x, state=state, cu_seqlens=cu_seqlens)
    return y
