"""`linear-moe bench report`: merge JSON files of one mode (e.g. one per mixer) into one table, JSON and plot.

This module also holds what every bench mode hands back: `Record`s, printed as a table, written as JSON, drawn as
PNG plots. A record is one (name, shape) measurement: `tokens` processed in `steps` timed calls took `seconds`, so
`tokens_per_s == tokens / seconds` by construction. The JSON file is rewritten after every record, so a bench cut
short (a time limit, an out-of-memory kernel) still leaves what it measured; the plots (tokens/s and peak memory
against sequence length, one line per name) are drawn at the end, or from saved JSON files by `linear-moe bench
report`.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from linear_moe.bench.timer import Timing, free_memory, time_calls


@dataclass
class Record:
    """One measurement. `seq_len` is the tokens per sequence (the context length for decoding); `tokens` the
    tokens processed by the `steps` timed calls; `layout` "packed" when `batch` documents share one row."""

    mode: str
    name: str
    batch: int
    seq_len: int
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_mem_gib: float | None = None
    layout: str = "rows"
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def measured(
        cls, mode: str, name: str, batch: int, seq_len: int, tokens_per_step: int, timing: Timing, **kwargs: Any
    ) -> Record:
        """A record from a `Timing` of calls that each process `tokens_per_step` tokens."""
        tokens = tokens_per_step * timing.iters
        return cls(
            mode,
            name,
            batch,
            seq_len,
            tokens,
            timing.iters,
            timing.seconds,
            tokens / timing.seconds,
            timing.peak_mem_gib,
            **kwargs,
        )

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.seq_len}" + (":packed" if self.layout == "packed" else "")

    @property
    def label(self) -> str:
        """The plot line this record belongs to."""
        return self.name + (" (packed)" if self.layout == "packed" else "")

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else float("nan")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def format_table(records: list[Record]) -> str:
    """A fixed-width table: name, shape, tokens/s, ms per step, peak GiB, then each `extra` key."""
    extras = list(dict.fromkeys(k for r in records for k in r.extra))
    head = ["name", "shape", "tokens/s", "ms/step", "peak GiB", *extras]
    rows = []
    for r in records:
        if r.error:
            rows.append([r.name, r.shape, r.error, "", "", *[""] * len(extras)])
            continue
        mem = "-" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.1f}"
        rows.append(
            [r.name, r.shape, f"{r.tokens_per_s:,.0f}", f"{r.ms_per_step:.2f}", mem]
            + [_fmt(r.extra.get(k, "")) for k in extras]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    lines = [
        "  ".join(
            str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _seq_label(t: int) -> str:
    return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def format_pivot(records: list[Record]) -> str:
    """A Markdown table as in docs/benchmarks.md: one row per line (`Record.label`), one column of tokens/s per
    sequence length, then the largest peak memory of the row ("OOM" where a shape ran out of memory)."""
    seq_lens = sorted({r.seq_len for r in records})
    rows: dict[str, dict[int, Record]] = {}
    for r in records:
        rows.setdefault(r.label, {})[r.seq_len] = r
    head = ["", *(f"{_seq_label(t)} tokens/s" for t in seq_lens), "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_len in rows.items():
        cells = []
        for t in seq_lens:
            r = by_len.get(t)
            cells.append("" if r is None else "OOM" if r.error else f"{r.tokens_per_s / 1e3:.1f}k")
        mems = [r.peak_mem_gib for r in by_len.values() if not r.error and r.peak_mem_gib is not None]
        lines.append("| " + " | ".join([label, *cells, f"{max(mems):.1f}" if mems else "-"]) + " |")
    return "\n".join(lines)


def _jsonable(v: Any) -> bool:
    return (
        v is None
        or isinstance(v, (str, int, float, bool))
        or (isinstance(v, (list, tuple)) and all(_jsonable(x) for x in v))
    )


def environment() -> dict[str, str]:
    """Where the figures come from: the GPU (or CPU), Python and the versions of the packages that run kernels."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version(), "torch": torch.__version__}
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    for package in ("fla-core", "transformers"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            pass
    if "triton" in sys.modules:  # imported by limit_autotune; the carried Triton has no reliable metadata
        env["triton"] = sys.modules["triton"].__version__
    return env


class Report:
    """Records of one bench mode, kept in `out/<mode>.json` (rewritten after each record) and drawn into
    `out/<mode>.png`."""

    def __init__(self, mode: str, out: str | Path, meta: dict[str, Any] | None = None):
        self.mode, self.out = mode, Path(out)
        self.meta = {**environment(), **{k: v for k, v in (meta or {}).items() if _jsonable(v)}}
        self.records: list[Record] = []
        self.summary: dict[str, Any] = {}

    @property
    def json_path(self) -> Path:
        return self.out / f"{self.mode}.json"

    @property
    def png_path(self) -> Path:
        return self.out / f"{self.mode}.png"

    def add(self, record: Record) -> Record:
        self.records.append(record)
        if record.error:
            print(f"  {record.name} {record.shape}: {record.error}", flush=True)
        else:
            mem = "" if record.peak_mem_gib is None else f"  peak {record.peak_mem_gib:.1f} GiB"
            print(f"  {record.name} {record.shape}: {record.tokens_per_s:,.0f} tokens/s{mem}", flush=True)
        self.write_json()
        return record

    def measure(
        self,
        name: str,
        batch: int,
        seq_len: int,
        make_step: Callable[[], Callable[[], object]],
        device: torch.device,
        steps: int,
        warmup: int,
        tokens_per_step: int | None = None,
        packed: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Record:
        """Build the step (`make_step()`), time it (`time_calls`) and add its record; a step that runs out of GPU
        memory becomes an error record. `tokens_per_step` defaults to batch * seq_len; `extra` values that are
        callables get the record (e.g. MFU from tokens/s)."""
        layout = "packed" if packed else "rows"
        label = f"{name} {batch}x{seq_len}"
        try:
            timing = time_calls(make_step(), device, steps, warmup, label=label if device.type == "cuda" else None)
        except torch.OutOfMemoryError:
            record = Record(self.mode, name, batch, seq_len, layout=layout, error="out of memory")
        else:
            tokens = batch * seq_len if tokens_per_step is None else tokens_per_step
            record = Record.measured(self.mode, name, batch, seq_len, tokens, timing, layout=layout)
            record.extra = {k: v(record) if callable(v) else v for k, v in (extra or {}).items()}
        free_memory(device)
        return self.add(record)

    def write_json(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "mode": self.mode,
            "meta": self.meta,
            "records": [asdict(r) for r in self.records],
            "summary": self.summary,
        }
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self.json_path)
        return self.json_path

    def finish(self, plot: bool = True, title: str = "") -> list[Path]:
        """Print the table, write the JSON and (with `plot`) the PNG; returns the files written."""
        print(format_table(self.records))
        print("\n" + format_pivot(self.records) + "\n")
        written = [self.write_json()]
        if plot:
            written.append(plot_records(self.records, self.png_path, title or f"linear-moe bench {self.mode}"))
        print("wrote " + ", ".join(str(p) for p in written))
        return written


def load_report(path: str | Path) -> tuple[str, dict[str, Any], list[Record]]:
    """(mode, meta, records) of a JSON file written by `Report`."""
    try:
        doc = json.loads(Path(path).read_text())
        return doc["mode"], doc.get("meta", {}), [Record(**r) for r in doc["records"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a bench JSON file written by `linear-moe bench` ({e})") from None


def plot_records(records: list[Record], path: str | Path, title: str) -> Path:
    """Two panels against sequence length (log2 axis): tokens/s and peak memory, one line per `Record.label`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("bench plots need matplotlib: pip install matplotlib (or pass --no-plot)") from None
    lines: dict[str, list[Record]] = {}
    for r in records:
        if not r.error:
            lines.setdefault(r.label, []).append(r)
    fig, (ax_tok, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rs in lines.items():
        rs = sorted(rs, key=lambda r: r.seq_len)
        style = {"marker": "o", "linestyle": "--" if "attention" in label or label.startswith("softmax") else "-"}
        ax_tok.plot([r.seq_len for r in rs], [r.tokens_per_s for r in rs], label=label, **style)
        mem = [r for r in rs if r.peak_mem_gib is not None]
        if mem:
            ax_mem.plot([r.seq_len for r in mem], [r.peak_mem_gib for r in mem], label=label, **style)
    for ax, ylabel in ((ax_tok, "tokens/s"), (ax_mem, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if any(r.peak_mem_gib is not None for rs in lines.values() for r in rs):
        ax_mem.legend(fontsize=8)
    else:
        ax_mem.text(
            0.5, 0.5, "peak memory is measured on CUDA only", ha="center", va="center", transform=ax_mem.transAxes
        )
    if lines:
        ax_tok.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> Report:
    """Merge `args.files` (JSON files of one mode) into `args.out/<mode>.json` and `<mode>.png`."""
    loaded = [load_report(f) for f in args.files]
    modes = sorted({mode for mode, _, _ in loaded})
    if len(modes) != 1:
        raise ValueError(f"bench report: the files hold different modes ({', '.join(modes)}); merge one mode at a time")
    report = Report(modes[0], args.out, {**loaded[0][1], "merged_from": [str(f) for f in args.files]})
    report.records = [r for _, _, records in loaded for r in records]
    report.finish(plot=not args.no_plot, title=f"linear-moe bench {modes[0]}")
    return report
