"""A tiny self-describing checkpoint (config.yaml, tokenizer.json, DCP shards) built in a temporary directory
without training: shared by the generate, eval and serve tests."""

from __future__ import annotations

from pathlib import Path

import torch

from linear_moe.data import Tokenizer
from linear_moe.model import LinearMoEForCausalLM, ModelConfig
from linear_moe.train import checkpoint as ckpt
from linear_moe.train.config import build_run_config, run_config_yaml

TEXT = (
    "The quick brown fox jumps over the lazy dog. A linear model mixes tokens with a recurrent state. "
    "Experts route each token to a few feed forward networks, and the router learns which ones fit. "
) * 8


def tiny_config(vocab_size: int, mixer: str = "gla", layer_pattern: str | None = "LN", **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        mixer=mixer,
        layer_pattern=layer_pattern,
        ffn_hidden_size=64,
        max_seq_len=256,
        **kw,
    )


def make_checkpoint(root: Path, mixer: str = "gla", layer_pattern: str | None = "LN", seed: int = 0) -> Path:
    """Write `root/checkpoints/step-0000001` for a tiny random model with a BPE tokenizer trained on `TEXT`;
    returns the checkpoint directory."""
    tok = Tokenizer.train([TEXT], vocab_size=300)
    tok_path = root / "tokenizer.json"
    root.mkdir(parents=True, exist_ok=True)
    tok.save(tok_path)
    model_cfg = tiny_config(tok.vocab_size, mixer, layer_pattern)
    cfg = build_run_config({"model": model_cfg.to_dict()}, [])
    torch.manual_seed(seed)
    model = LinearMoEForCausalLM(cfg.model)
    with torch.no_grad():  # larger weights than the init so that greedy outputs vary
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters())
    return ckpt.save_checkpoint(
        root / ckpt.CKPT_DIRNAME,
        1,
        model,
        optimizer,
        config_yaml=run_config_yaml(cfg),
        meta={},
        extra_files={"tokenizer.json": tok_path},
    )
