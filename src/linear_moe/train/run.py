"""What `linear-moe train` and `linear-moe finetune` do: resolve the config, check the run directory,
prepare/open the data, build the model, train, plot, and print a sample.

Run directory (`train.run_dir`):

    config.yaml       the merged config of the latest invocation
    data/             the prepared dataset when data.path is not set
    checkpoints/      step-XXXXXXX/ (+ tokenizer.json), latest
    metrics.jsonl     training and validation records
    tb/               TensorBoard events
    loss.png, expert_load.png

A new run (`train.resume=none`) refuses a non-empty run directory; `train.resume=auto` continues
from the newest checkpoint that verifies (or starts fresh when there is none) and refuses a run directory
whose stored config has a different model or data section. A run holds an exclusive lock on its run
directory (`flock`, released by the kernel when the process ends, however it ends), so a second run
into the same directory stops with one line. Everything is checked (config, data, model, the checkpoint
to load) before the run directory's config.yaml is written or a checkpoint is moved. Resuming from a
checkpoint older than others in the run directory (a rollback), or past newer ones that fail
verification, moves those newer ones to `checkpoints/abandoned-<time>/` (with a copy of metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import ConfigError, check_directory_path
from ..parallel.config import run_layout
from ..parallel.launch import distributed, is_rank0, rank0_first
from . import checkpoint as ckpt
from .config import (
    RunConfig,
    build_run_config,
    config_notes,
    load_run_config,
    read_run_yaml,
    run_config_dict,
    run_config_yaml,
)
from .logging import METRICS_FILE, note
from .trainer import Trainer, resolve_device

TOKENIZER_FILE = "tokenizer.json"


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as `key: old -> new`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += _differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_same_model_and_data(stored_yaml: str, cfg: RunConfig, where: str, sections=("model", "data")) -> None:
    """Refuse to continue `where` (a run dir or checkpoint) when its stored config differs in `sections`."""
    stored = yaml.safe_load(stored_yaml) or {}
    new = run_config_dict(cfg)
    diffs = [d for s in sections for d in _differences(stored.get(s), new.get(s), s)]
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ConfigError(f"{where} was written with a different config: {diffs[0]}{more}; use a new train.run_dir")


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` (created if needed) while the block runs; a second process gets a
    one-line ConfigError. The lock is `flock` on the directory itself: nothing is left behind, and the kernel
    releases it when the process ends, also after kill -9. Only the writing process (RANK 0) locks."""
    run_dir = Path(run_dir)
    check_directory_path(run_dir, "train.run_dir")
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        fcntl = None
    if fcntl is None or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"run directory {run_dir} is in use by another linear-moe run; wait for it to end or choose "
                "another train.run_dir"
            ) from None
        _clean_prepare_leftovers(run_dir)
        yield
    finally:
        if created:  # a run that failed before writing anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        os.close(fd)


def _clean_prepare_leftovers(run_dir: Path) -> None:
    """Temporary directories of an on-the-fly `prepare` that was killed (only safe while holding the lock)."""
    for p in list(run_dir.glob(".data.tmp-*")) + list(run_dir.glob(".data.old-*")):
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to continue from (None: start fresh); refuses to overwrite an existing run. Under
    `train.resume=auto`, the newest checkpoint that verifies (saying which newer ones did not)."""
    run_dir, resume = Path(cfg.train.run_dir), cfg.train.resume
    if resume == "none":
        # a run directory holding only the data prepared by an earlier attempt is still free
        if run_dir.is_dir() and any(p.name != "data" for p in run_dir.iterdir()):
            raise ConfigError(
                f"run directory {run_dir} is not empty; continue it with train.resume=auto or choose a new "
                "train.run_dir"
            )
        return None
    ckpt_root = run_dir / ckpt.CKPT_DIRNAME
    ckpt.clean_leftovers(ckpt_root)
    if resume == "auto":
        path, skipped = ckpt.find_verified(ckpt_root)
        if skipped:
            more = f" (and {len(skipped) - 1} newer ones)" if len(skipped) > 1 else ""
            start = f"resuming from {path.name}" if path is not None else "starting fresh"
            note(f"note: {skipped[-1][1]}{more}; {start}; it is moved to {ckpt_root}/{ckpt.ABANDONED}<time>/")
        return path
    path = Path(resume)
    ckpt.verify_checkpoint(path)
    return path


def _set_aside_newer(cfg: RunConfig, resume_from: Path | None) -> None:
    """Move the run directory's checkpoints newer than the one resumed (a rollback, or ones that failed
    verification) to checkpoints/abandoned-<time>/, with a copy of metrics.jsonl: the new timeline starts here."""
    run_dir = Path(cfg.train.run_dir)
    step = ckpt.read_meta(resume_from)["step"] if resume_from is not None else -1
    newer = ckpt.newer_than(run_dir / ckpt.CKPT_DIRNAME, step)
    dest = ckpt.set_aside(run_dir / ckpt.CKPT_DIRNAME, newer)
    if dest is None:
        return
    if (run_dir / METRICS_FILE).is_file():
        shutil.copyfile(run_dir / METRICS_FILE, dest / METRICS_FILE)
    if cfg.train.resume != "auto":  # resolve_resume said why under auto
        names = ", ".join(p.name for p in newer)
        note(f"note: rolling back to step {step}: the newer checkpoints ({names}) are moved to {dest}")


def ensure_dataset(cfg: RunConfig) -> Path:
    """The prepared dataset directory: data.path, or run_dir/data; prepared from data.inputs if missing."""
    from ..data import prepare

    path = Path(cfg.data.path) if cfg.data.path else Path(cfg.train.run_dir) / "data"
    if (path / "meta.json").is_file():
        return path
    if not cfg.data.inputs:
        raise ConfigError(f"no prepared dataset at {path} and data.inputs is empty; set data.path or data.inputs")
    note(f"preparing {', '.join(cfg.data.inputs)} into {path}")
    prepare(
        cfg.data.inputs,
        path,
        tokenizer=cfg.data.tokenizer,
        vocab_size=cfg.data.vocab_size,
        text_field=cfg.data.text_field,
        split_docs=cfg.data.split_docs,
        val_fraction=cfg.data.val_fraction,
        progress=cfg.train.progress,
    )
    return path


def build_model(cfg: RunConfig, fresh: bool = True) -> torch.nn.Module:
    """The model of `cfg`, initialised from train.seed; a fresh run with model.init_from then copies / maps the
    weights of that Hugging Face MoE (docs/hf.md)."""
    from ..model import LinearMoEForCausalLM

    torch.manual_seed(cfg.train.seed)
    model = LinearMoEForCausalLM(cfg.model)
    if cfg.model.init_from and fresh:
        from ..hf import linearise

        note(linearise(model, cfg.model.init_from).summary())
    return model


def describe(cfg: RunConfig, n_tokens: int) -> str:
    """One line: the model's shape and size, the data, the run directory."""
    from ..model import count_params

    m = cfg.model
    total, active = count_params(m), count_params(m, active=True)
    moe = f", MoE {m.moe.family} {m.moe.num_experts} experts top-{m.moe.top_k}" if m.moe is not None else ""
    return (
        f"model: {cfg.preset + ', ' if cfg.preset else ''}{m.mixer} pattern {m.layer_pattern or 'L'}, "
        f"{m.num_layers} layers, hidden {m.hidden_size}{moe}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M "
        f"active); data: {n_tokens:,} tokens; run dir: {cfg.train.run_dir}"
    )


def first_step_note(device_type: str, autotune: str) -> str | None:
    """What to expect of the first step: on CUDA, fla's kernels compile and (fully) autotune then."""
    if device_type != "cuda":
        return None
    if autotune == "full":
        return (
            "note: the first steps compile and autotune fla's Triton kernels (several minutes on a cold machine; "
            "train.autotune=few bounds it)"
        )
    return f"note: the first steps compile fla's Triton kernels (train.autotune={autotune})"


def _build_trainer(cfg: RunConfig, ds, resume_from: Path | None, tokenizer_path: Path) -> Trainer:
    """Build the model and its Trainer (shared by pretraining and finetuning); nothing is written yet."""
    _check_run_dir(cfg, resume_from)
    return Trainer(
        cfg,
        build_model(cfg, fresh=resume_from is None),
        ds,
        ds.val,
        config_yaml=run_config_yaml(cfg),
        flops_per_token=_flops(cfg),
        extra_files={TOKENIZER_FILE: tokenizer_path},
    )


def _start(cfg: RunConfig, trainer: Trainer, resume_from: Path | None) -> None:
    """Load the checkpoint to continue from (all checks done), then commit to the run: set newer checkpoints
    aside, write the run directory's config.yaml. A failure before this leaves the run directory as it was."""
    if resume_from is not None:
        trainer.resume(resume_from)
    if is_rank0():  # the one writing process under torchrun
        _set_aside_newer(cfg, resume_from)
        run_dir = Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ckpt.CONFIG).write_text(trainer.config_yaml)
    if trainer.mesh is not None:
        note(f"layout: {trainer.layout.describe()} on {trainer.device.type}")
    if resume_from is not None:
        note(f"resumed from {resume_from} at step {trainer.step}")
    for text in config_notes(cfg) + [first_step_note(trainer.device.type, cfg.train.autotune)]:
        if text is not None:
            note(text)


def _flops(cfg: RunConfig) -> float | None:
    from ..model import flops_per_token

    return float(flops_per_token(cfg.model, cfg.data.seq_len))


def _check_run_dir(cfg: RunConfig, resume_from: Path | None) -> None:
    """A continued run must keep the model and data of its stored config (and of the checkpoint it resumes)."""
    stored = Path(cfg.train.run_dir) / ckpt.CONFIG
    if stored.is_file() and cfg.train.resume != "none":
        check_same_model_and_data(stored.read_text(), cfg, f"run directory {cfg.train.run_dir}")
    if resume_from is not None:
        check_same_model_and_data(ckpt.read_config_text(resume_from), cfg, f"checkpoint {resume_from}", ("model",))


def _finish(cfg: RunConfig, trainer: Trainer, summary: dict[str, Any], tokenizer_path: Path, chat: bool) -> None:
    """After training: the plots, the summary line, a sample (each on its own; the sample runs on every rank, since
    a sharded model needs them all, and rank 0 prints)."""
    tc = cfg.train
    if tc.plot and is_rank0():
        _plot(Path(tc.run_dir))
    if (line := summary_line(summary)) is not None and is_rank0():
        print(line)
    model = trainer.model
    split = getattr(model, "runner", None) is not None or getattr(model, "tensor_parallel", None) is not None
    if tc.sample_prompt and tc.sample_tokens > 0 and split:
        note("note: no sample under pipeline or tensor parallelism (decoding runs in one process: linear-moe generate)")
    elif tc.sample_prompt and tc.sample_tokens > 0:
        text = _sample(tc, trainer.model, tokenizer_path, chat)
        if is_rank0():
            print(f"sample: {tc.sample_prompt}{text}" if not chat else f"sample ({tc.sample_prompt!r}): {text}")


def _plot(run_dir: Path) -> None:
    try:
        from .plot import plot_run

        plot_run(run_dir)
    except ImportError as e:
        note(f"note: {e}; skipping plots")


def summary_line(summary: dict[str, Any]) -> str | None:
    """`trained N steps in S s: loss a -> b, val loss c; checkpoint PATH` (None when no step ran)."""
    first, last, val = summary["first_loss"], summary["last_loss"], summary["val_loss"]
    if first is None:
        return None
    val_text = f", val loss {val:.3f}" if val is not None else ""
    return (
        f"trained {summary['steps']} steps in {summary['seconds']:.0f}s: loss {first:.3f} -> {last:.3f}{val_text}; "
        f"checkpoint {summary['checkpoint']}"
    )


def _sample(tc, model: torch.nn.Module, tokenizer_path: Path, chat: bool) -> str:
    from ..data import Tokenizer
    from ..generate import sample_text

    tok = Tokenizer.from_file(tokenizer_path)
    return sample_text(
        model, tok, tc.sample_prompt, tc.sample_tokens, tc.sample_temperature, tc.sample_top_k, tc.seed, chat
    )


def check_model(cfg: RunConfig) -> None:
    """Build the model on the meta device (no memory, no time): a model the mixers or the MoE refuse (e.g.
    num_heads not dividing hidden_size) fails before the data is prepared, not after minutes of tokenizing."""
    from ..model import LinearMoEForCausalLM

    with torch.device("meta"):
        LinearMoEForCausalLM(cfg.model)


def run_training(config: str | None, overrides: list[str]) -> dict[str, Any]:
    """`linear-moe train`: see the module docstring."""
    from ..data import PackedDataset

    cfg = load_run_config(config, overrides)
    if cfg.model.init_from:  # the architecture comes from a pretrained Hugging Face MoE (docs/hf.md)
        from ..hf import run_config_from_hf

        cfg = run_config_from_hf(cfg)
    check_model(cfg)
    with distributed(resolve_device(cfg.train.device).type), lock_run_dir(Path(cfg.train.run_dir)):
        rows = cfg.data.micro_batch_size // run_layout(cfg).dp  # each data-parallel rank's share
        with rank0_first():  # under torchrun, rank 0 prepares the data before the others look
            resume_from = resolve_resume(cfg)
            data_dir = ensure_dataset(cfg)
        ds = PackedDataset(data_dir, cfg.data.seq_len, rows, cfg.data.seed)
        cfg = _with_vocab(cfg, ds.vocab_size)
        trainer = _build_trainer(cfg, ds, resume_from, data_dir / TOKENIZER_FILE)
        note(describe(cfg, ds.num_tokens))
        _start(cfg, trainer, resume_from)
        summary = trainer.fit()
        _finish(cfg, trainer, summary, data_dir / TOKENIZER_FILE, chat=False)
    return summary


def _with_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    """model.vocab_size follows the data's tokenizer (a model started from model.init_from keeps its vocabulary,
    which must hold the tokenizer's ids)."""
    if cfg.model.init_from:
        from ..hf import check_vocab

        check_vocab(cfg.model, vocab_size)
        return cfg
    new = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    new.preset = cfg.preset
    return new


def _check_batches(ds: Any, what: str) -> None:
    """Fail before training when `ds` cannot fill one micro-batch."""
    from ..data import DataError

    try:
        ds.get_batch(0)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None


def load_finetune_config(config: str | None, from_checkpoint: str, overrides: list[str]) -> RunConfig:
    """Model section from the checkpoint; data/train/finetune from CONFIG and overrides."""
    source = Path(from_checkpoint)
    stored = yaml.safe_load(ckpt.read_config_text(source)) or {}
    raw = read_run_yaml(config) if config is not None else {}
    if raw.get("model") or any(o.split("=", 1)[0].startswith("model.") for o in overrides):
        raise ConfigError(f"finetune takes the model from the checkpoint {source}; remove the model settings")
    raw["model"] = {**stored.get("model", {}), "init_from": None}  # the weights come from the checkpoint
    cfg = build_run_config(raw, overrides)
    cfg.finetune.from_checkpoint = str(source)
    return cfg


def run_finetuning(config: str | None, from_checkpoint: str, overrides: list[str]) -> dict[str, Any]:
    """`linear-moe finetune`: SFT from a checkpoint with a fresh optimizer (loss on response tokens only)."""
    cfg = load_finetune_config(config, from_checkpoint, overrides)
    with distributed(resolve_device(cfg.train.device).type), lock_run_dir(Path(cfg.train.run_dir)):
        return _finetune(cfg, Path(from_checkpoint))


def _finetune(cfg: RunConfig, source: Path) -> dict[str, Any]:
    from ..data import SFTDataset

    rows = cfg.data.micro_batch_size // run_layout(cfg).dp  # each data-parallel rank's share
    resume_from = resolve_resume(cfg)
    ft = cfg.finetune
    if not ft.data:
        raise ConfigError("finetune needs finetune.data: a chat JSONL file (prompt/response or messages records)")
    tokenizer_path = source / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise ckpt.CheckpointError(f"checkpoint {source}: incomplete or corrupt (missing {TOKENIZER_FILE})")
    ds = SFTDataset(
        ft.data,
        tokenizer_path,
        cfg.data.seq_len,
        rows,
        cfg.data.seed,
        prompt_key=ft.prompt_key,
        response_key=ft.response_key,
        val_fraction=ft.val_fraction,
    )
    _check_batches(ds, "finetune.data")
    if ds.val is not None:
        _check_batches(ds.val, "the validation split (finetune.val_fraction)")
    trainer = _build_trainer(cfg, ds, resume_from, tokenizer_path)
    if resume_from is None:  # the weights must fit before anything is written
        ckpt.load_checkpoint(source, trainer.model, optimizer=None, restore_rng_state=False)
    _start(cfg, trainer, resume_from)
    if resume_from is None:
        note(f"finetuning from {source} ({ds.num_tokens:,} tokens in {len(ds.examples)} examples)")
    summary = trainer.fit()
    _finish(cfg, trainer, summary, tokenizer_path, chat=True)
    return summary
