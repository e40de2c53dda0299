"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of `run_dir/checkpoints/`:

    step-0000100/         one complete checkpoint (state after 100 optimizer updates)
      .metadata, *.distcp   model + optimizer state (DCP; sharded per rank once FSDP is applied)
      rng-rank0.pt          python / numpy / torch / cuda RNG states of rank 0
      config.yaml           the merged run config
      meta.json             step, data position, versions (written last: its presence marks completeness)
    latest                  a text file naming the newest complete checkpoint (replaced with os.replace)

A checkpoint is written into `step-XXXXXXX.tmp` and renamed only when complete, then `latest` is
updated, then checkpoints beyond the last `keep_last` are deleted; a crash at any point leaves the
previous checkpoint and `latest` intact, and `.tmp` directories are never chosen by `resume`.
DCP works in a single process without an initialised process group.
"""

from __future__ import annotations

import json
import os
import random
import shutil
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

CKPT_DIRNAME = "checkpoints"
LATEST = "latest"
META = "meta.json"
CONFIG = "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt or cannot be loaded into this model (one-line message)."""


def step_dirname(step: int) -> str:
    return f"step-{step:07d}"


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


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under `ckpt_root`, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*") if p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_latest(ckpt_root: Path) -> Path | None:
    """The checkpoint named by `latest` if complete, else the newest complete one, else None."""
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        named = ckpt_root / pointer.read_text().strip()
        if is_complete(named):
            return named
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


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
        return json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: corrupt {META} ({e})") from None


def read_config_text(path: Path) -> str:
    """The merged run config stored in checkpoint `path` (YAML text)."""
    read_meta(path)
    return (Path(path) / CONFIG).read_text()


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
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted save
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*existing checkpoint.*")
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp), no_dist=_no_dist())
    torch.save(capture_rng(), tmp / f"rng-rank{_rank()}.pt")
    if _no_dist() is False:
        dist.barrier()
    if _rank() == 0:
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        (tmp / CONFIG).write_text(config_yaml)
        (tmp / META).write_text(json.dumps({"step": step, **meta, "torch": torch.__version__}, indent=2) + "\n")
        if final.exists():  # re-saving a step (e.g. after a resume): replace only once the new one is complete
            old = final.with_name(final.name + ".old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _write_atomic(ckpt_root / LATEST, final.name + "\n")
        if keep_last > 0:
            for old in list_checkpoints(ckpt_root)[:-keep_last]:
                shutil.rmtree(old)
    return final


# ---------------------------------------------------------------------------------------------- load


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    try:
        with warnings.catch_warnings():
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
    """Load model (and optimizer, and this rank's RNG states) from checkpoint `path`; returns its meta.

    With `optimizer=None` only the model weights are loaded (finetuning starts a fresh optimizer)."""
    path = Path(path)
    meta = read_meta(path)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        _dcp_load(state, path)
        set_model_state_dict(model, state["model"])
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        _dcp_load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if restore_rng_state:
        rng_file = path / f"rng-rank{_rank()}.pt"
        if not rng_file.is_file():
            raise CheckpointError(f"checkpoint {path}: incomplete or corrupt (missing {rng_file.name})")
        restore_rng(torch.load(rng_file, weights_only=True))
    return meta
