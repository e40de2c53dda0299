"""`python -m linear_moe`: bad inputs give one `error:` line and exit code 2 without touching files;
the default config runs end to end (reduced) to a checkpoint and a sample; finetuning from it works."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A linear model mixes tokens with a recurrent state.\n\n"
    "Experts route each token to a few feed forward networks, and the router learns which ones fit.\n\n"
) * 30
# the default config, reduced: tiny data, short sequences, few steps
SMALL = [
    "data.split_docs=true",
    "data.vocab_size=300",
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "data.val_fraction=0.1",
    "train.steps=4",
    "train.warmup=1",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.sample_tokens=8",
    "train.tensorboard=false",
    "train.progress=false",
]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linear_moe", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` with a hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()}


def assert_usage_error(res: subprocess.CompletedProcess, match: str) -> None:
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert res.returncode == 2, res.stderr
    assert errors == lines[-1:] and "Traceback" not in res.stderr, res.stderr
    assert match in errors[0], errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus) -> tuple[Path, subprocess.CompletedProcess]:
    """The default config, reduced, trained end to end through the CLI."""
    run_dir = tmp_path_factory.mktemp("runs") / "default"
    res = cli("train", "configs/default.yaml", f"data.inputs=[{corpus}]", f"train.run_dir={run_dir}", *SMALL)
    assert res.returncode == 0, res.stderr
    return run_dir, res


def test_default_config_end_to_end(trained_run):
    run_dir, res = trained_run
    ckpt = run_dir / "checkpoints" / "step-0000004"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert {"config.yaml", "meta.json", "tokenizer.json", ".metadata"} <= {p.name for p in ckpt.iterdir()}
    assert (run_dir / "data" / "meta.json").is_file()  # prepared on the fly
    assert "trained 4 steps" in res.stdout and "sample: The" in res.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert (run_dir / "loss.png").is_file() and (run_dir / "expert_load.png").is_file()
    stored = (run_dir / "config.yaml").read_text()
    assert "steps: 4" in stored and "seq_len: 32" in stored


def test_resume_auto_continues(trained_run, tmp_path):
    run_dir, _ = trained_run
    res = cli("train", run_dir / "config.yaml", "train.resume=auto", "train.steps=5", "train.plot=false")
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr and "step-0000004" in res.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000005"


def test_finetune_from_checkpoint(trained_run, tmp_path):
    run_dir, _ = trained_run
    ckpt = run_dir / "checkpoints" / "step-0000004"
    res = cli(
        "finetune",
        "configs/finetune.yaml",
        "--from",
        ckpt,
        f"train.run_dir={tmp_path / 'sft'}",
        "train.steps=2",
        "train.tensorboard=false",
        "train.progress=false",
        "train.sample_tokens=4",
        "data.seq_len=64",
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "sft" / "checkpoints" / "step-0000002" / "meta.json").is_file()
    assert "sample (" in res.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["model.preset=nope"], "unknown model preset 'nope'"),
        (["train.schedule=linear"], "config key 'train.schedule' must be one of cosine, wsd; got 'linear'"),
        (["train.autotune=fast"], "config key 'train.autotune' must be one of full, few, one; got 'fast'"),
        (["model.num_heads=5"], "num_heads=5 must divide hidden_size"),
        (["data.seq_len=1000", "data.inputs=[SHORT]"], "sequence length 1000 is longer than the data"),
        (["data.inputs=[EMPTY]"], "no text found"),
        (["data.inputs=[MISSING]"], "MISSING"),
    ],
    ids=[
        "unknown-key",
        "unknown-preset",
        "bad-schedule",
        "bad-autotune",
        "bad-heads",
        "seq-len-too-long",
        "empty-data",
        "missing-data",
    ],
)
def test_bad_train_inputs(args, match, corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("A short text.\n\nAnd another one.\n\nThe end.\n")
    subst = {
        "SHORT": str(tmp_path / "short.txt"),
        "EMPTY": str(tmp_path / "empty.txt"),
        "MISSING": str(tmp_path / "MISSING.txt"),
    }
    for k, v in subst.items():
        args = [a.replace(k, v) for a in args]
    res = cli("train", f"train.run_dir={tmp_path / 'run'}", *SMALL, *args)
    assert_usage_error(res, match)
    # nothing but prepared data is left behind: the same run_dir works once the input is fixed
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_prepare_then_train_on_it(corpus, tmp_path):
    out = tmp_path / "ds"
    res = cli("prepare", corpus, "--out", out, "--vocab-size", "300", "--split-docs", "--val-fraction", "0.1")
    assert res.returncode == 0, res.stderr
    assert "tokens in" in res.stdout and (out / "meta.json").is_file()
    before = snapshot(out)
    assert_usage_error(cli("prepare", corpus, "--out", out), "not empty")
    assert snapshot(out) == before
    res = cli(
        "train", f"data.path={out}", f"train.run_dir={tmp_path / 'run'}", *SMALL, "train.steps=1", "train.plot=false"
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-0000001" / "meta.json").is_file()
    assert not (tmp_path / "run" / "data").exists()  # the prepared directory is used in place


def test_missing_config_file(tmp_path):
    assert_usage_error(cli("train", tmp_path / "nope.yaml"), "config file not found")


def test_existing_run_dir_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    before = snapshot(run_dir)
    assert_usage_error(cli("train", f"train.run_dir={run_dir}", *SMALL), "is not empty")
    assert snapshot(run_dir) == before


def test_resume_with_a_different_model_is_refused(trained_run):
    run_dir, _ = trained_run
    before = snapshot(run_dir)
    res = cli("train", run_dir / "config.yaml", "train.resume=auto", "model.hidden_size=48")
    assert_usage_error(res, "different config: model.hidden_size")
    assert snapshot(run_dir) == before


def test_corrupt_checkpoints(trained_run, tmp_path):
    run_dir, _ = trained_run
    broken = tmp_path / "step-0000004"
    broken.mkdir()
    (broken / "config.yaml").write_text((run_dir / "checkpoints" / "step-0000004" / "config.yaml").read_text())
    res = cli("finetune", "configs/finetune.yaml", "--from", broken, f"train.run_dir={tmp_path / 'sft'}")
    assert_usage_error(res, f"checkpoint {broken}: incomplete or corrupt (missing meta.json)")
    res = cli("train", f"train.resume={tmp_path / 'nowhere'}", f"train.run_dir={tmp_path / 'r'}")
    assert_usage_error(res, "not a directory")
    assert not (tmp_path / "sft").exists() and not (tmp_path / "r").exists()
    good = run_dir / "checkpoints" / "step-0000004"
    common = [run_dir / "config.yaml", f"train.run_dir={tmp_path / 'r2'}", "train.resume=" + str(good)]
    assert_usage_error(cli("train", *common, "model.hidden_size=48"), f"checkpoint {good} was written with a different")
    shards = tmp_path / "shards"  # a checkpoint whose tensor data is gone
    shutil.copytree(good, shards)
    for f in shards.glob("*.distcp"):
        f.unlink()
    res = cli("train", *common[:2], f"train.resume={shards}", "train.steps=5")
    assert_usage_error(res, f"checkpoint {shards}: incomplete or corrupt (missing __0_0.distcp)")


def test_plot_needs_a_run_dir(tmp_path):
    assert_usage_error(cli("plot", tmp_path), "no metrics.jsonl")


def test_help_comes_from_docstrings():
    res = cli("train", "--help")
    assert res.returncode == 0 and "Pretrain a model" in res.stdout and "train.resume=auto" in res.stdout
    assert "--show-config" in res.stdout


def test_show_config_prints_the_merged_config(capsys, monkeypatch):
    import yaml

    from linear_moe.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["train", "--show-config", "configs/default.yaml", "train.steps=7", "model.moe.family=qwen2_moe"]) == 0
    res = capsys.readouterr()
    shown = yaml.safe_load(res.out)
    assert shown["train"]["steps"] == 7 and shown["train"]["keep_last"] == 2 and shown["finetune"]["data"] is None
    assert shown["model"]["moe"]["shared_expert_gate"] is True  # the family's preset applies, as in YAML
    assert "  steps: 7  # default: 1200" in res.out.splitlines()


@pytest.mark.parametrize("command", ["train", "finetune", "bench", "prepare"])
def test_every_help_is_reachable(command, capsys):
    from linear_moe.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: linear-moe {command}")


def test_finetune_help_example_is_accepted():
    res = cli("finetune", "--help")
    example = res.stdout.split("e.g.")[1].split()[:2]
    from linear_moe.train.config import load_run_config

    assert all(not a.startswith("model.") for a in example)
    load_run_config(None, example)  # every key of the example exists
