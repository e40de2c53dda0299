"""Context parallelism: the sequence of a step split over `cp` ranks, LASP-2 style (arXiv:2502.07563).

Each rank holds one contiguous slice of the packed sequence and runs every layer on it. What the mixer carries
from one token to the next is declared per state entry by its `StateSpec.kind` (mixers/base.py), and each kind
has its own way across a rank boundary:

- "matrix" S [..., K, V] (the delta rules: deltanet, gated_deltanet, RWKV-7) evolves linearly in its initial value,

      S_final(S0) = P S0 + S_final(0),        P [..., K, K] the slice's transition;

  "diagonal" (scalar or vector decays and plain sums: retnet, gla, lightning, linear_attn, based / rebased with
  their normalizer, mamba2, rwkv6, hgrn's vector state, hgrn2) evolves as S_final(S0) = d * S0 + S_final(0).
  Each rank gets S_final(0) and the transition of its last document by running the mixer once more on that
  document from zero states and from probe states (identity blocks for P: ceil(K/V) runs; ones for d: one run;
  no knowledge of the family is needed), all-gathers them in one tensor (per layer cp * (H K (K + V) or twice the
  state) numbers, independent of the sequence length), folds the earlier ranks' into its own initial states, and
  runs its slice with those through the mixer's explicit `state` argument.
- "window" (short-convolution inputs, RWKV's token shift) comes from the previous rank's last W-1 (or 1) mixer
  inputs, all-gathered and run through the mixer as a halo.
- "position" (RoPE offsets `pos`) comes from the global document layout.
- Softmax attention layers of hybrid stacks all-gather K/V of the documents that cross into a rank and pass them
  as a KV cache.

A document boundary (cu_seqlens) resets whatever is carried. The per-token `MixerContext` (RWKV-7's `v_first` of
layer 0) follows the token split: each rank's layer 0 publishes the value of its own slice, and the probe run of a
later layer gets the same tokens of it.

Gradients flow through the all-gathers (functional collectives), so each rank's loss share backpropagates into the
slices of the earlier ranks; the trainer sums gradients over the `dp_cp` ranks as for data parallelism.

Two backends (`parallel.cp_backend`). "own" is the exchange above, for every mixer. "fla" runs a mixer that
declares `fla_cp_ops()` (gated_deltanet, rwkv7) once on its slice with fla's `FLACPContext` in the MixerContext
(`fla.ops.cp`, fla 0.6.0): fla's kernels compute each rank's transition in the chunked forward itself, all-gather
one [H, K, V + K] tensor per layer, fold it, and send the previous rank's last W-1 inputs to the short convs and
the token shift; the backward runs the same in reverse. No probe runs, no halo run. It needs CUDA with fla, and
one packed row split the way fla splits it (B == 1 with cu_seqlens, rank j holding tokens [j L, (j + 1) L) with
L = total // cp: `fla_split_mismatch`). "auto" (the default) takes fla's path wherever those hold and ours
elsewhere (other mixers, CPU, unpacked rows); "fla" raises where they do not hold.

Applied from outside the layers: `apply_cp(model, mesh, backend)` wraps each mixer's `forward`; `shard_batch` cuts
a batch into this rank's slice; the slice's layout travels on its local `cu_seqlens` tensor (attribute
`cp_layout`, and `fla_cp`: fla's context for the step, built by the first layer that needs it), so the wrappers
need no per-step state (an unpacked batch of whole rows needs no layout).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_gather_tensor_autograd
from torch.distributed.tensor import DTensor

from ..mixers.attention import Attention
from ..mixers.base import STATE_KINDS, MixerContext, MixerState, StateSpec
from ..ops._dispatch import use_fla
from .checkpointing import transformer_blocks
from .config import CP_BACKENDS

LINEAR_KINDS = ("matrix", "diagonal")  # states that evolve affinely in their initial value (mixers/base.py)


@dataclass
class CPLayout:
    """Where every rank's slice sits in the documents of one global batch (host ints, computed once per step).

    Per rank j: `continues[j]` its first token continues a document of rank j-1; `single[j]` no document starts
    inside the slice (after its first token); `first_offset[j]` the position of its first token in its document;
    `last_offset[j]` / `last_len[j]` the position in its document of the first token of its last document, and how
    many tokens of that document the slice holds. `rows`: sequences crossing the boundaries together (1 for a
    packed batch, B for an unpacked [B, T] batch). `cu_seqlens`: the global document offsets (None: whole rows)."""

    rank: int
    size: int
    rows: int
    local_len: int
    continues: list[bool]
    single: list[bool]
    first_offset: list[int]
    last_offset: list[int]
    last_len: list[int]
    cu_seqlens: list[int] | None = None

    def local_offsets(self) -> list[int]:
        """This rank's document offsets within its slice (`[0, T_local]` for whole rows)."""
        a, b = self.rank * self.local_len, (self.rank + 1) * self.local_len
        return [0, *(c - a for c in self.cu_seqlens or () if a < c < b), b - a]

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
    return CPLayout(rank, size, rows, T, cont, single, first, last_off, last_len, cu_seqlens)


def fla_split_mismatch(lay: CPLayout) -> str:
    """Why fla's context parallelism would not split this batch as we do ('' when it does). fla
    (`fla.ops.cp.build_cp_context`, contiguous layout) needs one packed row (B == 1 with cu_seqlens) and gives rank j
    the tokens [j L, (j + 1) L) with L = cu_seqlens[-1] // world_size, its local offsets the global ones clamped
    to the slice with repeats removed: ours for a row of cp * local_len tokens without empty documents."""
    if lay.cu_seqlens is None or lay.rows != 1:
        return "fla's context parallelism needs one packed row (batch size 1 with cu_seqlens)"
    cu = lay.cu_seqlens
    if cu[0] != 0 or cu[-1] != lay.size * lay.local_len:
        return f"the offsets run from {cu[0]} to {cu[-1]}, not over the {lay.size * lay.local_len} tokens split"
    if any(b <= a for a, b in zip(cu, cu[1:], strict=False)):
        return "the batch has empty documents (fla's split drops their repeated offsets)"
    return ""


class ContextParallel:
    """The process group of the `cp` dimension, the backend (`CP_BACKENDS`) and the short-conv kernel size fla's
    context records (the widest of the fla-path mixers' windows + 1; None without windows)."""

    def __init__(self, group: dist.ProcessGroup, backend: str = "auto", conv_size: int | None = None):
        self.group, self.backend, self.conv_size = group, backend, conv_size
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
        local_cu = torch.tensor(layout.local_offsets(), dtype=cu_seqlens.dtype, device=cu_seqlens.device)
        local_cu.cp_layout = layout
    return input_ids[:, a:b], None if labels is None else labels[:, a:b], local_cu


def apply_cp(model: nn.Module, mesh, backend: str = "auto") -> None:
    """Make every mixer of `model` context parallel over the mesh's "cp" dimension (in place; parameter names are
    unchanged) with `backend` ("auto", "fla", "own": module docstring). Batches then go through `shard_batch`
    first."""
    mixers = [block.mixer for block in transformer_blocks(model)]
    for mixer in mixers:
        check_supported(mixer)
    check_backend(backend, mixers, next(model.parameters()).device)
    windows = [s.window for m in mixers if fla_capable(m) for s in _keys(m.state_spec(), "window").values()]
    cp = ContextParallel(mesh["cp"].get_group(), backend, max(windows) + 1 if windows else None)
    model.context_parallel = cp
    for block in transformer_blocks(model):
        block.mixer.forward = functools.partial(_cp_forward, block.mixer, block.mixer.forward, cp)


def fla_capable(mixer: nn.Module) -> bool:
    """The mixer runs under fla's context parallelism (declares `fla_cp_ops()`; softmax attention never does)."""
    return not isinstance(mixer, Attention) and bool(mixer.fla_cp_ops())


def check_backend(backend: str, mixers: list[nn.Module], device: torch.device) -> None:
    """One-line error for an unknown backend, and for "fla" where fla's kernels cannot run: off CUDA or without
    fla, or a linear mixer that declares no `fla_cp_ops()`."""
    if backend not in CP_BACKENDS:
        raise ValueError(f"context parallel: unknown backend {backend!r}; parallel.cp_backend is one of {CP_BACKENDS}")
    if backend != "fla":
        return
    fix = "use parallel.cp_backend=auto (our state exchange where fla's cannot run) or own"
    if not use_fla(torch.empty(0, device=device)):
        raise ValueError(
            f"context parallel: parallel.cp_backend=fla runs fla's CUDA kernels (flash-linear-attention installed, "
            f"LINEAR_MOE_KERNELS not torch), but the model is on {device}; {fix}"
        )
    others = sorted({type(m).__name__ for m in mixers if not isinstance(m, Attention) and not fla_capable(m)})
    if others:
        raise ValueError(
            f"context parallel: parallel.cp_backend=fla: {', '.join(others)} declares no ops that take fla's "
            f"cp_context (Mixer.fla_cp_ops: gated_deltanet, rwkv7 do); {fix}"
        )


def check_supported(mixer: nn.Module) -> None:
    """One-line error naming the state entries of a mixer that the state exchange cannot carry, and why."""
    if isinstance(mixer, Attention):
        return
    name, spec = type(mixer).__name__, mixer.state_spec()
    why = {}
    for key, s in spec.items():
        if s.kind is None:
            why[key] = "its StateSpec declares no kind"
        elif s.kind == "cache":
            why[key] = "a KV cache is exchanged only for the softmax Attention mixer"
        elif s.kind not in STATE_KINDS:
            why[key] = f"unknown kind {s.kind!r}"
        elif s.kind == "matrix" and len(s.shape) < 2:
            why[key] = f"a 'matrix' state needs a shape [..., K, V], got {list(s.shape)}"
        elif s.kind == "window" and s.window < 1:
            why[key] = f"a 'window' state needs window >= 1, got {s.window}"
    if why:
        reasons = "; ".join(f"{k!r}: {w}" for k, w in why.items())
        raise ValueError(
            f"context parallel: mixer {name} keeps state that cp cannot carry ({reasons}; kinds cp carries: "
            f"{', '.join(k for k in STATE_KINDS if k != 'cache')}); use parallel.cp=1"
        )


def _keys(spec: dict, *kinds: str) -> dict:
    return {k: s for k, s in spec.items() if s.kind in kinds}


def _cp_forward(
    mixer: nn.Module,
    forward,
    cp: ContextParallel,
    x: torch.Tensor,
    state: MixerState | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_cache: bool = False,
    context: MixerContext | None = None,
) -> tuple[torch.Tensor, None]:
    if state is not None or use_cache:  # decoding is not split: every rank runs the whole input
        return forward(x, state, cu_seqlens, use_cache, context)
    if cu_seqlens is None:  # whole rows, split evenly
        lay = cp_layout(None, x.shape[1] * cp.size, x.shape[0], cp.rank, cp.size)
    else:
        lay = getattr(cu_seqlens, "cp_layout", None)
        if lay is None:
            raise ValueError("context parallel: packed batches must go through linear_moe.parallel.cp.shard_batch")
    if isinstance(mixer, Attention):
        run = functools.partial(forward, context=context)
        return _attention_forward(mixer, run, cp, lay, x, cu_seqlens), None
    if cp.backend != "own":
        fla_context, why = fla_route(mixer, cp, lay, x, cu_seqlens)
        if fla_context is not None:
            return _fla_forward(forward, fla_context, x, cu_seqlens, context), None
        if cp.backend == "fla":
            raise ValueError(
                f"context parallel: parallel.cp_backend=fla cannot run {type(mixer).__name__} here: {why}; use "
                "parallel.cp_backend=auto (our state exchange where fla's cannot run) or own"
            )
    return _linear_forward(mixer, forward, cp, lay, x, cu_seqlens, context), None


def fla_route(
    mixer: nn.Module, cp: ContextParallel, lay: CPLayout, x: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> tuple[object | None, str]:
    """(fla's FLACPContext for this call, "") when the mixer can run this slice with fla's context parallelism,
    else (None, why not). The context is built once per step and kept on the local `cu_seqlens`. Every input of
    the decision is the same on every rank (the global layout), so all ranks take the same path: fla's collectives
    and ours never meet."""
    if not fla_capable(mixer):
        return None, f"{type(mixer).__name__} declares no ops that take fla's cp_context (Mixer.fla_cp_ops)"
    if isinstance(x, DTensor):
        return None, "a tensor-parallel mixer's input (DTensor) does not go to fla's context parallelism"
    if not use_fla(x):
        return None, f"fla's kernels run on CUDA with fla installed (LINEAR_MOE_KERNELS not torch), got {x.device}"
    why = fla_split_mismatch(lay)
    if why:
        return None, why
    _check_windows(mixer, lay)
    if not hasattr(cu_seqlens, "fla_cp"):
        cu_seqlens.fla_cp = _fla_context(cp, lay, x.device)
    return cu_seqlens.fla_cp, ""


def _fla_context(cp: ContextParallel, lay: CPLayout, device: torch.device):
    """fla's context of this step's split (fla.ops.cp.build_cp_context on the global offsets and the cp group),
    checked against our layout: its local offsets and the tokens of the first document before the slice. A
    difference is a bug of `fla_split_mismatch` (an error, not a fallback: this rank alone would leave fla's
    collectives)."""
    from fla.ops.cp import build_cp_context

    cu_cpu = torch.tensor(lay.cu_seqlens, dtype=torch.long)
    ctx = build_cp_context(cu_cpu.to(device), cp.group, conv1d_kernel_size=cp.conv_size, cu_seqlens_cpu=cu_cpu)
    ours = (lay.local_offsets(), lay.first_offset[lay.rank])
    theirs = (ctx.cu_seqlens_cpu.tolist(), ctx.pre_num_conv_tokens)
    if theirs != ours:
        raise RuntimeError(
            f"context parallel: fla splits this batch unlike cp_layout (rank {lay.rank}: local offsets and tokens "
            f"before {theirs}, ours {ours}); use parallel.cp_backend=own and report it"
        )
    return ctx


def _fla_forward(
    forward, fla_context, x: torch.Tensor, cu_seqlens: torch.Tensor, context: MixerContext | None
) -> torch.Tensor:
    """The mixer once on this rank's slice, from no state, its ops carrying every state across the ranks in fla's
    kernels (`context.cp_context`). The per-token context (v_first) is the slice's own, as on our path."""
    context = MixerContext() if context is None else context
    context.cp_context = fla_context
    try:
        y, _ = forward(x, None, cu_seqlens, False, context)
    finally:
        context.cp_context = None
    return y


def _rows_state(carried: dict[str, torch.Tensor], zero: MixerState, packed: bool) -> dict[str, torch.Tensor]:
    """The state of a slice's rows: the carried values for the first document (all rows when unpacked), zeros
    for the documents that start inside the slice."""
    if not packed:
        return {k: carried.get(k, v) for k, v in zero.items()}
    return {k: torch.cat([carried[k].to(v.dtype), v[1:]]) if k in carried else v for k, v in zero.items()}


def _window_carry(mixer: nn.Module, forward, cp: ContextParallel, lay: CPLayout, x: torch.Tensor) -> MixerState:
    """The "window" states (short-convolution inputs, token shift) at this rank's first token: the mixer run on the
    previous rank's last inputs of the same document (zeros where the document starts here). {} for a mixer
    without such states. A window state is a function of the inputs alone, so the run needs no MixerContext."""
    windows = _check_windows(mixer, lay)
    if not windows:
        return {}
    r = cp.rank
    w = max(windows.values())
    tails = cp.gather(x[:, x.shape[1] - w :])  # [cp, R, w, D]
    # Every rank keeps the gathered tensor in its graph (times 0 where nothing is carried), so that every rank
    # joins the gather's backward collective.
    live = r > 0 and lay.continues[r]
    h = min(w, lay.last_len[r - 1]) if live else 1
    _, st = forward(tails[r - 1 if live else 0, :, w - h :], use_cache=True, context=None)
    return {k: st[k] if live else st[k] * 0 for k in windows}


def _check_windows(mixer: nn.Module, lay: CPLayout) -> dict[str, int]:
    """The mixer's "window" states and their windows; one-line error when a rank holds fewer tokens than one."""
    windows = {k: s.window for k, s in _keys(mixer.state_spec(), "window").items()}
    w = max(windows.values(), default=0)
    if lay.local_len < w:
        raise ValueError(
            f"context parallel: each rank needs at least {w} tokens for {type(mixer).__name__}'s states "
            f"{sorted(windows)}, got {lay.local_len}"
        )
    return windows


def _probes(s: StateSpec) -> int:
    """Probe runs that reveal a transition: a matrix's ceil(K/V) identity blocks, one state of ones for a diagonal."""
    return -(-s.shape[-2] // s.shape[-1]) if s.kind == "matrix" else 1


def _probe_states(s: StateSpec, zero: torch.Tensor, n: int) -> torch.Tensor:
    """The initial values of `n` probe runs [n * R, *shape]: identity blocks (columns i*V .. (i+1)*V of I_K) for a
    matrix, ones then zeros for a diagonal."""
    R = zero.shape[0]
    if s.kind == "diagonal":
        blocks = torch.zeros(n, *zero.shape, device=zero.device, dtype=zero.dtype)
        blocks[0] = 1
        return blocks.flatten(0, 1)
    K, V = s.shape[-2:]
    eye = torch.eye(K, n * V, device=zero.device, dtype=zero.dtype)  # [K, n*V]
    blocks = eye.view(K, n, V).movedim(1, 0)  # [n, K, V]
    return blocks.view(n, 1, *[1] * (len(s.shape) - 2), K, V).expand(n, *zero.shape).reshape(n * R, *s.shape)


def transition_shape(s: StateSpec) -> tuple[int, ...]:
    """Per row: P [..., K, K] of a matrix state, d (the state's shape) of a diagonal one."""
    return (*s.shape[:-1], s.shape[-2]) if s.kind == "matrix" else s.shape


def apply_transition(s: StateSpec, T: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
    """The linear part of a state's evolution applied to an initial value: P @ S0 or d * S0."""
    return T @ S0 if s.kind == "matrix" else T * S0


def final_state_and_transition(
    mixer: nn.Module,
    forward,
    x_RLD: torch.Tensor,
    carried: MixerState,
    with_transition: bool = True,
    context: MixerContext | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every "matrix" / "diagonal" state of the mixer run over the sequences `x_RLD`: (S_final(0) [R, *shape],
    the transition [R, *transition_shape]) with S_final(S0) = apply_transition(T, S0) + S_final(0), given the other
    state entries `carried` ("window", "position"; [R, ...]) and the `context` of the tokens `x_RLD`. One batched
    run from zero states and from as many probe states as the widest transition needs; the states evolve each on
    its own (the StateSpec contract), so they share the probe runs. No transition (zeros) without
    `with_transition`."""
    R = x_RLD.shape[0]
    linear = _keys(mixer.state_spec(), *LINEAR_KINDS)
    zero = mixer.init_state(R, x_RLD.device, x_RLD.dtype)
    n = max(map(_probes, linear.values())) if with_transition else 0
    state = {k: v.repeat(1 + n, *[1] * (v.dim() - 1)) for k, v in _rows_state(carried, zero, False).items()}
    for k, s in linear.items():
        state[k] = torch.cat([zero[k], _probe_states(s, zero[k], n)]) if n else zero[k]
    if context is not None:
        context = context.map(lambda t: t[:, t.shape[1] - x_RLD.shape[1] :].repeat(1 + n, *[1] * (t.dim() - 1)))
    _, st = forward(x_RLD.repeat(1 + n, 1, 1), state=state, context=context)
    out = {}
    for k, s in linear.items():
        runs = st[k].reshape(1 + n, R, *s.shape)
        s0, diff = runs[0], runs[1:] - runs[0]
        if not n:
            T = s0.new_zeros(R, *transition_shape(s))
        elif s.kind == "diagonal":
            T = diff[0]
        else:  # column block i of P is the difference of probe run i: P[..., :, i*V + j] = diff[i][..., :, j]
            K = s.shape[-2]
            T = diff[: _probes(s)].movedim(0, -2).flatten(-2)[..., :K]
        out[k] = (s0, T)
    return out


def exchange_numbers(mixer: nn.Module) -> tuple[int, int]:
    """(numbers all-gathered per row for the linear states (S_final(0) and transition), window of inputs
    all-gathered for the "window" states) of one cp forward of a recurrent mixer."""
    spec = mixer.state_spec()
    states = sum(math.prod(s.shape) + math.prod(transition_shape(s)) for s in _keys(spec, *LINEAR_KINDS).values())
    return states, max((s.window for s in _keys(spec, "window").values()), default=0)


def _combine(
    cp: ContextParallel, lay: CPLayout, linear: dict[str, StateSpec], pairs: dict[str, tuple[torch.Tensor, ...]]
) -> MixerState:
    """All-gather every rank's (S_final(0), transition) pairs in one tensor and fold the earlier ranks' into this
    rank's initial states (zero where a document starts at this rank's first token)."""
    tensors = [t for k in linear for t in pairs[k]]
    parts = cp.gather(torch.cat([t.flatten(1) for t in tensors], dim=1)).split([t[0].numel() for t in tensors], -1)
    s_in = {}
    for i, (k, s) in enumerate(linear.items()):
        s_RS, T_RS = (parts[2 * i + c].reshape(cp.size, *tensors[2 * i + c].shape) for c in (0, 1))
        acc = s_RS[0] * 0  # kept in the graph on every rank, as the window carry
        for j in range(cp.rank):
            acc = (apply_transition(s, T_RS[j], acc) if lay.single[j] else 0) + s_RS[j]
            if not lay.continues[j + 1]:
                acc = acc * 0
        s_in[k] = acc
    return s_in


def _linear_forward(
    mixer: nn.Module,
    forward,
    cp: ContextParallel,
    lay: CPLayout,
    x: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    context: MixerContext | None,
) -> torch.Tensor:
    r = cp.rank
    packed = cu_seqlens is not None
    R = x.shape[0]
    spec = mixer.state_spec()
    linear, positions = _keys(spec, *LINEAR_KINDS), _keys(spec, "position")
    window = _window_carry(mixer, forward, cp, lay, x)
    zero = mixer.init_state(R, x.device, x.dtype)
    carried = dict(window)
    if linear:
        # this rank's last document: S_final(0) and the transition of every linear state, all-gathered and folded.
        # The window carry always enters (times 0 when the last document starts here): the gathers' backward
        # collectives then run in the same order on every rank.
        last_carried = {k: v if lay.single[r] else v * 0 for k, v in window.items()}
        last_carried |= {k: torch.full_like(zero[k], lay.last_offset[r]) for k in positions}
        x_last = x[:, x.shape[1] - lay.last_len[r] :]
        pairs = final_state_and_transition(mixer, forward, x_last, last_carried, lay.single[r], context)
        carried |= _combine(cp, lay, linear, pairs)
    # the slice from its true initial state
    carried |= {k: torch.full_like(zero[k], lay.first_offset[r]) for k in positions}
    if packed:
        zero = mixer.init_state(len(cu_seqlens) - 1, x.device, x.dtype)
    y, _ = forward(x, state=_rows_state(carried, zero, packed), cu_seqlens=cu_seqlens, context=context)
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
