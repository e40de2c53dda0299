"""lm-evaluation-harness's model interface for Linear-MoE checkpoints (needs the `eval` extra: lm-eval).

Importing this module registers the model as `linear-moe`, so `lm_eval --model linear-moe --model_args
checkpoint=runs/default` works once `linear_moe.eval.harness` is imported; `linear-moe eval` calls the Python API.
"""

from __future__ import annotations

import json
from collections import defaultdict

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..generate import GenerationConfig, SamplingParams, generate
from ..generate.loader import LoadedModel, load_model
from .scoring import score_continuations, sequence_logprob


@register_model("linear-moe")
class LinearMoELM(TemplateLM):
    """`loglikelihood` (packed, batched by tokens), `loglikelihood_rolling` (whole documents, states carried from
    chunk to chunk) and `generate_until` (batched generation with the task's stop strings)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 16,
        max_length: int | None = None,
        loaded: LoadedModel | None = None,
    ):
        super().__init__()
        if loaded is None:
            if checkpoint is None:
                raise ValueError("linear-moe: give model_args checkpoint=DIR")
            loaded = load_model(checkpoint, device, dtype)
        self.loaded, self.model, self.tokenizer_ = loaded, loaded.model, loaded.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = int(max_length or loaded.config.max_seq_len)
        self._device = next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer_.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = score_continuations(self.model, pairs, self.max_length, max_tokens=self.batch_size * self.max_length)
        for (key, _, _), res in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in (r.args for r in requests):
            ids = [self.eot_token_id] + self.tok_encode(text)
            if len(ids) <= self.max_length + 1:
                ((logprob, _),) = score_continuations(self.model, [(ids[:1], ids[1:])], self.max_length)
            else:
                logprob, _ = sequence_logprob(self.model, ids, chunk=self.max_length)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
            out.append(logprob)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        for idxs in groups.values():
            kwargs = dict(requests[idxs[0]].args[1])
            config = self._generation_config(kwargs)
            keep = self.max_length - config.max_new_tokens
            for b in range(0, len(idxs), self.batch_size):
                chunk = idxs[b : b + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-max(keep, 1) :] or [self.eot_token_id] for i in chunk]
                gens, _ = generate(self.model, prompts, config, self.tokenizer_)
                for i, g in zip(chunk, gens, strict=True):
                    out[i] = g.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out

    def _generation_config(self, kwargs: dict) -> GenerationConfig:
        until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        sampling = SamplingParams(temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
        return GenerationConfig(max_new_tokens=max_new, sampling=sampling, stop=tuple(until), max_seq_len=None)
