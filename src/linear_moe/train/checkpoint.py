"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of `run_dir/checkpoints/`:

    step-0000100/         one complete checkpoint (state after 100 optimizer updates)
      .metadata, *.distcp   model + optimizer state (DCP; sharded per rank once FSDP is applied)
      rng-rank0.pt          python / numpy / torch / cuda RNG states of rank 0
      config.yaml           the merged run config
      meta.json             step, data position, versions, and the size and BLAKE2b checksum of every other
                            file (written last: its presence marks completeness)
    latest                  a text file naming the newest complete checkpoint (replaced with os.replace)
    abandoned-YYYYmmdd-HHMMSS/   checkpoints set aside by a rollback or because they failed verification

A checkpoint is written into `step-XXXXXXX.tmp` and renamed only when complete, then `latest` is
updated, then checkpoints of the current timeline (steps up to the one just written) beyond the last
`keep_last` are deleted; a crash at any point leaves the previous checkpoint and `latest` intact, and
`.tmp` directories are never chosen by `resume`. Loading verifies every file against meta.json, so a
truncated, missing or bit-flipped file is a one-line `CheckpointError` instead of wrong weights.
DCP works in a single process without an initialised process group.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..parallel.strided import for_dcp, from_dcp

CKPT_DIRNAME = "checkpoints"
LATEST = "latest"
META = "meta.json"
CONFIG = "config.yaml"
ABANDONED = "abandoned-"
_CHUNK = 1 << 22  # bytes read at a time while hashing


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or cannot be loaded into this model (one-line message)."""


def step_dirname(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: Path) -> int | None:
    """The step of a `step-XXXXXXX` directory name, None for any other name (`.tmp`, `.old`, ...)."""
    name = Path(path).name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and CUDA (all devices) as torch-loadable objects."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_key.copy()), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- find


def is_complete(path: Path) -> bool:
    """A renamed (non-.tmp) checkpoint directory holding its meta.json and DCP metadata."""
    return (
        path.is_dir() and not path.name.endswith(".tmp") and (path / META).is_file() and (path / ".metadata").is_file()
    )


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """Every `step-XXXXXXX` directory under `ckpt_root` (complete or not), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if step_of(p) is not None and p.is_dir()), key=step_of)


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under `ckpt_root`, oldest first."""
    return [p for p in _step_dirs(Path(ckpt_root)) if is_complete(p)]


def find_latest(ckpt_root: Path) -> Path | None:
    """The complete checkpoint with the highest step (not verified; see `find_verified`), else None."""
    found = list_checkpoints(Path(ckpt_root))
    return found[-1] if found else None


def find_verified(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under `ckpt_root` that verifies, and the newer ones that did not (each with its
    one-line reason), newest first."""
    skipped = []
    for path in reversed(_step_dirs(Path(ckpt_root))):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        return path, skipped
    return None, skipped


def read_meta(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"checkpoint {path}: incomplete (an interrupted save)")
    for name in (META, ".metadata", CONFIG):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: incomplete or corrupt (missing {name})")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: corrupt {META} ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: corrupt {META} (no step)")
    return meta


def file_digest(path: Path) -> str:
    """BLAKE2b hex digest of a file's bytes, read in chunks."""
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _manifest(path: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"size", "blake2b"}} of every file of checkpoint directory `path` except meta.json."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name != META)
    return {p.name: {"size": p.stat().st_size, "blake2b": file_digest(p)} for p in files}


_verified: dict[Path, int] = {}  # checkpoint -> meta.json mtime at its last successful verification


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file of checkpoint `path` against the sizes and checksums in its meta.json (checkpoints
    written before checksums were recorded get the structural checks only); returns the meta. One-line
    CheckpointError naming the checkpoint and the first bad file."""
    path = Path(path)
    meta = read_meta(path)
    key, stamp = path.resolve(), (path / META).stat().st_mtime_ns
    if _verified.get(key) == stamp:
        return meta
    files = meta.get("files")
    if not isinstance(files, dict):  # an older checkpoint without a manifest
        if (path / ".metadata").stat().st_size == 0:
            raise CheckpointError(f"checkpoint {path}: corrupt (.metadata is empty)")
        return meta
    for name, expected in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: incomplete or corrupt (missing {name})")
        size = f.stat().st_size
        if size != expected.get("size"):
            raise CheckpointError(f"checkpoint {path}: corrupt {name} ({size} bytes, {expected.get('size')} written)")
        if file_digest(f) != expected.get("blake2b"):
            raise CheckpointError(f"checkpoint {path}: corrupt {name} (checksum mismatch)")
    _verified[key] = stamp
    return meta


def read_config_text(path: Path) -> str:
    """The merged run config stored in checkpoint `path` (YAML text)."""
    read_meta(path)
    return (Path(path) / CONFIG).read_text()


def clean_leftovers(ckpt_root: Path) -> None:
    """Remove what interrupted saves leave behind (`*.tmp` directories, `latest.tmp`) and finish an interrupted
    re-save: `step-X.old` is restored when `step-X` is missing, else deleted. Only for the process that holds
    the run directory (see `run.lock_run_dir`)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        if p.name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif p.name.endswith(".old") and p.is_dir():
            final = p.with_name(p.name[: -len(".old")])
            if final.exists():
                shutil.rmtree(p)
            else:
                p.rename(final)


def set_aside(ckpt_root: Path, paths: list[Path]) -> Path | None:
    """Move checkpoint directories `paths` into `ckpt_root/abandoned-<time>/` (never deleted, never resumed
    from) and point `latest` at the newest remaining checkpoint. Returns the new directory (None: nothing moved)."""
    if not paths:
        return None
    ckpt_root = Path(ckpt_root)
    dest = ckpt_root / (ABANDONED + time.strftime("%Y%m%d-%H%M%S"))
    while dest.exists():
        dest = dest.with_name(dest.name + "x")
    dest.mkdir()
    for p in paths:
        p.rename(dest / p.name)
    newest = find_latest(ckpt_root)
    if newest is not None:
        _write_atomic(ckpt_root / LATEST, newest.name + "\n")
    else:
        (ckpt_root / LATEST).unlink(missing_ok=True)
    return dest


def newer_than(ckpt_root: Path, step: int) -> list[Path]:
    """Checkpoint directories under `ckpt_root` with a step above `step` (what a rollback to `step` abandons)."""
    return [p for p in _step_dirs(Path(ckpt_root)) if step_of(p) > step]


# ---------------------------------------------------------------------------------------------- save


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    config_yaml: str,
    meta: dict[str, Any],
    keep_last: int = 0,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write checkpoint `step` under `ckpt_root` atomically, update `latest`, keep the last `keep_last`
    (0 keeps all); `extra_files` (name -> source path, e.g. the tokenizer) are copied in. Returns the
    final directory."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dirname(step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(ckpt_root)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*existing checkpoint.*")
        state = for_dcp({"model": model_sd, "optimizer": optim_sd})  # strided shards as plain column blocks
        dcp.save(state, checkpoint_id=str(tmp), no_dist=_no_dist())
    torch.save(capture_rng(), tmp / f"rng-rank{_rank()}.pt")
    if _no_dist() is False:
        dist.barrier()
    if _rank() == 0:
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        (tmp / CONFIG).write_text(config_yaml)
        meta = {"step": step, **meta, "torch": torch.__version__, "files": _manifest(tmp)}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():  # re-saving a step (e.g. after a resume): replace only once the new one is complete
            old = final.with_name(final.name + ".old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _write_atomic(ckpt_root / LATEST, final.name + "\n")
        if keep_last > 0:  # the current timeline only: never a newer checkpoint, never the one just written
            timeline = [p for p in list_checkpoints(ckpt_root) if step_of(p) <= step]
            for old in timeline[:-keep_last]:
                if old != final:
                    shutil.rmtree(old)
    return final


# ---------------------------------------------------------------------------------------------- load


@contextlib.contextmanager
def _quiet_root_logger():
    """DCP logs a warning with a traceback on the root logger for every metadata file it cannot read; our
    one-line CheckpointError says the same."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    try:
        with warnings.catch_warnings(), _quiet_root_logger():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=str(path), no_dist=_no_dist())
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures; report the first one
        failures = getattr(e, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else e
        lines = str(cause).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path}: cannot be loaded into this model ({lines[-1] if lines else type(cause).__name__})"
        ) from None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng_state: bool = True
) -> dict[str, Any]:
    """Verify checkpoint `path` (`verify_checkpoint`), then load model (and optimizer, and this rank's RNG
    states) from it; returns its meta.

    With `optimizer=None` only the model weights are loaded (finetuning starts a fresh optimizer)."""
    path = Path(path)
    meta = verify_checkpoint(path)
    if optimizer is None:
        like = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        like = {"model": model_sd, "optimizer": optim_sd}
    state = for_dcp(like)  # loaded as written (strided shards as plain column blocks), then placed back
    _dcp_load(state, path)
    state = from_dcp(state, like)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if restore_rng_state:
        rng_file = path / f"rng-rank{_rank()}.pt"
        if not rng_file.is_file() and _rank() > 0:  # a rank the saving layout did not have: rank 0's states
            rng_file = path / "rng-rank0.pt"
        if not rng_file.is_file():
            raise CheckpointError(f"checkpoint {path}: incomplete or corrupt (missing {rng_file.name})")
        try:
            state = torch.load(rng_file, weights_only=True)
            restore_rng(state)
        except Exception as e:  # truncated or foreign file: pickle, zip and key errors
            raise CheckpointError(f"checkpoint {path}: corrupt {rng_file.name} ({_one_line(e)})") from None
    return meta


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
