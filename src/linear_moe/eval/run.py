"""`linear-moe eval CHECKPOINT --tasks ...` and `--perplexity FILE`: results as a table on stdout and as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..generate.loader import load_model
from .scoring import perplexity

EVAL_EXTRA = "pip install 'linear-moe[eval]'"


def _import_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(f"linear-moe eval --tasks needs lm-evaluation-harness: {EVAL_EXTRA}") from None
    from . import harness

    return harness


def check_tasks(tasks: list[str], task_manager) -> None:
    """One-line error for a task lm-eval does not know (registered, or a YAML under --include-path)."""
    known = set(task_manager.all_tasks)
    for task in tasks:
        if task not in known:
            near = sorted(t for t in known if task.lower() in t.lower())[:5]
            hint = f"; similar: {', '.join(near)}" if near else ""
            raise ValueError(
                f"unknown task {task!r}{hint} (lm-eval's tasks, or a task YAML in a directory given with "
                "--include-path)"
            )


def run_tasks(
    checkpoint: str,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 16,
    out: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    builtin_tasks: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint on lm-eval `tasks`; prints lm-eval's table, writes `out` (JSON) and returns the
    results dict (`results`, `configs`, `versions`, `n-shot`, and our `checkpoint`). Tasks are looked up under
    `include_path` first; lm-eval's own (thousands of YAML files, slow to index) only when one is not there and
    `builtin_tasks`."""
    harness = _import_harness()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    if not tasks:
        raise ValueError("give at least one task with --tasks (comma separated)")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: not a directory")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or (builtin_tasks and not set(tasks) <= set(manager.all_tasks)):
        manager = TaskManager(include_path=include_path)
    check_tasks(tasks, manager)
    loaded = load_model(checkpoint, device, dtype)
    lm = harness.LinearMoELM(loaded=loaded, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
        **dict.fromkeys(("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"), seed),
    )
    report = {k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot") if k in results}
    report["checkpoint"] = str(loaded.path)
    print(make_table(results))
    _write_json(out, report)
    return report


def run_perplexity(
    checkpoint: str, file: str, out: str | None = None, chunk: int = 2048, device: str = "auto", dtype: str = "auto"
) -> dict[str, Any]:
    """Perplexity of a text file's contents (one document); prints a table and writes `out` (JSON)."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"--perplexity {file}: file not found")
    loaded = load_model(checkpoint, device, dtype)
    result = perplexity(loaded.model, loaded.tokenizer, path.read_text(encoding="utf-8"), chunk).as_dict()
    report = {"perplexity": {str(path): result}, "checkpoint": str(loaded.path)}
    print("| file | tokens | nll/token | perplexity | bits/byte |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| {path} | {result['tokens']} | {result['nll_per_token']:.4f} | {result['perplexity']:.3f} | "
        f"{result['bits_per_byte']:.4f} |"
    )
    _write_json(out, report)
    return report


def _write_json(out: str | None, report: dict[str, Any]) -> None:
    if out is None:
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
