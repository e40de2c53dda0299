"""The short sample printed at the end of `linear-moe train` / `finetune`, to eyeball a run."""

from __future__ import annotations

from torch import nn

from .engine import GenerationConfig, generate
from .sampling import SamplingParams


def sample_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    chat: bool = False,
) -> str:
    """The continuation of `prompt` (rendered as a one-turn chat prompt when `chat`), up to EOS."""
    from ..data import chat_prompt

    ids = chat_prompt(tokenizer, [{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    config = GenerationConfig(max_new_tokens, SamplingParams(temperature=temperature, top_k=top_k), seed=seed)
    (gen,), _ = generate(model, [ids or [tokenizer.eos_id]], config, tokenizer)
    return gen.text
