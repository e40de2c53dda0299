"""The contract every token mixer implements.

    y, new_state = mixer(x, state=None, cu_seqlens=None, use_cache=False, context=None)

- `x`: hidden states `[B, T, hidden_size]`; `y` has the same shape.
- `state`: the mixer's explicit recurrent state, a `dict[str, Tensor]` whose keys and per-row shapes the mixer
  declares in `state_spec()` (for example `{"recurrent": [H, K, V], "conv_q": [H*K, W-1]}`), or None for a fresh
  sequence. `init_state(batch_size)` builds the zero state, which behaves exactly as None. With `cu_seqlens` the
  state's first dimension is the number of documents N.
- `cu_seqlens`: `[N+1]` int offsets of packed documents in a batch of one (`x` is `[1, T_total, D]`); every document
  starts from its own state (zero, or `state[...][n]`) and nothing leaks across.
- `use_cache` (or a given `state`): return the state after the last token, else None.
- `context`: the one `MixerContext` of this forward, handed to every mixer alike. It carries the values that
  travel from layer to layer (RWKV-7's first-layer value `v_first`); a pipeline stage sends it with the hidden
  states, so no mixer reads anything model-wide. Under context parallelism with fla's kernels it also carries
  fla's `cp_context`, which a mixer hands to the ops it declares in `fla_cp_ops()` (below).

What a mixer takes from the model is only its constructor arguments: `hidden_size`, `num_heads`, `layer_idx`,
`num_layers` (depth-dependent inits; every mixer accepts it) and its own options. Parameters a method needs are
owned by the mixer (HGRN's forget-gate lower bound included).

A subclass implements `mix(x, state, cu_seqlens, keep, context) -> (y, new_state)` (`keep`: the new state is
wanted), `state_spec()` and `sequence_flops()`; `forward` is the template that validates the call once, decides
`keep`, and drops the state when it is not wanted. Layers hold no parallelism code and no hidden state of their
own: everything that carries over between calls goes through `state`, so chunked prefill, decoding and context
parallelism manage it from the outside.

fla's context parallelism (`fla.ops.cp`) carries the state inside fla's kernels instead: a mixer whose every
token-to-token carry runs through ops that take fla's `cp_context` declares them in `fla_cp_ops()` (public op names
of `linear_moe.ops`), and passes `context.cp_context` to each of them. parallel/cp.py then runs such a mixer once
on its rank's slice, with `state=None` and the context set; the ops refuse a `cp_context` off fla's CUDA path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from linear_moe.ops.checks import check_varlen

Tensor = torch.Tensor
MixerState = dict[str, torch.Tensor]
FLA_CP_MAX_HEAD_DIM = 256  # fla.ops.cp's delta-rule kernels take key heads up to this width (`fla_cp_ops`)


@dataclass
class MixerContext:
    """Values one forward hands from layer to layer. The model makes a fresh one per forward; a pipeline stage
    receives it from the previous stage and sends it on. Fields are None until a layer sets them; every field is
    per token, [B, T, ...] like the hidden states, so it follows any split of the rows or of the sequence."""

    v_first: torch.Tensor | None = None  # RWKV-7: the value of the first RWKV-7 layer [B, T, value_dim]
    # fla's `FLACPContext` (fla.ops.cp) of this rank's slice of a packed sequence: set by parallel/cp.py around the
    # one run of a mixer that declares `fla_cp_ops()`, None otherwise. Not per token: `tensors` and `map` skip it.
    cp_context: Any | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-token fields that are set (what a pipeline stage sends)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def map(self, fn) -> MixerContext:
        """A new context holding `fn(t)` for every set per-token field `t` (context parallelism runs a mixer again
        on a part of its tokens: it hands the mixer the same part of the context, and what the run sets stays
        there). `cp_context` describes the whole slice, so the part's context has none."""
        return MixerContext(**{k: fn(v) for k, v in self.tensors().items()})


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: `shape` per row (the batch or document dimension comes first and is not listed),
    `dtype` (None: the compute dtype of the inputs, e.g. short-conv and token-shift states; float32 for the
    recurrent states fla's kernels keep; int64 for counters), and `kind`: how the value after a stretch of tokens
    depends on the value before it, which is what lets context parallelism carry it between ranks (STATE_KINDS;
    None: not declared, such a mixer runs without cp). `window`: the number of last inputs a "window" state holds.

    A "matrix" or "diagonal" state's final value must depend on its own initial value only (not on the initial
    values of the mixer's other keys), given the "window" and "position" entries."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = torch.float32
    kind: str | None = None
    window: int = 0


STATE_KINDS = {
    "matrix": "S [..., K, V] -> P S + S(0) with a transition P [..., K, K] (delta rules)",
    "diagonal": "S -> d * S + S(0) element-wise (decays of any shape, running sums)",
    "window": "a function of the last `window` inputs x alone, zeros before a sequence starts (short-conv inputs, "
    "token shift)",
    "position": "the number of tokens seen since the sequence started (RoPE offsets)",
    "cache": "every past key and value (softmax attention's KV cache)",
}


class Mixer(nn.Module):
    """Base class for token mixers (see the module docstring for the contract)."""

    hidden_size: int
    num_heads: int
    layer_idx: int
    uses_num_layers: ClassVar[bool] = False  # the constructor takes `num_layers` (a depth-dependent init)
    # the layer's index of this module's first head: tensor parallelism runs heads [head_offset, head_offset +
    # num_heads) of the layer on each rank, so constants made from a head's index (RetNet's and lightning
    # attention's decays) read it
    head_offset: int = 0
    # the output norm, when the mixer has one that tensor parallelism must know: its attribute name and how many
    # channels of the output projection's input it normalises together (one head, a group of heads, all heads)
    out_norm_name: str | None = None
    out_norm_dim: int = 0

    def forward(
        self,
        x: torch.Tensor,
        state: MixerState | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool = False,
        context: MixerContext | None = None,
    ) -> tuple[torch.Tensor, MixerState | None]:
        self.check_call(x, state, cu_seqlens)
        keep = use_cache or state is not None
        y, new_state = self.mix(x, state, cu_seqlens, keep, context)
        return y, (new_state if keep else None)

    def mix(
        self,
        x: torch.Tensor,
        state: MixerState | None,
        cu_seqlens: torch.Tensor | None,
        keep: bool,
        context: MixerContext | None,
    ) -> tuple[torch.Tensor, MixerState]:
        """The method itself: y [B, T, D] and the new state (may be empty when not `keep`)."""
        raise NotImplementedError

    def state_spec(self) -> dict[str, StateSpec]:
        """The keys of this mixer's state and the shape of one row of each."""
        raise NotImplementedError

    def fla_cp_ops(self) -> tuple[str, ...]:
        """The public ops (`linear_moe.ops` names) through which every carry of this mixer's state runs and to which
        `mix` hands `context.cp_context` (fla's context parallelism); () when some carry does not (the default:
        such a mixer runs cp through parallel/cp.py's own state exchange)."""
        return ()

    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
    ) -> MixerState:
        """A zero state of `batch_size` rows (equivalent to `state=None`), preallocated from `state_spec()`; `dtype`
        is the compute dtype used for entries whose spec dtype is None (default: the parameters' dtype).
        `max_seq_len` sizes the KV cache of softmax attention; recurrent mixers have constant-size states and
        ignore it."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        state = {}
        for key, spec in self.state_spec().items():
            dt = spec.dtype or dtype
            if dt.is_floating_point:  # recurrent states are kept in at least float32 (float64 stays float64)
                dt = torch.promote_types(dt, dtype) if spec.dtype is not None else dt
            state[key] = torch.zeros(batch_size, *spec.shape, dtype=dt, device=device)
        return state

    def sequence_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of the token mixing itself (the products that are not weight matmuls,
        e.g. q.k^T and attention.v for softmax, the state updates and reads for linear mixers), for a
        sequence of `seq_len` tokens. Weight matmuls are counted from the parameters by the model."""
        raise NotImplementedError

    def check_call(self, x: torch.Tensor, state: MixerState | None, cu_seqlens: torch.Tensor | None) -> None:
        """Validate hidden states, packing and that `state` carries the declared keys with the right row count and
        shapes; one-line errors that name the mixer."""
        name = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: expected hidden states [B, T, {self.hidden_size}], got shape {tuple(x.shape)}")
        check_varlen(name, x, cu_seqlens)
        if state is None:
            return
        spec = self.state_spec()
        missing = [k for k in spec if k not in state]
        if missing:
            raise ValueError(f"{name}: state is missing {missing}; a state from this mixer has keys {list(spec)}")
        n = x.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        for key, s in spec.items():
            want = (n, *s.shape)
            if tuple(state[key].shape) != want:
                raise ValueError(
                    f"{name}: state[{key!r}] has shape {tuple(state[key].shape)}, expected {want} "
                    "(rows = batch or documents)"
                )
