"""Training configuration: `TrainConfig`, `FinetuneConfig`, and the whole-run `RunConfig`.

A run is one `RunConfig` = `model` (a `ModelConfig`, see "Presets" below) + `data` (a `DataConfig`)
+ `train` + `finetune`. It is read from YAML and `key=value` command-line overrides with
`load_run_config`; the merged, fully resolved config is written to `run_dir/config.yaml` and into
every checkpoint.

Presets: `model.preset: NAME` starts the model section from `get_preset(NAME)`; every model field
given explicitly (in the YAML file or as `model.FIELD=...` on the command line) then overrides the
preset's value. Without a preset the model starts from `ModelConfig()`'s defaults. The written
config keeps the preset's name and lists every field, so reloading it gives the same model.
Precedence, lowest first: dataclass defaults < preset < YAML file < command-line overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bf16", "fp32")
RESUME_HELP = "none (start fresh), auto (newest complete checkpoint in run_dir, else fresh) or a checkpoint path"


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing of one run."""

    steps: int = 400  # optimizer updates
    grad_accum: int = 1  # micro-batches per update
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the last step
    warmup: int = 30  # linear warmup steps
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying
    weight_decay: float = 0.1  # AdamW decay of weight matrices (not norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False  # recompute each block in backward (non-reentrant)
    compile: bool = False  # torch.compile each block
    log_every: int = 10  # steps between training log records
    eval_every: int = 100  # steps between validation losses (0 = only at the end)
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
    sample_prompt: str = "The "  # prompt of the sample printed at the end ("" = no sample)
    sample_tokens: int = 60  # tokens to sample
    sample_temperature: float = 0.7
    sample_top_k: int = 20


@dataclass
class FinetuneConfig:
    """Supervised finetuning (`linear-moe finetune`): the loss covers response tokens only."""

    from_checkpoint: str | None = None  # checkpoint directory to start from (set by `finetune --from`)
    prompt_key: str = "prompt"  # JSONL field of the prompt
    response_key: str = "response"  # JSONL field of the response
