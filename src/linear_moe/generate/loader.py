"""Load a model and its tokenizer from a self-describing checkpoint directory (or a run directory's latest).

A checkpoint written by `linear-moe train` / `finetune` holds `config.yaml` (the run config, whose `model` section
builds the model), `tokenizer.json`, `meta.json` and the DCP shards; nothing else is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from ..train import checkpoint as ckpt

TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on `device`, in `dtype`
    tokenizer: object  # linear_moe.data.Tokenizer
    config: object  # the ModelConfig
    path: Path  # the checkpoint directory


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint; a run directory or its `checkpoints/` -> the newest complete one."""
    path = Path(path)
    if not path.exists():
        raise ckpt.CheckpointError(f"checkpoint {path}: no such directory")
    for root in (path / ckpt.CKPT_DIRNAME, path):
        if not (path / ckpt.META).is_file() and (found := ckpt.find_latest(root)) is not None:
            return found
    if not (path / ckpt.META).is_file() or not (path / ckpt.CONFIG).is_file():
        raise ckpt.CheckpointError(
            f"{path} is not a Linear-MoE checkpoint (no meta.json and config.yaml); give a directory written by "
            "`linear-moe train`, e.g. runs/default/checkpoints/step-0001200, or its run directory"
        )
    return path


def model_config_of(path: Path):
    """The `ModelConfig` stored in checkpoint `path`."""
    from ..train.config import build_run_config

    stored = yaml.safe_load(ckpt.read_config_text(path)) or {}
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise ckpt.CheckpointError(f"checkpoint {path}: config.yaml has no model section; not a Linear-MoE checkpoint")
    return build_run_config({"model": stored["model"]}, []).model


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: valid dtypes are {', '.join(DTYPES)}")
    return DTYPES[dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def load_model(
    path: str | Path, device: str = "auto", dtype: str = "auto", tokenizer: str | Path | None = None
) -> LoadedModel:
    """The model of checkpoint (or run directory) `path` with its weights, in eval mode; `tokenizer` overrides the
    checkpoint's tokenizer.json (it may have fewer tokens than the model's vocabulary, as a padded vocabulary has;
    never more)."""
    from ..data import Tokenizer
    from ..model import LinearMoEForCausalLM

    path = resolve_checkpoint(path)
    cfg = model_config_of(path)
    tok_path = Path(tokenizer) if tokenizer is not None else path / TOKENIZER_FILE
    if not tok_path.is_file():
        raise ckpt.CheckpointError(f"checkpoint {path}: no {TOKENIZER_FILE}; pass --tokenizer FILE")
    tok = Tokenizer.from_file(tok_path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model's vocabulary is {cfg.vocab_size}; "
            "use the tokenizer.json the model was trained with"
        )
    dev = pick_device(device)
    model = LinearMoEForCausalLM(cfg)
    ckpt.load_checkpoint(path, model, optimizer=None, restore_rng_state=False)
    model = model.to(device=dev, dtype=pick_dtype(dtype, dev)).eval()
    return LoadedModel(model, tok, cfg, path)
