"""The transformers face of a Linear-MoE model (needs transformers): `LinearMoEForCausalLM(PreTrainedModel)`
holding our model as `.model`, and `LinearMoECache`, the per-layer recurrent states that `generate()` carries.

Generation: the model declines transformers' default KV cache (`_supports_default_dynamic_cache` is False), so
the first forward (the prompt) creates a `LinearMoECache` and returns it as `past_key_values`; every later step
feeds one token with it. The cache holds each layer's state dict (recurrent state + short-conv tail for linear
mixers, keys and values for softmax attention), every tensor with the sequence (row) dimension first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from linear_moe.hf.configuration import LinearMoEConfig
from linear_moe.model import LinearMoEForCausalLM as CoreModel
from linear_moe.model.lm import check_logits_to_keep, keep_positions

State = dict[str, torch.Tensor] | None


class LinearMoECache:
    """Recurrent states of one batch of sequences: `states[i]` is layer i's state dict; `seen_tokens` tokens so
    far. Not croppable (a recurrent state cannot forget tokens), reorderable for beam search."""

    is_compileable = False
    is_croppable = False

    def __init__(self, states: list[State] | None = None, seen_tokens: int = 0):
        self.states = states
        self.seen_tokens = seen_tokens

    def update(self, states: list[State], new_tokens: int) -> None:
        self.states = states
        self.seen_tokens += new_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep rows `beam_idx` of every state tensor (beam search)."""
        if self.states is not None:
            self.states = [
                None if s is None else {k: v.index_select(0, beam_idx.to(v.device)) for k, v in s.items()}
                for s in self.states
            ]

    def __len__(self) -> int:
        return 0 if self.states is None else len(self.states)


class LinearMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers wrapper; `self.model` is `linear_moe.model.LinearMoEForCausalLM` (parameter names
    `model.embed_tokens`, `model.layers.{i}.{attn_norm,mixer,ffn_norm,ffn}`, `model.norm`, `model.lm_head`)."""

    config_class = LinearMoEConfig
    base_model_prefix = "linear_moe"
    _no_split_modules = ["Block"]
    _is_stateful = True
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinearMoEConfig):
        super().__init__(config)
        self.model = CoreModel(config.model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the first forward creates a LinearMoECache

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: our modules initialise themselves when built, and loading fills every weight."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: LinearMoECache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        cache: LinearMoECache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T, V] (float32 math as our model). `labels` follow transformers (the
        model shifts them: position t predicts labels[t + 1]); the loss adds the MoE aux loss. `logits_to_keep`
        is transformers' (`generate` passes 1: the prompt's forward builds `[B, 1, V]` logits, not `[B, T, V]`);
        with `labels` the loss still covers every position and only the returned logits are narrowed. Padding
        (`attention_mask` zeros) is not supported: rows must be full sequences."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "LinearMoEForCausalLM: padded batches (attention_mask zeros) are not supported; "
                "generate prompts of equal length or one at a time"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is None:  # transformers >= 5.2x passes the cache as `cache` (past_key_values deprecated)
            past_key_values = cache
        states = past_key_values.states if past_key_values is not None else None
        check_logits_to_keep(logits_to_keep)
        keep = logits_to_keep if labels is None else 0  # the loss needs every position's logits
        out = self.model(input_ids, states=states, use_cache=bool(use_cache), logits_to_keep=keep)
        loss, logits = None, out.logits
        if labels is not None:
            target_BT = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), target_BT.flatten(), ignore_index=-100)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            logits = keep_positions(logits, logits_to_keep)
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else LinearMoECache()
            cache.update(out.states, input_ids.shape[1])
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=out.aux_loss, logits=logits, past_key_values=cache)
