"""Plots of a run directory: `loss.png` (train and val loss vs step) and `expert_load.png`
(heat map, MoE layers x experts, of the last logged expert-load fractions). matplotlib is a core dependency."""

from __future__ import annotations

from pathlib import Path

from .logging import read_metrics


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib, a dependency of linear-moe: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path) -> list[Path]:
    """Write the plots of `run_dir` next to its metrics.jsonl; returns the files written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split", "train") == "train" and "loss" in r]
    val = [r for r in records if r.get("split") == "val" and "loss" in r]
    if not train:
        raise ValueError(f"no training records in {run_dir / 'metrics.jsonl'}; nothing to plot")
    plt = _pyplot()
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.set_title(run_dir.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(run_dir / "loss.png")

    loads = [r["expert_load"] for r in train if r.get("expert_load")]
    if loads:
        load_LE = loads[-1]
        fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(load_LE[0]) + 2), max(3, 0.4 * len(load_LE) + 1.5)))
        im = ax.imshow(load_LE, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert load fraction (step {[r['step'] for r in train if r.get('expert_load')][-1]})")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(run_dir / "expert_load.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "expert_load.png")
    return written
