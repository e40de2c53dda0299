"""`linear-moe convert`: a checkpoint <-> a Hugging Face directory loadable with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Export writes config.json (`LinearMoEConfig`, with `auto_map`), model.safetensors (the model's state dict under
`model.`), generation_config.json, the tokenizer as `PreTrainedTokenizerFast` files, and two small modules
(configuration_linear_moe.py, modeling_linear_moe.py) that import their classes from this package. Import reads
such a directory back into a checkpoint directory (config.yaml, meta.json, tokenizer.json, DCP shards of the model
only) that `finetune --from`, `linear-moe generate` and `convert --to-hf` accept; the round trip is exact.
"""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from linear_moe.hf.io import (
    CONFIG_JSON,
    TOKENIZER_JSON,
    WEIGHTS,
    HFError,
    atomic_dir,
    read_config,
    read_weights,
    write_json,
)
from linear_moe.model import LinearMoEForCausalLM, ModelConfig

MODEL_TYPE = "linear_moe"
PREFIX = "model."  # the HF wrapper holds our model as `.model`
CONFIG_MODULE = "configuration_linear_moe"
MODELING_MODULE = "modeling_linear_moe"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.LinearMoEConfig",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.LinearMoEForCausalLM",
}
# The exported modules are shims: the classes live in this package (install it with its `hf` extra).
SHIMS = {
    f"{CONFIG_MODULE}.py": (
        '"""Linear-MoE configuration for transformers (trust_remote_code); needs `pip install linear-moe[hf]`."""\n\n'
        "from linear_moe.hf.configuration import LinearMoEConfig\n\n"
        '__all__ = ["LinearMoEConfig"]\n'
    ),
    f"{MODELING_MODULE}.py": (
        '"""Linear-MoE causal LM for transformers (trust_remote_code); needs `pip install linear-moe[hf]`."""\n\n'
        "from linear_moe.hf.modeling import LinearMoECache, LinearMoEForCausalLM\n\n"
        '__all__ = ["LinearMoECache", "LinearMoEForCausalLM"]\n'
    ),
}


def package_version() -> str:
    try:
        return version("linear-moe")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------- checkpoints


def load_checkpoint_model(path: str | Path) -> tuple[LinearMoEForCausalLM, Path]:
    """(model with the checkpoint's weights, in eval mode, the checkpoint directory) of a checkpoint or run dir."""
    from linear_moe.generate.loader import model_config_of, resolve_checkpoint
    from linear_moe.train import checkpoint as ckpt

    path = resolve_checkpoint(path)
    model = LinearMoEForCausalLM(model_config_of(path))
    ckpt.load_checkpoint(path, model, optimizer=None, restore_rng_state=False)
    return model.eval(), path


# ---------------------------------------------------------------------------------------------- tokenizer


def tokenizer_info(path: Path, vocab_size: int) -> dict[str, Any]:
    """eos id and string of a tokenizer.json, checked against the model's vocabulary."""
    from linear_moe.data import Tokenizer

    tok = Tokenizer.from_file(path)
    if tok.vocab_size > vocab_size:
        raise HFError(
            f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocabulary has {vocab_size}; "
            "use the tokenizer the model was trained with"
        )
    return {"eos_id": tok.eos_id, "eos": tok.hf.id_to_token(tok.eos_id)}


def write_tokenizer(out: Path, src: Path, info: dict[str, Any], max_len: int) -> None:
    """tokenizer.json + the config files `AutoTokenizer` reads as a `PreTrainedTokenizerFast`."""
    shutil.copyfile(src, out / TOKENIZER_JSON)
    special = {"eos_token": info["eos"], "pad_token": info["eos"]}
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "model_max_length": max_len,
            "clean_up_tokenization_spaces": False,
        },
    )
    write_json(out / "special_tokens_map.json", special)


# ---------------------------------------------------------------------------------------------- export


def hf_config_dict(cfg: ModelConfig, eos_id: int | None) -> dict[str, Any]:
    """config.json of an exported model: our `ModelConfig` under `linear_moe`, plus the fields transformers reads."""
    return {
        "architectures": ["LinearMoEForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": AUTO_MAP,
        "linear_moe": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "use_cache": True,
        "dtype": "float32",
        "linear_moe_version": package_version(),
    }


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under `model.`, every tensor its own contiguous copy (safetensors stores no
    shared storage, so tied embeddings are written twice)."""
    return {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_hf(
    model: LinearMoEForCausalLM, out: str | Path, tokenizer: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write `model` (and `tokenizer`, a tokenizer.json) as a Hugging Face directory `out`; returns `out`."""
    cfg = model.cfg
    info = tokenizer_info(Path(tokenizer), cfg.vocab_size) if tokenizer is not None else None
    cfg = cfg.replace(init_from=None)  # the weights are in the export; the source directory is not needed
    eos_id = info["eos_id"] if info else None
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / CONFIG_JSON, hf_config_dict(cfg, eos_id))
        write_json(tmp / "generation_config.json", {"eos_token_id": eos_id, "pad_token_id": eos_id})
        save_file(hf_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if info is not None:
            write_tokenizer(tmp, Path(tokenizer), info, cfg.max_seq_len)
        for name, text in SHIMS.items():
            (tmp / name).write_text(text)
    return Path(out)


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write checkpoint (or run directory) `checkpoint` with its tokenizer as a Hugging Face directory `out`."""
    model, path = load_checkpoint_model(checkpoint)
    tokenizer = path / TOKENIZER_JSON
    return save_hf(model, out, tokenizer if tokenizer.is_file() else None, overwrite)


# ---------------------------------------------------------------------------------------------- import


def model_from_hf_dir(hf_dir: str | Path) -> LinearMoEForCausalLM:
    """Our model with the weights of an exported directory (config.json of model_type linear_moe)."""
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    if config.get("model_type") != MODEL_TYPE:
        raise HFError(
            f"{hf_dir} holds a {config.get('model_type', 'unknown')!r} model, not an exported Linear-MoE model; "
            "start from a pretrained MoE with `linear-moe train CONFIG model.init_from=DIR` instead"
        )
    if not isinstance(config.get("linear_moe"), dict):
        raise HFError(f"{hf_dir}/{CONFIG_JSON} has no 'linear_moe' model section; re-export it with linear-moe")
    cfg = ModelConfig.from_dict(config["linear_moe"])
    model = LinearMoEForCausalLM(cfg)
    weights = read_weights(hf_dir)
    foreign = sorted(k for k in weights if not k.startswith(PREFIX))
    if foreign:
        raise HFError(f"{hf_dir}: unexpected weight {foreign[0]!r} (every weight is under {PREFIX!r})")
    own = model.state_dict()
    state = {k[len(PREFIX) :]: v for k, v in weights.items()}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        what = (
            f"missing {missing[0]!r}"
            if missing
            else f"unexpected {unexpected[0]!r}"
            if unexpected
            else f"{wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
        )
        raise HFError(f"{hf_dir}: the weights do not fit its config.json ({what})")
    model.load_state_dict(state, strict=True)
    return model.eval()


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write exported directory `hf_dir` as checkpoint directory `out` (step 0, model weights only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from linear_moe.train import checkpoint as ckpt
    from linear_moe.train.config import RunConfig, run_config_yaml

    hf_dir = Path(hf_dir)
    model = model_from_hf_dir(hf_dir)
    tok_path = hf_dir / TOKENIZER_JSON
    if tok_path.is_file():
        tokenizer_info(tok_path, model.cfg.vocab_size)
    with atomic_dir(out, overwrite) as tmp:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp), no_dist=True)
        (tmp / ckpt.CONFIG).write_text(run_config_yaml(RunConfig(model=model.cfg)))
        if tok_path.is_file():
            shutil.copyfile(tok_path, tmp / TOKENIZER_JSON)
        meta = {"step": 0, "imported_from": str(hf_dir), "torch": torch.__version__}
        write_json(tmp / ckpt.META, meta)
    return Path(out)
