"""Trainer on CUDA: bf16 autocast, fused AdamW, MFU/memory logging, activation checkpointing, per-block
compile, and resume (losses equal to a straight run within bf16 noise)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from linear_moe.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]
CORPUS = "The quick brown fox jumps over the lazy dog.\n\nExperts route tokens to feed forward networks.\n\n" * 200
SMALL = [
    "data.split_docs=true",
    "data.vocab_size=300",
    "data.seq_len=256",
    "data.micro_batch_size=4",
    "data.val_fraction=0.05",
    "train.steps=6",
    "train.warmup=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.sample_tokens=8",
    "train.tensorboard=false",
    "train.progress=false",
    "train.device=cuda",
]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """`linear-moe ARGS` in this process (so the one-config Triton autotuning of tests/gpu/conftest.py applies and
    compiled kernels are shared between tests), with the config paths relative to the repository root."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        argv = [str(ROOT / a) if str(a).startswith("configs/") else str(a) for a in args]
        rc = main(argv)
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)

    return run


def _train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.mark.parametrize(
    "extra", [[], ["train.activation_checkpointing=true"], ["train.compile=true"]], ids=["plain", "ac", "compile"]
)
def test_default_config_on_cuda(cli, corpus, tmp_path, extra):
    run_dir = tmp_path / "run"
    res = cli("train", "configs/default.yaml", f"data.inputs=[{corpus}]", f"train.run_dir={run_dir}", *SMALL, *extra)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert all(r["memory_gb"] > 0 for r in train)
    if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name():
        assert all(0 < r["mfu"] < 1 for r in train)
    losses = [r["loss"] for r in train]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    assert "sample: The" in res.stdout


def test_resume_on_cuda(cli, corpus, tmp_path):
    straight = tmp_path / "a"
    assert (
        cli("train", "configs/default.yaml", f"data.inputs=[{corpus}]", f"train.run_dir={straight}", *SMALL).returncode
        == 0
    )
    resumed = tmp_path / "b"
    first = cli(
        "train",
        "configs/default.yaml",
        f"data.inputs=[{corpus}]",
        f"train.run_dir={resumed}",
        *SMALL,
        "train.save_every=3",
        "train.keep_last=0",
    )
    assert first.returncode == 0, first.stderr
    ckpt = resumed / "checkpoints" / "step-0000003"
    # continue a fresh run dir from the step-3 checkpoint
    cont = tmp_path / "c"
    res = cli(
        "train",
        "configs/default.yaml",
        f"data.path={resumed / 'data'}",
        f"train.run_dir={cont}",
        *SMALL,
        f"train.resume={ckpt}",
    )
    assert res.returncode == 0, res.stderr
    torch.testing.assert_close(
        torch.tensor(_train_losses(cont)), torch.tensor(_train_losses(straight)[3:]), rtol=2e-2, atol=2e-2
    )
