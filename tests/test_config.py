"""linear_moe.config: dataclass <-> dict <-> YAML round trips, dotted overrides and their errors."""

from __future__ import annotations

from dataclasses import dataclass, field
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
