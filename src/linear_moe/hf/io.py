"""Files of Hugging Face directories: config.json, safetensors weights (never pickle), tokenizer files, and
directories written atomically (into a temporary sibling, renamed when complete: a failure leaves nothing)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_JSON = "tokenizer.json"


class HFError(ValueError):
    """A Hugging Face directory or conversion that cannot be done (one line naming the problem and the fix)."""


def read_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed config.json of a Hugging Face model directory; one-line errors for anything else."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFError(f"{hf_dir} is not a directory; give a Hugging Face model directory (config.json + safetensors)")
    path = hf_dir / CONFIG_JSON
    if not path.is_file():
        raise HFError(f"{hf_dir} is not a Hugging Face model directory (no {CONFIG_JSON})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFError(f"{path}: expected a JSON object")
    return config


def weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of `hf_dir` (one file, or the shards named by the index)."""
    if (hf_dir / WEIGHTS).is_file():
        return [hf_dir / WEIGHTS]
    if (hf_dir / WEIGHTS_INDEX).is_file():
        index = json.loads((hf_dir / WEIGHTS_INDEX).read_text())
        return [hf_dir / name for name in sorted(set(index.get("weight_map", {}).values()))]
    pickled = [p.name for p in sorted(hf_dir.glob("*.bin")) + sorted(hf_dir.glob("*.pt"))]
    hint = f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
    raise HFError(
        f"{hf_dir} has no {WEIGHTS}{hint}; save the model with save_pretrained(dir) (safetensors is the default)"
    )


def read_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files, by name (on CPU)."""
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(Path(hf_dir)):
        if not path.is_file():
            raise HFError(f"{path} is missing (named by {WEIGHTS_INDEX})")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
            raise HFError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return out


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `out` when the block completes; on any error it is removed
    and `out` is untouched. An existing non-empty `out` is refused unless `overwrite`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HFError(f"{out} already exists and is not empty; choose a new output directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    tmp.rename(out)
