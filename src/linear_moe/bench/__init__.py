"""Benchmarks behind one CUDA-event timer (`timer.py`) and one record format (`report.py`), one module per mode:

    linear-moe bench kernel | layer | model | moe | decode | peers | report

Each mode prints a table, writes `OUT/<mode>.json` and draws `OUT/<mode>.png` (tokens/s and peak memory against
sequence length, one line per mixer / op / system; softmax attention measured in the same run as the baseline).
`--device cpu` with tiny shapes smoke-tests a mode without a GPU (wall-clock times, no peak memory).
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib

MODES = ("kernel", "layer", "model", "moe", "decode", "peers", "report")


def run_mode(mode: str, args: argparse.Namespace):
    """Run bench `mode` (a module of this package) with its parsed arguments; returns its `Report`."""
    if mode not in MODES:
        raise ValueError(f"unknown bench mode {mode!r}; valid: {', '.join(MODES)}")
    return importlib.import_module(f"linear_moe.bench.{mode}").run(args)
