"""Training configuration: `TrainConfig`, `FinetuneConfig`, and the whole-run `RunConfig`.

A run is one `RunConfig` = `model` (a `ModelConfig`, see "Presets" below) + `data` (a `DataConfig`)
+ `train` + `finetune`. It is read from YAML and `key=value` command-line overrides with
`load_run_config`; the merged, fully resolved config is written to `run_dir/config.yaml` and into
every checkpoint.

Presets: `model.preset: NAME` starts the model section from `get_preset(NAME)`; every model field
given explicitly (in the YAML file or as `model.FIELD=...` on the command line) then overrides the
preset's value. Without a preset the model starts from the built-in default model (`default_model()`). The written
config keeps the preset's name and lists every field, so reloading it gives the same model.
Precedence, lowest first: dataclass defaults < preset < YAML file < command-line overrides.
`model.moe.family: NAME` in the YAML file starts the MoE section from that family's published defaults
(`MoEConfig.preset`) with the other given `model.moe` fields on top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, apply_overrides, from_dict, to_dict
from ..model import ModelConfig, get_preset
from ..moe import MoEConfig
from ..ops.autotune import MODES as AUTOTUNE_MODES
from .schedule import SCHEDULES

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp32")
RESUME_HELP = "none (start fresh), auto (newest complete checkpoint in run_dir, else fresh) or a checkpoint path"


@dataclass
class DataConfig:
    """Pretraining data (a directory written by `linear-moe prepare`, or raw inputs prepared on the fly)."""

    path: str | None = None  # prepared dataset directory; None -> run_dir/data (prepared from `inputs` if missing)
    inputs: list[str] = field(default_factory=lambda: ["builtin:python-docs"])  # what to prepare when needed
    tokenizer: str | None = None  # tokenizer.json for preparing; None trains a byte-level BPE of vocab_size
    vocab_size: int = 4096  # BPE size when training a tokenizer
    val_fraction: float = 0.02  # documents held out for the validation loss when preparing
    text_field: str = "text"  # JSONL/Parquet field holding the text
    split_docs: bool = False  # .txt/.md inputs: one document per blank-line-separated block (else per file)
    seq_len: int = 128  # tokens per row
    micro_batch_size: int = 8  # rows per micro-batch
    seed: int = 0  # data order


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing of one run."""

    steps: int = 1200  # optimizer updates
    grad_accum: int = 1  # micro-batches per update
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the last step
    warmup: int = 40  # linear warmup steps
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying
    weight_decay: float = 0.1  # AdamW decay of weight matrices (not norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False  # recompute each block in backward (non-reentrant)
    checkpoint_experts: bool = False  # recompute only the routed experts in backward (their activations dominate)
    compile: bool = False  # torch.compile each block
    autotune: str = "full"  # Triton configs fla's autotuners try: full (fla's lists) | few (three) | one
    log_every: int = 10  # steps between training log records
    eval_every: int = 300  # steps between validation losses (0 = only at the end)
    eval_batches: int = 4  # micro-batches per validation loss
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # complete checkpoints kept (0 = all)
    run_dir: str = "runs/default"
    resume: str = "none"  # none | auto | PATH to a checkpoint directory
    seed: int = 0  # model init and everything random besides the data order (data.seed)
    device: str = "auto"  # auto | cpu | cuda
    wandb: str | None = None  # W&B project (logged when wandb is installed)
    tensorboard: bool = True  # TensorBoard event files in run_dir/tb (when tensorboard is installed)
    plot: bool = True  # write loss.png and expert_load.png at the end
    progress: bool = True  # show the progress bar
    sample_prompt: str = "The"  # prompt of the sample printed at the end ("" = no sample)
    sample_tokens: int = 60  # tokens to sample
    sample_temperature: float = 0.7
    sample_top_k: int = 20


@dataclass
class FinetuneConfig:
    """Supervised finetuning (`linear-moe finetune`): the loss covers response tokens only."""

    from_checkpoint: str | None = None  # checkpoint the run started from (set by `finetune --from`)
    data: str | None = None  # chat JSONL: {"prompt", "response"} or {"messages": [{"role", "content"}]} per line
    val_fraction: float = 0.0  # examples held out for the validation loss
    prompt_key: str = "prompt"  # JSONL field of the prompt
    response_key: str = "response"  # JSONL field of the response


def default_model() -> ModelConfig:
    """The built-in default model (`linear-moe train` without a config; configs/default.yaml lists it):
    a small hybrid Linear-MoE, three Gated-DeltaNet layers per softmax-attention layer, Mixtral-style MoE."""
    return ModelConfig(
        vocab_size=4096,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        mixer="gated_deltanet",
        layer_pattern="LLLN",
        ffn_hidden_size=256,
        moe=MoEConfig.preset("mixtral", num_experts=8, top_k=2, expert_ffn_hidden_size=128),
        max_seq_len=1024,
    )


@dataclass
class RunConfig:
    """A whole run: model, data, training, finetuning. `preset` is the model preset the run started from."""

    model: ModelConfig = field(default_factory=default_model)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    preset: str | None = field(default=None, init=False)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, finetune)")
    return raw


def _moe_preset(family: str, fields: dict[str, Any]) -> MoEConfig:
    try:
        return MoEConfig.preset(family, **fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.moe: {e}") from None


def build_run_config(raw: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a parsed YAML mapping and `key=value` overrides (see the module docstring)."""
    raw = dict(raw)
    model_raw = raw.pop("model", None) or {}
    if not isinstance(model_raw, dict):
        raise ConfigError("config key 'model' expects a mapping of model fields (and 'preset')")
    model_raw = dict(model_raw)
    preset = model_raw.pop("preset", None)
    rest = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model.preset":
            preset = yaml.safe_load(value) if value.strip() else None
        else:
            rest.append(item)
    base = to_dict(get_preset(preset) if preset else default_model())
    moe_raw = model_raw.get("moe")
    if isinstance(moe_raw, dict) and "family" in moe_raw:  # a family starts from its published defaults
        fields = {k: v for k, v in moe_raw.items() if k != "family"}
        base["moe"] = to_dict(_moe_preset(moe_raw["family"], fields))
    model = from_dict(ModelConfig, _deep_merge(base, model_raw))
    cfg = from_dict(RunConfig, raw)
    cfg = apply_overrides(dataclasses.replace(cfg, model=model), rest)
    cfg.preset = preset
    return validate(cfg)


def validate(cfg: RunConfig) -> RunConfig:
    """Check the values the trainer would only meet later (one-line ConfigError naming key and choices)."""
    tc = cfg.train
    choices = {"train.schedule": (tc.schedule, SCHEDULES), "train.dtype": (tc.dtype, DTYPES)}
    choices["train.device"] = (tc.device, DEVICES)
    choices["train.autotune"] = (tc.autotune, AUTOTUNE_MODES)
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(valid)}")
    positive = {"train.steps": tc.steps, "train.grad_accum": tc.grad_accum, "train.log_every": tc.log_every}
    positive |= {"data.seq_len": cfg.data.seq_len, "data.micro_batch_size": cfg.data.micro_batch_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if tc.warmup < 0 or tc.lr <= 0 or tc.min_lr < 0 or tc.min_lr > tc.lr:
        raise ConfigError(
            f"need train.warmup >= 0 and 0 <= train.min_lr <= train.lr, got {tc.warmup}, {tc.min_lr}, {tc.lr}"
        )
    if not 0 < tc.decay_fraction <= 1:
        raise ConfigError(f"train.decay_fraction must be in (0, 1], got {tc.decay_fraction}")
    if not tc.resume:
        raise ConfigError(f"train.resume must be {RESUME_HELP}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}")
    return cfg


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a run config from YAML `path` (None: the built-in default run) and apply `overrides`."""
    return build_run_config(_read_yaml(path) if path is not None else {}, list(overrides))


def run_config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The run config as a plain dict, with the model preset's name first in the model section."""
    d = to_dict(cfg)
    d["model"] = {"preset": cfg.preset, **d["model"]}
    return d


def run_config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(run_config_dict(cfg), sort_keys=False, default_flow_style=False)
