"""`LinearMoEForCausalLM`: embedding -> pre-norm blocks (mixer + FFN) -> RMSNorm -> LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from linear_moe.layers.norm import RMSNorm
from linear_moe.mixers import MixerContext, MixerState, build_mixer
from linear_moe.model.config import ModelConfig
from linear_moe.model.loss import causal_lm_loss
from linear_moe.moe import MoELayer, SwiGLU


def build_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """MoELayer for MoE layers, else a dense SwiGLU of `ffn_hidden_size`."""
    if cfg.is_moe_layer(layer_idx):
        return MoELayer(cfg.moe, cfg.hidden_size)
    return SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)


def compute_dtype(h: torch.Tensor) -> torch.Tensor:
    """`h` in the autocast dtype when autocast is on. The residual stream stays float32 under autocast; the mixer
    and FFN inputs are cast once here instead of once per projection (and the grouped expert GEMMs get the bf16
    operands `torch._grouped_mm` wants on CUDA)."""
    if torch.is_autocast_enabled(h.device.type):
        return h.to(torch.get_autocast_dtype(h.device.type))
    return h


class Block(nn.Module):
    """x + mixer(norm(x)), then + ffn(norm(x)). Returns (x [B, T, D], mixer state, MoE aux or None)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mixer = build_mixer(
            cfg.layer_mixers()[layer_idx],
            cfg.hidden_size,
            cfg.num_heads,
            layer_idx,
            cfg.num_layers,
            **cfg.layer_mixer_kwargs(layer_idx),
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn = build_ffn(cfg, layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)

    def forward(
        self,
        x_BTD: torch.Tensor,
        state: MixerState | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool = False,
        context: MixerContext | None = None,
    ):
        y_BTD, new_state = self.mixer(compute_dtype(self.attn_norm(x_BTD)), state, cu_seqlens, use_cache, context)
        x_BTD = x_BTD + y_BTD
        h_BTD = compute_dtype(self.ffn_norm(x_BTD))
        aux = None
        if self.is_moe:
            y_BTD, aux = self.ffn(h_BTD)
        else:
            y_BTD = self.ffn(h_BTD)
        return x_BTD + y_BTD, new_state, aux


@dataclass
class LMOutput:
    loss: torch.Tensor | None  # mean CE over targets != -100 (None without labels)
    aux_loss: torch.Tensor | None  # sum of the MoE layers' aux losses (None for a dense model)
    logits: torch.Tensor | None  # [B, T, V] ([B, N, V] of the kept positions); None when the fused loss ran
    states: list[MixerState | None] | None  # one mixer state per layer when use_cache / states given
    expert_load: torch.Tensor | None  # [num_moe_layers, E] tokens routed to each expert
    expert_dropped: torch.Tensor | None = None  # [num_moe_layers] int64 assignments dropped by the capacity limit


def keep_positions(x_BT_: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of dim 1 that `logits_to_keep` selects, with transformers' rule: an int N > 0 keeps the last N
    (all when N >= T), 0 keeps all, a 1-D integer tensor keeps those positions (in that order)."""
    if isinstance(logits_to_keep, torch.Tensor):
        return x_BT_[:, logits_to_keep]
    return x_BT_[:, -logits_to_keep:] if logits_to_keep else x_BT_


def check_logits_to_keep(logits_to_keep: int | torch.Tensor) -> None:
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.dtype.is_floating_point or logits_to_keep.dtype == torch.bool:
            raise ValueError(
                f"logits_to_keep: a tensor must be 1-D integer positions, got {logits_to_keep.dtype} of shape "
                f"{tuple(logits_to_keep.shape)}"
            )
    elif isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(
            f"logits_to_keep must be an int >= 0 (0: all positions) or a 1-D tensor of positions, got {logits_to_keep!r}"
        )


class LinearMoEForCausalLM(nn.Module):
    """Causal LM over `ModelConfig` (see docs/models.md). Parameter names follow HF:
    `embed_tokens`, `layers.{i}.{attn_norm,mixer,ffn_norm,ffn}`, `norm`, `lm_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embedding and linear weights, zero biases (as fla's models); norms keep their
        ones; mixers keep their own init of decay/gate parameters; MoE layers use `moe.init_std`."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for moe in self.moe_layers():
            moe.reset_parameters()

    def moe_layers(self) -> list[nn.Module]:
        """The `MoELayer`s in layer order (the trainer updates their bias from `expert_load`)."""
        return [b.ffn for b in self.layers if b.is_moe]

    def init_states(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
    ) -> list[MixerState]:
        """One zero state per layer (`Mixer.init_state`), preallocated: recurrent and short-conv states, and a KV
        cache of `max_seq_len` (default `cfg.max_seq_len`) for softmax layers. Equivalent to `states=None`."""
        max_seq_len = max_seq_len or self.cfg.max_seq_len
        return [b.mixer.init_state(batch_size, device, dtype, max_seq_len) for b in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        states: list[MixerState | None] | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> LMOutput:
        """input_ids, labels [B, T] (labels already aligned, -100 ignored); states: one per layer or None.

        `logits_to_keep` (transformers' argument): an int N > 0 returns the logits of the last N positions
        `[B, N, V]`, 0 all of them, a 1-D integer tensor those positions along T `[B, P, V]` (with `cu_seqlens`,
        positions in the packed row, e.g. each document's last token `cu_seqlens[1:] - 1`). Without labels the
        final norm and the LM head run on the kept positions only. With labels the loss still covers every position
        and only the returned logits are narrowed."""
        check_logits_to_keep(logits_to_keep)
        if states is not None and len(states) != len(self.layers):
            raise ValueError(f"states: expected one state per layer ({len(self.layers)}), got {len(states)}")
        if cu_seqlens is not None:  # checked once here (one host sync); the ops skip it for CUDA offsets
            bounds = cu_seqlens[[0, -1]].tolist() if cu_seqlens.dim() == 1 and len(cu_seqlens) else None
            if input_ids.shape[0] != 1 or bounds != [0, input_ids.shape[1]]:
                raise ValueError(
                    f"cu_seqlens must be 1-D offsets from 0 to T={input_ids.shape[1]} with batch size 1, "
                    f"got shape {tuple(cu_seqlens.shape)} for input_ids {tuple(input_ids.shape)}"
                )
        keep_states = use_cache or states is not None
        x_BTD = self.embed_tokens(input_ids)
        new_states, auxes = [], []
        context = MixerContext()  # values passed from layer to layer in this forward (RWKV-7's v_first)
        for i, block in enumerate(self.layers):
            x_BTD, st, aux = block(x_BTD, None if states is None else states[i], cu_seqlens, use_cache, context)
            new_states.append(st)
            if aux is not None:
                auxes.append(aux)
        if labels is None:  # the norm and the head see the kept positions only: no [B, T, V] logits for a prefill
            x_BTD = keep_positions(x_BTD, logits_to_keep)
        h_BTD = self.norm(x_BTD)
        loss, logits = causal_lm_loss(h_BTD, self.lm_head.weight, labels, self.cfg.fuse_linear_cross_entropy)
        if labels is not None and logits is not None:
            logits = keep_positions(logits, logits_to_keep)
        aux_loss = torch.stack([a.loss for a in auxes]).sum() if auxes else None
        expert_load = torch.stack([a.load for a in auxes]) if auxes else None
        dropped = torch.stack([a.dropped for a in auxes]) if auxes else None
        return LMOutput(loss, aux_loss, logits, new_states if keep_states else None, expert_load, dropped)
