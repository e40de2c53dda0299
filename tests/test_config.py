"""linear_moe.config: dataclass <-> dict <-> YAML round trips, dotted overrides and their errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from linear_moe.config import ConfigError, apply_overrides, from_dict, load_yaml, save_yaml, to_dict


@dataclass
class MoE:
    num_experts: int = 8
    top_k: int = 2
    capacity: float | None = None


@dataclass
class Model:
    mixer: str = "gla"
    hidden_size: int = 64
    moe: MoE | None = field(default_factory=MoE)
    layer_types: list[str] = field(default_factory=lambda: ["a", "b"])
    extra: dict = field(default_factory=dict)
    norm: Literal["rms", "layer"] = "rms"


@dataclass
class Train:
    steps: int = 100
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    compile: bool = False
    wandb: str | None = None


@dataclass
class Run:
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)


def test_yaml_round_trip(tmp_path):
    run = Run(
        model=Model(mixer="gated_deltanet", moe=MoE(16, 4, 1.25), layer_types=["x"], extra={"k": [1, 2]}),
        train=Train(steps=7, lr=3e-4, betas=(0.8, 0.99), compile=True, wandb="proj"),
    )
    save_yaml(run, tmp_path / "sub" / "run.yaml")
    assert load_yaml(tmp_path / "sub" / "run.yaml", Run) == run
    no_moe = Run(model=Model(moe=None))
    save_yaml(no_moe, tmp_path / "b.yaml")
    assert load_yaml(tmp_path / "b.yaml", Run) == no_moe
    assert from_dict(Run, to_dict(run)) == run


def test_partial_dict_keeps_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 3e-4\nmodel:\n  moe:\n    top_k: 1\n")
    run = load_yaml(tmp_path / "c.yaml", Run)
    assert run == Run(model=Model(moe=MoE(top_k=1)), train=Train(lr=3e-4))
    assert isinstance(run.train.lr, float)
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml", Run) == Run()


def test_overrides_parse_and_convert():
    base = Run()
    run = apply_overrides(
        base,
        [
            "model.mixer=gated_deltanet",
            "train.steps=200",
            "train.lr=3e-4",
            "train.compile=true",
            "train.betas=[0.8, 1]",
            "model.moe.top_k=4",
            "model.moe.capacity=1",
            "model.layer_types=[m, a, m]",
            "model.norm=layer",
            "train.wandb=my-proj",
        ],
    )
    expected = Run(
        model=Model(mixer="gated_deltanet", moe=MoE(top_k=4, capacity=1.0), layer_types=["m", "a", "m"], norm="layer"),
        train=Train(steps=200, lr=3e-4, betas=(0.8, 1.0), compile=True, wandb="my-proj"),
    )
    assert run == expected
    assert base == Run()  # not mutated
    assert apply_overrides(run, ["model.moe=null", "train.wandb=null"]) == Run(
        model=Model(mixer="gated_deltanet", moe=None, layer_types=["m", "a", "m"], norm="layer"),
        train=Train(steps=200, lr=3e-4, betas=(0.8, 1.0), compile=True),
    )
    revived = apply_overrides(Run(model=Model(moe=None)), ["model.moe={}", "model.moe.top_k=3"])
    assert revived.model.moe == MoE(top_k=3)
    assert apply_overrides(Run(), ["model.moe={top_k: 1, num_experts: 4}"]).model.moe == MoE(4, 1)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.stesp=3",
            "unknown config key 'train.stesp'; valid keys under 'train': betas, compile, lr, steps, wandb",
        ),
        ("trian.steps=3", "unknown config key 'trian'; valid keys at the top level: model, train"),
        (
            "model.moe.topk=3",
            "unknown config key 'model.moe.topk'; valid keys under 'model.moe': capacity, num_experts, top_k",
        ),
        ("train.steps=abc", "config key 'train.steps' expects an int, got 'abc'"),
        ("train.steps=1.5", "config key 'train.steps' expects an int, got 1.5"),
        ("train.lr=fast", "config key 'train.lr' expects a float, got 'fast'"),
        ("train.compile=3", "config key 'train.compile' expects a bool"),
        ("train.steps=null", "config key 'train.steps' cannot be null"),
        ("train.betas=[0.9]", "config key 'train.betas' expects a list of 2 values"),
        ("model.norm=batch", "config key 'model.norm' must be one of rms, layer; got 'batch'"),
        ("model.layer_types=3", "config key 'model.layer_types' expects a list"),
        ("model.moe=5", "config key 'model.moe' expects a mapping for MoE"),
        ("train.steps.x=1", "cannot set 'train.steps.x': 'train.steps' is not a nested config"),
        ("train.steps", "override 'train.steps' must look like key=value"),
        ("train..steps=1", "has an empty key part"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Run(), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_setting_inside_null_section_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"cannot set 'model.moe.top_k': 'model.moe' is null; set 'model.moe'"):
        apply_overrides(Run(model=Model(moe=None)), ["model.moe.top_k=4"])


def test_yaml_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  moe:\n    top_kk: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.moe.top_kk'; valid keys under 'model.moe'"):
        load_yaml(tmp_path / "bad.yaml", Run)
    (tmp_path / "type.yaml").write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match="'train.steps' expects an int"):
        load_yaml(tmp_path / "type.yaml", Run)
    (tmp_path / "syntax.yaml").write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(tmp_path / "syntax.yaml", Run)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml", Run)
    with pytest.raises(ConfigError, match="expected a mapping for Run"):
        from_dict(Run, [1, 2])
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------- the run config


def test_moe_family_override_applies_the_preset_like_yaml(tmp_path):
    from linear_moe.moe import MoEConfig
    from linear_moe.train.config import load_run_config

    (tmp_path / "v2.yaml").write_text("model:\n  moe:\n    family: deepseek_v2\n    num_experts: 8\n    top_k: 2\n")
    from_yaml = load_run_config(tmp_path / "v2.yaml")
    from_cli = load_run_config(None, ["model.moe.family=deepseek_v2", "model.moe.num_experts=8", "model.moe.top_k=2"])
    expected = MoEConfig.preset("deepseek_v2", num_experts=8, top_k=2)
    assert from_cli.model.moe == from_yaml.model.moe == expected
    assert expected.group_score == "max" and expected.n_group == 8 and expected.routed_scaling_factor == 16.0


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.num_layers=6", "model.layer_pattern=LLN"],
        ["model.layer_pattern=LLN", "model.num_layers=6"],
        ["model.moe.num_experts=1", "model.moe.top_k=1"],
        ["model.moe.top_k=1", "model.moe.num_experts=1"],
    ],
)
def test_overrides_are_merged_before_validation(overrides):
    from linear_moe.train.config import load_run_config

    cfg = load_run_config(None, overrides)
    for item in overrides:
        key, value = item.split("=")
        section, *rest = key.split(".")[1:]
        got = getattr(cfg.model.moe, rest[0]) if section == "moe" else getattr(cfg.model, section)
        assert str(got) == value


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.save_every=-1", "train.save_every must be >= 0, got -1"),
        ("train.eval_every=-5", "train.eval_every must be >= 0, got -5"),
        ("train.keep_last=-1", "train.keep_last must be >= 0, got -1"),
        ("train.eval_batches=-1", "train.eval_batches must be >= 0, got -1"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0, got -1.0"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
        ("train.sample_tokens=-3", "train.sample_tokens must be >= 0, got -3"),
        ("train.sample_temperature=-1", "train.sample_temperature must be >= 0, got -1.0"),
        ("train.sample_top_k=-2", "train.sample_top_k must be >= 0, got -2"),
        ("train.betas=[0.9, 1.5]", "train.betas must be in [0, 1), got [0.9, 1.5]"),
        ("train.betas=[-0.1, 0.9]", "train.betas must be in [0, 1), got [-0.1, 0.9]"),
        ("train.warmup=-1", "train.warmup must be >= 0, got -1"),
        ("data.seed=-1", "data.seed must be >= 0, got -1"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("train.schedule=linear", "config key 'train.schedule' must be one of cosine, wsd; got 'linear'"),
        ("train.device=tpu", "config key 'train.device' must be one of auto, cpu, cuda; got 'tpu'"),
        ("train.dtype=fp16", "config key 'train.dtype' must be one of auto, bf16, fp32; got 'fp16'"),
        ("train.autotune=fast", "config key 'train.autotune' must be one of full, few, one; got 'fast'"),
    ],
)
def test_run_config_rejects_bad_values(override, message):
    from linear_moe.train.config import load_run_config

    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_warmup_longer_than_the_run_is_noted():
    from linear_moe.train.config import config_notes, load_run_config

    assert config_notes(load_run_config(None, ["train.steps=100"])) == []
    (note,) = config_notes(load_run_config(None, ["train.steps=10", "train.warmup=20"]))
    assert "train.warmup=20 is longer than the run (train.steps=10)" in note


def test_expert_chunks_with_a_capacity_limit_are_noted():
    from linear_moe.train.config import config_notes, load_run_config

    capacity = ["model.moe.capacity_factor=1.25", "data.seq_len=128"]
    assert config_notes(load_run_config(None, [*capacity, "train.expert_chunk=0"])) == []
    assert config_notes(load_run_config(None, ["data.seq_len=128", "train.expert_chunk=64"])) == []
    (note,) = config_notes(load_run_config(None, [*capacity, "train.expert_chunk=64"]))
    assert "train.expert_chunk=64 with model.moe.capacity_factor=1.25" in note and "\n" not in note


def test_choice_fields_are_literals_matching_their_users():
    import typing

    from linear_moe.ops.autotune import MODES
    from linear_moe.train.config import TrainConfig
    from linear_moe.train.schedule import SCHEDULES

    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["schedule"]) == SCHEDULES
    assert typing.get_args(hints["autotune"]) == MODES
    assert typing.get_args(hints["device"]) == ("auto", "cpu", "cuda")
    assert typing.get_args(hints["dtype"]) == ("auto", "bf16", "fp32")


def test_yaml_syntax_error_names_the_line(tmp_path):
    from linear_moe.train.config import load_run_config

    (tmp_path / "bad.yaml").write_text("train:\n  steps: 3\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*bad.yaml, line [0-9]+") as e:
        load_run_config(tmp_path / "bad.yaml")
    assert "\n" not in str(e.value)


def test_input_paths_resolve_next_to_the_config_file(tmp_path, monkeypatch):
    from linear_moe.train.config import load_run_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "chat.jsonl").write_text("{}\n")
    (tmp_path / "cfg" / "run.yaml").write_text(
        "finetune:\n  data: chat.jsonl\ndata:\n  inputs: [chat.jsonl, builtin:python-docs]\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config("cfg/run.yaml")
    assert Path(cfg.finetune.data) == Path("cfg/chat.jsonl")
    assert [Path(p) for p in cfg.data.inputs[:1]] == [Path("cfg/chat.jsonl")] and cfg.data.inputs[
        1
    ] == "builtin:python-docs"
    assert load_run_config("cfg/run.yaml", ["finetune.data=other.jsonl"]).finetune.data == "other.jsonl"


def test_show_config_lists_every_key_and_its_default():
    import yaml

    from linear_moe.config import to_dict
    from linear_moe.train.config import load_run_config, show_config

    cfg = load_run_config(None, ["train.steps=7", "model.hidden_size=64"])
    text = show_config(cfg)
    assert yaml.safe_load(text) == {**to_dict(cfg), "model": {"preset": None, **to_dict(cfg.model)}}
    lines = text.splitlines()
    assert "  steps: 7  # default: 1200" in lines and "  hidden_size: 64  # default: 128" in lines
    assert "  lr: 0.003" in lines  # unchanged values carry no comment


def test_finetune_yaml_finds_its_sft_file_from_any_directory(tmp_path, monkeypatch):
    from linear_moe.train.config import read_run_yaml

    config = Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml"
    monkeypatch.chdir(tmp_path)
    assert Path(read_run_yaml(config)["finetune"]["data"]).is_file()
