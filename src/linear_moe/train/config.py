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
`model.moe.family: NAME` starts the MoE section from that family's published defaults (`MoEConfig.preset`)
with the other given `model.moe` fields on top.

A dotted override means exactly what the same key written in the YAML file means: all overrides are merged into
the file's mapping first, then the config is built and validated once (so `model.num_layers=6
model.layer_pattern=LLN` works in either order). Relative input paths in a YAML file (`data.path`,
`data.inputs`, `data.tokenizer`, `finetune.data`) are looked up next to the file first, then in the current
directory. Choice fields are `Literal[...]` types, checked by the converter (`linear_moe.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import ConfigError, from_dict, merge_overrides, read_yaml, to_dict
from ..model import ModelConfig, get_preset
from ..moe import MoEConfig
from ..parallel.config import ParallelConfig

# choices (tests check them against train.schedule.SCHEDULES and ops.autotune.MODES)
Schedule = Literal["cosine", "wsd"]
Dtype = Literal["auto", "bf16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]
Autotune = Literal["full", "few", "one"]
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
    micro_batch_size: int = 8  # rows per micro-batch, over all data-parallel ranks (each reads its share)
    seed: int = 0  # data order


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing of one run."""

    steps: int = 1200  # optimizer updates
    grad_accum: int = 1  # micro-batches per update
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the last step
    warmup: int = 40  # linear warmup steps
    schedule: Schedule = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying
    weight_decay: float = 0.1  # AdamW decay of weight matrices (not norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    dtype: Dtype = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False  # recompute each block in backward (non-reentrant)
    checkpoint_experts: bool = False  # recompute only the routed experts in backward (their activations dominate)
    expert_chunk: int = 0  # routed experts in chunks of this many tokens, each recomputed in backward (0 = off)
    offload_activations: bool = False  # saved activations in host memory (with checkpointing: the block inputs)
    compile: bool = False  # torch.compile each block
    autotune: Autotune = "full"  # Triton configs fla's autotuners try: full (fla's lists) | few (three) | one
    log_every: int = 10  # steps between training log records
    eval_every: int = 300  # steps between validation losses (0 = only at the end)
    eval_batches: int = 4  # micro-batches per validation loss
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2  # complete checkpoints kept (0 = all)
    run_dir: str = "runs/default"
    resume: str = "none"  # none | auto | PATH to a checkpoint directory
    seed: int = 0  # model init and everything random besides the data order (data.seed)
    device: Device = "auto"  # auto | cpu | cuda
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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the layout over torchrun's processes
    preset: str | None = field(default=None, init=False)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_run_yaml(path: str | Path) -> dict[str, Any]:
    """The sections of run config file `path`, its relative input paths looked up next to it first."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, finetune)")
    return resolve_input_paths(raw, Path(path).parent)


def _moe_preset(family: Any, fields: dict[str, Any]) -> MoEConfig:
    try:
        return MoEConfig.preset(str(family), **fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.moe: {e}") from None


def _next_to(base_dir: Path, value: Any) -> Any:
    """`value` (a relative path written in a config file in `base_dir`) -> the path next to that file when it
    exists there; anything else unchanged."""
    if not isinstance(value, str) or not value or value.startswith("builtin:") or Path(value).is_absolute():
        return value
    candidate = base_dir / value
    return str(candidate) if candidate.exists() else value


def resolve_input_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The parsed YAML mapping of a file in `base_dir` with its relative input paths looked up next to it."""
    raw = dict(raw)
    for section, keys in (("data", ("path", "tokenizer", "inputs")), ("finetune", ("data",))):
        if not isinstance(raw.get(section), dict):
            continue
        raw[section] = dict(raw[section])
        for key in keys:
            value = raw[section].get(key)
            if isinstance(value, list):
                raw[section][key] = [_next_to(base_dir, v) for v in value]
            elif value is not None:
                raw[section][key] = _next_to(base_dir, value)
    return raw


def build_run_config(raw: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a parsed YAML mapping and `key=value` overrides (see the module docstring)."""
    user = merge_overrides(raw, list(overrides))
    model_raw = user.pop("model", None) or {}
    if not isinstance(model_raw, dict):
        raise ConfigError("config key 'model' expects a mapping of model fields (and 'preset')")
    model_raw = dict(model_raw)
    preset = model_raw.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"config key 'model.preset' expects a preset name, got {preset!r}")
    base = to_dict(get_preset(preset) if preset else default_model())
    moe_raw = model_raw.get("moe")
    if isinstance(moe_raw, dict) and "family" in moe_raw:  # a family starts from its published defaults
        fields = {k: v for k, v in moe_raw.items() if k != "family"}
        base["moe"] = to_dict(_moe_preset(moe_raw["family"], fields))
    cfg = from_dict(RunConfig, {**user, "model": _deep_merge(base, model_raw)})
    cfg.preset = preset
    return validate(cfg)


def _check_at_least(values: dict[str, float], low: float) -> None:
    for key, value in values.items():
        if value < low:
            raise ConfigError(f"{key} must be {'at least 1' if low == 1 else f'>= {low}'}, got {value}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check the values the trainer would only meet later (one-line ConfigError naming the key). Choice fields
    (`Literal`) and types are already checked by the converter."""
    tc, dc = cfg.train, cfg.data
    positive = {"train.steps": tc.steps, "train.grad_accum": tc.grad_accum, "train.log_every": tc.log_every}
    positive |= {"data.seq_len": dc.seq_len, "data.micro_batch_size": dc.micro_batch_size}
    _check_at_least(positive, 1)
    non_negative = {
        f"train.{k}": getattr(tc, k) for k in ("save_every", "eval_every", "keep_last", "eval_batches", "expert_chunk")
    }
    non_negative |= {f"train.{k}": getattr(tc, k) for k in ("grad_clip", "weight_decay", "warmup", "seed")}
    non_negative |= {f"train.{k}": getattr(tc, k) for k in ("sample_tokens", "sample_temperature", "sample_top_k")}
    non_negative |= {"data.seed": dc.seed}
    _check_at_least(non_negative, 0)
    if tc.lr <= 0 or tc.min_lr < 0 or tc.min_lr > tc.lr:
        raise ConfigError(f"need 0 <= train.min_lr <= train.lr and train.lr > 0, got {tc.min_lr}, {tc.lr}")
    if not all(0 <= b < 1 for b in tc.betas):
        raise ConfigError(f"train.betas must be in [0, 1), got {list(tc.betas)}")
    if not 0 < tc.decay_fraction <= 1:
        raise ConfigError(f"train.decay_fraction must be in (0, 1], got {tc.decay_fraction}")
    for key, value in (("data.val_fraction", dc.val_fraction), ("finetune.val_fraction", cfg.finetune.val_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if not tc.resume:
        raise ConfigError(f"train.resume must be {RESUME_HELP}")
    if dc.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={dc.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}")
    return cfg


def config_notes(cfg: RunConfig) -> list[str]:
    """Legal but probably unintended settings, as one-line notes for the start of a run."""
    tc = cfg.train
    notes = []
    if tc.warmup > tc.steps:
        notes.append(
            f"note: train.warmup={tc.warmup} is longer than the run (train.steps={tc.steps}): the learning rate "
            f"never reaches train.lr={tc.lr:g}"
        )
    moe = cfg.model.moe
    if tc.expert_chunk and moe is not None and moe.capacity_factor is not None:
        notes.append(
            f"note: train.expert_chunk={tc.expert_chunk} with model.moe.capacity_factor={moe.capacity_factor:g}: "
            "each chunk of a micro-batch's tokens gets its own expert capacity, so the drops differ from a run "
            "without chunks"
        )
    return notes


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a run config from YAML `path` (None: the built-in default run) and apply `overrides`."""
    return build_run_config(read_run_yaml(path) if path is not None else {}, list(overrides))


def run_config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The run config as a plain dict, with the model preset's name first in the model section."""
    d = to_dict(cfg)
    d["model"] = {"preset": cfg.preset, **d["model"]}
    return d


def run_config_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(run_config_dict(cfg), sort_keys=False, default_flow_style=False)


def _flow(value: Any) -> str:
    """One YAML value on one line (`[0.9, 0.95]`, `null`, `cosine`)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _annotated(d: dict[str, Any], default: Any, indent: str) -> list[str]:
    lines = []
    for key, value in d.items():
        dflt = default.get(key) if isinstance(default, dict) else None
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:" + ("" if isinstance(dflt, dict) else f"  # default: {_flow(dflt)}"))
            lines += _annotated(value, dflt, indent + "  ")
        else:
            note = "" if value == dflt else f"  # default: {_flow(dflt)}"
            lines.append(f"{indent}{key}: {_flow(value)}{note}")
    return lines


def show_config(cfg: RunConfig) -> str:
    """`linear-moe train --show-config`: the merged config as YAML, every key; a key whose value differs from
    its default says the default in a comment (model keys: the default of the preset, or of the built-in model)."""
    default = run_config_dict(RunConfig())
    default["model"] = {"preset": None, **to_dict(get_preset(cfg.preset) if cfg.preset else default_model())}
    head = ["# the merged run config; keys whose value differs from the default say the default in a comment"]
    return "\n".join(head + _annotated(run_config_dict(cfg), default, "")) + "\n"
