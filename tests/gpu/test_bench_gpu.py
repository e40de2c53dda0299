"""GPU smoke runs of `linear-moe bench MODE` at tiny shapes: every mode runs on CUDA with fla's kernels, CUDA-event
timings and peak memory land in each record. Values only, no timing thresholds (speed: tools/gpu_bench.sh)."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest
import torch

from linear_moe.bench.kernel import FAMILIES
from linear_moe.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_records(tmp_path, mode: str, *args: str) -> list[dict]:
    """Run the mode on CUDA (one Triton config per kernel, no plot); every record measured, with peak memory."""
    assert main(["bench", mode, *args, "--out", str(tmp_path), "--autotune", "one", "--no-plot", "--steps", "2"]) == 0
    records = json.loads((tmp_path / f"{mode}.json").read_text())["records"]
    for r in records:
        assert r["error"] is None and r["peak_mem_gib"] > 0, r
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=1e-12)
    return records


def test_kernel_every_family_on_fla(tmp_path):
    records = cuda_records(
        tmp_path, "kernel", "--family", ",".join(FAMILIES), "--seq-len", "128,256", "--tokens", "512", "--heads", "2"
    )
    assert {r["name"] for r in records} == {*FAMILIES, "attention"}


def test_layer_model_decode_on_cuda(tmp_path):
    cuda_records(tmp_path, "layer", "--preset", "debug-dense", "--mixer", "gla,gated_deltanet", "--seq-len", "128,256")
    records = cuda_records(
        tmp_path, "model", "--preset", "debug-qwen2-moe", "--mixer", "gla,attention", "--shape", "2x128:packed"
    )
    assert all(r["extra"]["mfu"] > 0 for r in records)
    records = cuda_records(
        tmp_path, "decode", "--preset", "debug-dense", "--vocab", "512", "--mixer", "gla", "--context", "64,256"
    )
    gla = [r["extra"]["state_MiB"] for r in records if r["name"] == "gla"]
    assert gla[0] == gla[1]


def test_peers_on_cuda(tmp_path):
    if find_spec("transformers") is None or find_spec("fla") is None:
        pytest.skip("peers need transformers and fla")
    records = cuda_records(tmp_path, "peers", "--preset", "debug-qwen2-moe", "--vocab", "512", "--seq-len", "128,256")
    assert {r["name"] for r in records} == {"ours debug-qwen2-moe gla", "hf-qwen2-moe", "fla-gla"}
