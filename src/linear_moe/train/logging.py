"""Run logging: a tqdm progress bar, `metrics.jsonl`, TensorBoard and Weights & Biases.

Each call to `RunLogger.log(step, record)` appends one JSON line to `run_dir/metrics.jsonl`
(`{"step": .., "split": "train" | "val", ...}`; training records carry `expert_load` as a
`[layers][experts]` list of fractions) and sends the scalars to TensorBoard (`run_dir/tb`, when
`tensorboard` is installed) and W&B (when `wandb` is installed and a project is set). Optional
backends that are missing are skipped with a one-line note.

A logger that starts at step S > 0 (a resumed run) first drops the records after step S from
`metrics.jsonl` (they belong to steps that are redone), and one that starts at step 0 drops them all, so
the file holds each step once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def note(msg: str) -> None:
    """A one-line message on stderr that does not break the progress bar (from rank 0 only under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(msg, file=sys.stderr)


def _parse_records(path: Path) -> list[tuple[int, dict[str, Any] | None, str]]:
    """(line number, record or None when the line is not a JSON object with a step, line) of a metrics file."""
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            record = None
        out.append((lineno, record, line))
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of `run_dir/metrics.jsonl` in order. A cut-off last line (a run killed while writing) is
    skipped; any other bad line is a one-line ValueError naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir} (is it a run directory?)")
    parsed = _parse_records(path)
    for i, (lineno, record, _) in enumerate(parsed):
        if record is None and i < len(parsed) - 1:
            raise ValueError(f"{path}:{lineno}: not a metrics record (expected a JSON object with a step)")
    return [record for _, record, _ in parsed if record is not None]


def _drop_redone(path: Path, start_step: int) -> None:
    """Keep the records of steps <= `start_step` (none when it is 0) and drop a cut-off line; atomic rewrite."""
    if not path.is_file():
        return
    parsed = _parse_records(path)
    keep = [
        line for _, record, line in parsed if record is not None and start_step > 0 and record["step"] <= start_step
    ]
    if len(keep) == len(parsed):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class RunLogger:
    """Progress bar + JSONL + optional TensorBoard / W&B for one (rank-0) training process."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _drop_redone(self.run_dir / METRICS_FILE, start_step)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
        self._tb = self._open_tensorboard() if tensorboard else None
        self._wandb = self._open_wandb(wandb_project, config) if wandb_project else None
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            note("note: tensorboard is not installed; skipping TensorBoard logging (pip install tensorboard)")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def _open_wandb(self, project: str, config: dict[str, Any] | None):
        try:
            import wandb
        except ImportError:
            note("note: wandb is not installed; skipping W&B logging (pip install wandb)")
            return None
        return wandb.init(project=project, config=config, dir=str(self.run_dir), name=self.run_dir.name)

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Write one record (JSON-serialisable values; None values are dropped)."""
        record = {"step": step, **{k: v for k, v in record.items() if v is not None}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        split = record.get("split", "train")
        scalars = {
            f"{split}/{k}": v
            for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        """Move the bar to `step` and show `postfix`."""
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(postfix, refresh=False)

    def write(self, msg: str) -> None:
        if not self._bar.disable:
            self._bar.write(msg)

    def close(self) -> None:
        self._bar.close()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
