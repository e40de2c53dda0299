"""`linear-moe bench decode`: per-token latency, tokens/s and memory of step-by-step decoding against context.

The measurement is generation's own `benchmark_decode` (`generate/cuda_graph.py`): for each context length C the
model (bf16 weights on CUDA, no gradients) starts from states as after C tokens (preallocated by
`model.init_states`, KV caches filled with C random keys and values: a step's cost does not depend on the values),
runs `--warmup` steps, then times `--steps` single-token steps of B rows, replayed from a CUDA graph on CUDA unless
`--eager`. A linear mixer's state has the same size at every context; softmax attention's KV cache grows with C,
which the `state_MiB` column and the memory plot show. tokens/s counts the B tokens each step produces;
`ms_per_token` is one step's latency.
"""

from __future__ import annotations

import argparse

from linear_moe.bench.model import build_model, model_config
from linear_moe.bench.report import Record, Report
from linear_moe.bench.timer import Timing, free_memory, resolve_device
from linear_moe.generate.cuda_graph import benchmark_decode
from linear_moe.ops.autotune import limit_autotune

BASELINE = "attention"


def to_record(name: str, row: dict, steps: int) -> Record:
    """A `benchmark_decode` row (one context) as a record: B tokens per step, `steps` steps."""
    batch, context = row["batch"], row["context"]
    if "error" in row:
        return Record("decode", name, batch, context, error=row["error"])
    peak = row["peak_MiB"] / 1024 if row["peak_MiB"] == row["peak_MiB"] else None  # NaN off CUDA
    timing = Timing(row["ms_per_token"] * steps / 1e3, steps, peak)
    extra = {"ms_per_token": row["ms_per_token"], "state_MiB": row["state_MiB"]}
    return Record.measured("decode", name, batch, context, batch, timing, extra=extra)


def run(args: argparse.Namespace) -> Report:
    device = resolve_device(args.device)
    limit_autotune(args.autotune)
    names = list(args.mixer) + ([] if args.no_baseline or BASELINE in args.mixer else [BASELINE])
    report = Report("decode", args.out, vars(args))
    graph = device.type == "cuda" and not args.eager
    print(f"{args.preset} decoding, batch {args.batch}, {args.steps} timed steps per context, CUDA graph={graph}")
    for name in names:
        model = build_model(model_config(args, name), device, bf16=device.type == "cuda")
        rows = benchmark_decode(model, args.batch, args.context, args.steps, args.warmup, cuda_graph=graph)
        for row in rows:
            report.add(to_record(name, row, args.steps))
        del model
        free_memory(device)
    report.finish(plot=not args.no_plot, title=f"{args.preset}: decoding one token per step after C tokens")
    return report
