"""Trainer pieces: schedules against hand values, optimizer groups."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from linear_moe.train.optim import param_groups
from linear_moe.train.schedule import lr_at


def test_cosine_schedule_hand_values():
    kw = dict(lr=1.0, min_lr=0.1, warmup=2, total=7, schedule="cosine")
    # warmup 0.5, 1.0; then cosine over steps 2..6 (4 intervals) from 1.0 to 0.1
    expected = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    got = [lr_at(s, **kw) for s in range(7)]
    assert got == pytest.approx(expected)
    assert got[2] == pytest.approx(1.0) and got[4] == pytest.approx(0.55) and got[6] == pytest.approx(0.1)


def test_wsd_schedule_hand_values():
    kw = dict(lr=1.0, min_lr=0.0, warmup=2, total=10, schedule="wsd", decay_fraction=0.4)
    # warmup 2 steps, stable until step 6, linear decay over the last 4 steps to 0 at step 9
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr_at(s, **kw) for s in range(10)] == pytest.approx(expected)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'; choose one of cosine, wsd"):
        lr_at(0, lr=1.0, min_lr=0.0, warmup=0, total=3, schedule="linear")


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 10, bias=False))
    model[3].weight = model[0].weight  # tied head: an embedding, not decayed
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].weight),
        id(model[1].bias),
        id(model[2].weight),
        id(model[2].bias),
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------- with a model

# a tiny hybrid Linear-MoE: GLA + attention layers, Mixtral-style MoE (8 experts, top-2)
TINY_MODEL = ["model.preset=debug-mixtral", "model.mixer=gla", "model.layer_pattern=LN", "model.hidden_size=32"]

TEXT = (
    "The quick brown fox jumps over the lazy dog. A linear model mixes tokens with a recurrent state.\n\n"
    "Experts route each token to a few feed forward networks, and the router learns which ones fit.\n\n"
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from linear_moe.data import prepare

    root = tmp_path_factory.mktemp("data")
    (root / "corpus.txt").write_text(TEXT * 40)
    prepare([str(root / "corpus.txt")], root / "ds", vocab_size=300, split_docs=True, val_fraction=0.1, progress=False)
    return root / "ds"


def tiny_run(run_dir: Path, data: Path, *overrides: str):
    """A tiny hybrid run: (RunConfig, Trainer)."""
    from linear_moe.data import PackedDataset
    from linear_moe.train.config import load_run_config
    from linear_moe.train.run import build_model
    from linear_moe.train.trainer import Trainer

    cfg = load_run_config(
        None,
        [
            *TINY_MODEL,
            f"data.path={data}",
            "data.seq_len=32",
            "data.micro_batch_size=2",
            "train.steps=6",
            "train.warmup=2",
            "train.log_every=1",
            "train.eval_every=3",
            "train.eval_batches=1",
            "train.progress=false",
            "train.tensorboard=false",
            f"train.run_dir={run_dir}",
            *overrides,
        ],
    )
    ds = PackedDataset(data, cfg.data.seq_len, cfg.data.micro_batch_size, cfg.data.seed)
    cfg.model.vocab_size = ds.vocab_size
    return cfg, Trainer(cfg, build_model(cfg), ds, ds.val)


def _train_losses(trainer) -> list[float]:
    return [r["loss"] for r in trainer.history if r["split"] == "train"]


def test_resume_is_exact(tiny_data, tmp_path):
    from linear_moe.train.checkpoint import find_latest

    _, straight = tiny_run(tmp_path / "a", tiny_data, "train.grad_accum=2")
    straight.fit()
    _, first = tiny_run(tmp_path / "b", tiny_data, "train.grad_accum=2")
    first.fit(stop_at=3)
    _, second = tiny_run(tmp_path / "b", tiny_data, "train.grad_accum=2", "train.seed=123")  # init is overwritten
    second.resume(find_latest(tmp_path / "b" / "checkpoints"))
    assert second.step == 3
    second.fit()
    assert _train_losses(first) + _train_losses(second) == _train_losses(straight)
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_losses_depend_only_on_config(tiny_data, tmp_path):
    _, a = tiny_run(tmp_path / "a", tiny_data, "train.steps=2")
    _, b = tiny_run(tmp_path / "b", tiny_data, "train.steps=2")
    _, c = tiny_run(tmp_path / "c", tiny_data, "train.steps=2", "data.seed=1")
    a.fit(), b.fit(), c.fit()
    assert _train_losses(a) == _train_losses(b) != _train_losses(c)


def test_metrics_jsonl_and_plots(tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    from linear_moe.train.logging import read_metrics
    from linear_moe.train.plot import plot_run

    cfg, trainer = tiny_run(tmp_path / "run", tiny_data, "train.tensorboard=true")
    summary = trainer.fit()
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in val] == [0, 3, 6]
    assert summary["val_loss"] == val[-1]["loss"]
    n_moe = len(trainer.model.moe_layers())
    assert n_moe > 0
    for r in train:
        assert r["lr"] == pytest.approx(trainer.lr(r["step"] - 1))
        load = torch.tensor(r["expert_load"])
        assert load.shape == (n_moe, cfg.model.moe.num_experts)
        torch.testing.assert_close(load.sum(-1), torch.ones(n_moe), atol=1e-4, rtol=0)
        assert r["load_imbalance"] >= 1.0
    written = plot_run(tmp_path / "run")
    assert sorted(p.name for p in written) == ["expert_load.png", "loss.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_sft_loss_covers_only_response_tokens(tiny_data, tmp_path):
    """The trainer's loss on an SFT batch equals a CE masked by hand to the response tokens (and their EOS)."""
    import json

    from linear_moe.data import ASSISTANT, SFTDataset, Tokenizer

    records = [{"prompt": f"Say {w}.", "response": f"{w} {w}, the fox."} for w in ("one", "two", "three", "four")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer.from_file(tiny_data / "tokenizer.json")
    cfg, trainer = tiny_run(tmp_path / "run", tiny_data)
    trainer.data = SFTDataset(tmp_path / "chat.jsonl", tok, seq_len=32, micro_batch_size=2, seed=0)
    batch = trainer.data.get_batch(0)
    ids = batch.input_ids[0].tolist()
    # hand mask: after `<|assistant|>\n` every token up to and including EOS is a target
    newline, assistant = tok.encode("\n"), tok.token_id(ASSISTANT)
    in_response, start, is_target = False, 0, []
    for i, t in enumerate(ids):
        is_target.append(in_response and i >= start)
        if t == assistant:
            in_response, start = True, i + 1 + len(newline)
        elif in_response and t == tok.eos_id:
            in_response = False
    targets = torch.tensor(is_target[1:] + [False])  # target of position t is token t + 1
    assert targets.any() and (~targets).any()
    expected_labels = torch.where(targets, torch.tensor(ids[1:] + [0]), torch.tensor(-100))
    assert torch.equal(batch.labels[0], expected_labels)
    with torch.no_grad():
        logits = trainer.model(batch.input_ids, cu_seqlens=batch.cu_seqlens).logits[0]
    hand = torch.nn.functional.cross_entropy(logits[targets].float(), expected_labels[targets])
    assert trainer.train_step(0).loss == pytest.approx(hand.item(), rel=1e-5)


def test_activation_checkpointing_keeps_losses_and_names(tiny_data, tmp_path):
    _, plain = tiny_run(tmp_path / "a", tiny_data, "train.steps=2")
    _, ac = tiny_run(tmp_path / "b", tiny_data, "train.steps=2", "train.activation_checkpointing=true")
    plain.fit(), ac.fit()
    assert _train_losses(ac) == pytest.approx(_train_losses(plain), rel=1e-5)
    assert list(ac.model.state_dict()) == list(plain.model.state_dict())


def test_default_yaml_is_the_builtin_default():
    from linear_moe.config import to_dict
    from linear_moe.train.config import load_run_config

    root = Path(__file__).resolve().parents[1]
    assert to_dict(load_run_config(root / "configs" / "default.yaml")) == to_dict(load_run_config(None))


def test_aux_free_bias_follows_the_summed_load(tiny_data, tmp_path):
    """After each update every MoE layer's bias moves by rate * sign(mean load - load), with the load summed over
    the step's micro-batches."""
    _, trainer = tiny_run(tmp_path / "run", tiny_data, "model.preset=debug-deepseek-v3", "train.grad_accum=2")
    layers = trainer.model.moe_layers()
    rate = layers[0].cfg.bias_update_rate
    assert rate > 0
    bias_before = [layer.expert_bias.clone() for layer in layers]
    with torch.no_grad():
        load_LE = sum(
            trainer.model(b.input_ids, labels=b.labels, cu_seqlens=b.cu_seqlens).expert_load.float()
            for b in (trainer.data.get_batch(0), trainer.data.get_batch(1))
        )
    trainer.train_step(0)
    for layer, before, load_E in zip(layers, bias_before, load_LE, strict=True):
        torch.testing.assert_close(layer.expert_bias - before, rate * torch.sign(load_E.mean() - load_E))


def _saved_bytes_and_grads(model, ids):
    """Bytes autograd keeps for backward in one forward (outside checkpointed regions) and the gradients."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + out.aux_loss).backward()
    return saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_expert_checkpointing_same_gradients_less_saved():
    import copy

    from linear_moe.model import LinearMoEForCausalLM, get_preset
    from linear_moe.parallel import apply_expert_checkpointing

    torch.manual_seed(0)
    cfg = get_preset("debug-qwen2-moe").replace(mixer="gla")
    model = LinearMoEForCausalLM(cfg)
    ck = copy.deepcopy(model)
    apply_expert_checkpointing(ck)
    ids = torch.randint(0, cfg.vocab_size, (2, 65))
    plain_bytes, plain_grads = _saved_bytes_and_grads(model, ids)
    ck_bytes, ck_grads = _saved_bytes_and_grads(ck, ids)
    assert list(ck.state_dict()) == list(model.state_dict())
    assert ck_grads.keys() == plain_grads.keys()
    for n, g in plain_grads.items():
        torch.testing.assert_close(ck_grads[n], g, msg=n)
    # per MoE layer the [N, 2F] gate|up output and the [N, F] SwiGLU output are no longer kept (N = tokens * k)
    n_assign = 2 * 64 * cfg.moe.top_k
    F = cfg.moe.expert_ffn_hidden_size
    assert plain_bytes - ck_bytes >= len(model.moe_layers()) * n_assign * 3 * F * 4


def test_checkpoint_experts_trains_like_plain(tiny_data, tmp_path):
    _, plain = tiny_run(tmp_path / "a", tiny_data, "train.steps=2")
    _, ck = tiny_run(tmp_path / "b", tiny_data, "train.steps=2", "train.checkpoint_experts=true")
    plain.fit(), ck.fit()
    assert _train_losses(ck) == pytest.approx(_train_losses(plain), rel=1e-5)


def test_train_autotune_limits_fla_autotuning(tiny_data, tmp_path, monkeypatch):
    # the trainer hands train.autotune to ops.autotune before any kernel runs ("full" leaves it untouched)
    from linear_moe.ops import autotune

    monkeypatch.setattr(autotune, "_mode", "full")
    tiny_run(tmp_path / "a", tiny_data, "train.steps=1")
    assert autotune._mode == "full"
    tiny_run(tmp_path / "b", tiny_data, "train.steps=1", "train.autotune=few")
    assert autotune._mode == "few"


def test_first_step_note_on_cuda_only():
    from linear_moe.train.run import first_step_note

    assert first_step_note("cpu", "full") is None
    assert "train.autotune=few" in first_step_note("cuda", "full")
    assert "train.autotune=one" in first_step_note("cuda", "one")


# ---------------------------------------------------------------------------------------------- runs never lose work

RUN_ARGS = [*TINY_MODEL, "data.seq_len=32", "data.micro_batch_size=2", "train.warmup=1", "train.log_every=1"]
RUN_ARGS += ["train.eval_every=0", "train.eval_batches=1", "train.progress=false", "train.tensorboard=false"]
RUN_ARGS += ["train.plot=false", "train.sample_tokens=0"]


def run(run_dir: Path, data: Path, *overrides: str) -> dict:
    """`linear-moe train` in this process on the tiny data."""
    from linear_moe.train.run import run_training

    return run_training(None, [*RUN_ARGS, f"data.path={data}", f"train.run_dir={run_dir}", *overrides])


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def _train_steps(run_dir: Path) -> list[int]:
    from linear_moe.train.logging import read_metrics

    return [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]


def test_corrupt_checkpoint_fallback_and_rollback(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(run_dir, tiny_data, "train.steps=4", "train.save_every=2", "train.keep_last=2")
    assert _steps(run_dir) == ["step-0000002", "step-0000004"]
    shard = next((run_dir / "checkpoints" / "step-0000004").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[64:128] = bytes(b ^ 0xFF for b in data[64:128])  # flipped bytes inside the weights
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    run(run_dir, tiny_data, "train.steps=4", "train.keep_last=2", "train.resume=auto")
    err = capsys.readouterr().err
    assert "step-0000004: corrupt" in err and "resuming from step-0000002" in err, err
    assert "step-0000002 at step 2" in err
    (corrupt,) = (run_dir / "checkpoints").glob("abandoned-*")
    assert [p.name for p in corrupt.glob("step-*")] == ["step-0000004"]
    assert _steps(run_dir) == ["step-0000002", "step-0000004"]  # step 4 trained again from step 2

    older = run_dir / "checkpoints" / "step-0000002"  # a rollback into the same run dir
    run(run_dir, tiny_data, "train.steps=3", "train.keep_last=1", f"train.resume={older}")
    assert "rolling back to step 2" in capsys.readouterr().err
    assert _steps(run_dir) == ["step-0000003"]  # the one just written is kept; keep_last pruned step 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    (rolled,) = set((run_dir / "checkpoints").glob("abandoned-*")) - {corrupt}
    assert sorted(p.name for p in rolled.iterdir()) == ["metrics.jsonl", "step-0000004"]
    assert _train_steps(run_dir) == [1, 2, 3]  # redone and abandoned steps are logged once


def test_second_run_in_a_locked_run_dir_is_refused(tiny_data, tmp_path):
    import signal
    import subprocess
    import sys

    from linear_moe.config import ConfigError
    from linear_moe.train.run import lock_run_dir

    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        with pytest.raises(ConfigError, match=r"run directory .* is in use by another linear-moe run"):
            run(run_dir, tiny_data, "train.steps=1")
    assert not run_dir.exists()  # a failed run leaves no empty run dir behind
    run_dir.mkdir()
    holder = subprocess.Popen(  # another process holds the lock, then dies by SIGKILL
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(run_dir)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match="is in use"), lock_run_dir(run_dir):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (run_dir / ".data.tmp-12345").mkdir()  # a killed on-the-fly prepare's leftover does not block the run dir
    run(run_dir, tiny_data, "train.steps=1")
    assert _steps(run_dir) == ["step-0000001"] and not (run_dir / ".data.tmp-12345").exists()


def test_run_dir_that_is_a_file(tiny_data, tmp_path):
    from linear_moe.config import ConfigError

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"train.run_dir=.*f is a file; choose a directory path"):
        run(tmp_path / "f", tiny_data, "train.steps=1")
    with pytest.raises(ConfigError, match=r"train.run_dir=.*f/sub is under .*f, which is a file"):
        run(tmp_path / "f" / "sub", tiny_data, "train.steps=1")


def test_finetune_checks_the_weights_before_writing(tiny_data, tmp_path):
    """A finetune checkpoint whose weights do not fit its config fails before the run dir gets a config.yaml."""
    import json

    from linear_moe.train import checkpoint as ckpt
    from linear_moe.train.run import run_finetuning

    run(tmp_path / "pre", tiny_data, "train.steps=1")
    source = tmp_path / "pre" / "checkpoints" / "step-0000001"
    cfg_text = (source / "config.yaml").read_text()
    assert "  hidden_size: 32\n" in cfg_text
    (source / "config.yaml").write_text(cfg_text.replace("  hidden_size: 32\n", "  hidden_size: 64\n"))
    meta = json.loads((source / "meta.json").read_text())  # keep the manifest consistent: only the shapes differ
    meta["files"]["config.yaml"] = {
        "size": (source / "config.yaml").stat().st_size,
        "blake2b": ckpt.file_digest(source / "config.yaml"),
    }
    (source / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "Say one.", "response": "one, the fox."}) + "\n")
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded into this model"):
        run_finetuning(
            None,
            str(source),
            [
                f"train.run_dir={tmp_path / 'sft'}",
                f"finetune.data={tmp_path / 'chat.jsonl'}",
                "data.seq_len=16",
                "data.micro_batch_size=1",
                "train.progress=false",
            ],
        )
    assert not (tmp_path / "sft" / "config.yaml").exists()


def test_sigterm_saves_a_checkpoint_and_exits_143(tiny_data, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    args = [*RUN_ARGS, f"data.path={tiny_data}", f"train.run_dir={run_dir}", "train.steps=100000", "train.warmup=0"]
    proc = subprocess.Popen([sys.executable, "-m", "linear_moe", "train", *args], stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM after step ") and "continue with train.resume=auto" in last, err
    step = int(last.split("after step ")[1].split(";")[0])
    saved = run_dir / "checkpoints" / f"step-{step:07d}"
    assert f"checkpoint {saved}" in last and json.loads((saved / "meta.json").read_text())["step"] == step
    assert _train_steps(run_dir)[-1] == step


def test_plots_and_text_inputs_need_no_extra():
    """The README's first install line (no extras) draws the plots; pyarrow stays optional (Parquet only)."""
    import re
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=~! \[]", d)[0] for d in project["dependencies"]}
    assert "matplotlib" in core and "pyarrow" not in core


def test_metrics_file_errors_name_the_line(tmp_path):
    from linear_moe.train.logging import read_metrics

    good = '{"step": 1, "split": "train", "loss": 2.0}'
    (tmp_path / "metrics.jsonl").write_text(f'{good}\n{good}\n{{"step": 2, "spl')  # killed while writing
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 1]
    (tmp_path / "metrics.jsonl").write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record") as e:
        read_metrics(tmp_path)
    assert "\n" not in str(e.value)
