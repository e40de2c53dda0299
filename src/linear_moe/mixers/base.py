"""The interface every token mixer implements.

    y, new_state = mixer(x, state=None, cu_seqlens=None, use_cache=False)

- `x`: hidden states `[B, T, hidden_size]`; `y` has the same shape.
- `state`: the mixer's explicit recurrent state, a `dict[str, Tensor]` (for example
  `{"recurrent": [B, H, K, V], "conv_q": [B, D, W-1]}`; softmax attention keeps `{"k", "v"}`),
  or None for a fresh sequence. With `cu_seqlens` the state's batch dimension is the number of
  documents N.
- `cu_seqlens`: `[N+1]` int offsets of packed documents in a batch of one (`x` is `[1, T_total, D]`);
  every document starts from its own state (zero, or `state[...][n]`) and nothing leaks across.
- `use_cache` (or a given `state`): return the state after the last token, else return None.

Two optional keyword arguments exist for mixers that need something from the model: `lower_bound` (HGRN's
per-layer forget-gate floor, a learned model parameter) and `shared` (a dict the model creates once per forward
and hands to every mixer that takes it, for values passed between layers: RWKV-7's first-layer value `v_first`).
The model finds them by the mixer's `forward` signature.

Layers hold no parallelism code and no hidden state of their own: everything that carries over
between calls goes through `state`, so chunked prefill, decoding and context parallelism can
manage it from the outside.
"""

from __future__ import annotations

import torch
from torch import nn

MixerState = dict[str, torch.Tensor]


class Mixer(nn.Module):
    """Base class for token mixers (see module docstring for the contract)."""

    hidden_size: int
    num_heads: int

    def forward(
        self,
        x: torch.Tensor,
        state: MixerState | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, MixerState | None]:
        raise NotImplementedError

    def sequence_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of the token mixing itself (the products that are not weight matmuls,
        e.g. q.k^T and attention.v for softmax, the state updates and reads for linear mixers), for a
        sequence of `seq_len` tokens. Weight matmuls are counted from the parameters by the model."""
        raise NotImplementedError

    @staticmethod
    def check_input(name: str, x: torch.Tensor, hidden_size: int) -> None:
        if x.dim() != 3 or x.shape[-1] != hidden_size:
            raise ValueError(f"{name}: expected hidden states [B, T, {hidden_size}], got shape {tuple(x.shape)}")
