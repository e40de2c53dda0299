"""Starting from a pretrained Hugging Face MoE (`model.init_from`): tiny random Qwen2-MoE, Mixtral and DeepSeek-V2
models built locally with transformers. With `mixer=attention` our logits equal transformers' (RoPE, norm eps,
router softmax / top-k normalisation, shared-expert gate, QKV biases, dense first layers); DeepSeek-V2's MLA has
no counterpart, so its MoE and dense layers are compared directly; linear mixers get q/k/v/o where shapes fit;
a linearised model of each architecture trains ten steps from the CLI; bad inputs are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from linear_moe.cli import main
from linear_moe.data import prepare
from linear_moe.hf import ARCHITECTURES, HFError, linearise, model_config_from_hf
from linear_moe.model import LinearMoEForCausalLM, ModelConfig

transformers = pytest.importorskip("transformers")

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
COMMON["num_experts_per_tok"] = 2


def hf_models() -> dict[str, tuple[transformers.PreTrainedConfig, type]]:
    t = transformers
    return {
        "mixtral": (
            t.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, rope_theta=1e6, rms_norm_eps=1e-5),
            t.MixtralForCausalLM,
        ),
        "qwen2_moe": (  # a dense first layer, a gated shared expert, QKV biases
            t.Qwen2MoeConfig(
                **COMMON,
                intermediate_size=48,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=4,
                mlp_only_layers=[0],
            ),
            t.Qwen2MoeForCausalLM,
        ),
        "deepseek_v2": (  # group-limited routing, scaled weights, two shared experts, MLA attention
            t.DeepseekV2Config(
                **{**COMMON, "num_key_value_heads": 4},
                intermediate_size=48,
                moe_intermediate_size=16,
                n_routed_experts=4,
                n_shared_experts=2,
                first_k_dense_replace=1,
                kv_lora_rank=8,
                q_lora_rank=None,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
                n_group=2,
                topk_group=1,
                topk_method="group_limited_greedy",
                routed_scaling_factor=2.0,
            ),
            t.DeepseekV2ForCausalLM,
        ),
    }


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each architecture saved with save_pretrained (the per-expert checkpoint layout), and the HF model."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, (config, cls)) in enumerate(hf_models().items()):
        torch.manual_seed(i)
        model = cls(config).eval()
        with torch.no_grad():  # norms start at one, the router of Qwen2-MoE at zero: make every weight matter
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def ours(hf_dir: Path, mixer: str = "attention", pattern: str | None = None):
    cfg = model_config_from_hf(hf_dir, ModelConfig(mixer=mixer, layer_pattern=pattern, max_seq_len=64))
    model = LinearMoEForCausalLM(cfg).eval()
    return model, linearise(model, hf_dir)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_attention_stack_equals_transformers(hf_dirs, arch):
    hf_dir, hf = hf_dirs[arch]
    model, report = ours(hf_dir)
    assert report.initialised == [n for n in model.state_dict() if n.endswith("expert_bias")]
    assert report.unused == []
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_deepseek_v2_moe_and_dense_layers_equal_transformers(hf_dirs):
    hf_dir, hf = hf_dirs["deepseek_v2"]
    model, report = ours(hf_dir)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.layers[0].ffn(x), hf.model.layers[0].mlp(x))  # dense first layer
        torch.testing.assert_close(model.layers[1].ffn(x)[0], hf.model.layers[1].mlp(x), atol=1e-6, rtol=1e-5)
        ids = torch.randint(0, VOCAB, (1, 5))
        torch.testing.assert_close(model.embed_tokens(ids), hf.model.embed_tokens(ids))
        torch.testing.assert_close(model.norm(x), hf.model.norm(x))
    # MLA maps onto nothing: every source attention tensor unused, our attention initialised
    assert report.mapped == [] and all(".self_attn." in n for n in report.unused) and len(report.unused) == 10
    assert {n for n in report.initialised if ".mixer." in n} == {n for n in model.state_dict() if ".mixer." in n}


def test_linear_mixer_gets_qkvo_with_gqa_heads_repeated(hf_dirs):
    hf_dir, hf = hf_dirs["mixtral"]
    model, report = ours(hf_dir, mixer="deltanet")
    attn, mixer = hf.model.layers[1].self_attn, model.layers[1].mixer
    assert torch.equal(mixer.q_proj.weight, attn.q_proj.weight)
    assert torch.equal(mixer.o_proj.weight, attn.o_proj.weight)
    d, group = 8, 2  # head_dim 32 / 4; 4 query heads share 2 kv heads
    for h in range(4):  # query head h reads kv head h // group (transformers' repeat_kv)
        src = slice((h // group) * d, (h // group + 1) * d)
        assert torch.equal(mixer.k_proj.weight[h * d : (h + 1) * d], attn.k_proj.weight[src])
        assert torch.equal(mixer.v_proj.weight[h * d : (h + 1) * d], attn.v_proj.weight[src])
    assert "layers.1.mixer.k_proj.weight <- model.layers.1.self_attn.k_proj.weight (kv heads x2)" in report.mapped
    assert "layers.1.mixer.b_proj.weight" in report.initialised  # DeltaNet's beta has no source
    # GLA's keys are half as wide (16 = 4 heads x 4): its k has the shape of the source's 2 kv heads x 8, but q
    # does not fit, so neither maps (their heads would not line up); v and o fit and map together
    _, gla = ours(hf_dir, mixer="gla")
    assert {"layers.1.mixer.q_proj.weight", "layers.1.mixer.k_proj.weight"} <= set(gla.initialised)
    assert [m.split(" <- ")[0] for m in gla.mapped if m.startswith("layers.1")] == [
        "layers.1.mixer.o_proj.weight",
        "layers.1.mixer.v_proj.weight",
    ]


def test_fused_expert_layout_reads_the_same(hf_dirs, tmp_path):
    """transformers >= 5 keeps experts fused in memory (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    hf_dir, hf = hf_dirs["qwen2_moe"]
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    a, _ = ours(hf_dir, mixer="gla", pattern="LN")
    b, _ = ours(tmp_path, mixer="gla", pattern="LN")
    for k, v in a.state_dict().items():
        if ".mixer." not in k or k.startswith("layers.1"):  # layer 0's GLA parts are freshly initialised
            assert torch.equal(b.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------- CLI

TRAIN = [
    "data.seq_len=32",
    "data.micro_batch_size=2",
    "train.steps=10",
    "train.warmup=1",
    "train.log_every=5",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "train.tensorboard=false",
    "train.plot=false",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    src.write_text("Experts route each token to a few networks; the router learns which ones fit.\n\n" * 40)
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare([str(src)], out, vocab_size=300, val_fraction=0.1, split_docs=True, progress=False)
    return out


@pytest.mark.parametrize(
    "arch, mixer, pattern",
    [("qwen2_moe", "gated_deltanet", "LN"), ("mixtral", "gla", None), ("deepseek_v2", "hgrn2", None)],
)
def test_linearised_model_trains_ten_steps_from_the_cli(hf_dirs, data_dir, tmp_path, capsys, arch, mixer, pattern):
    hf_dir, _ = hf_dirs[arch]
    run = tmp_path / "run"
    args = [f"model.init_from={hf_dir}", f"model.mixer={mixer}", f"data.path={data_dir}", f"train.run_dir={run}"]
    args += [f"model.layer_pattern={pattern or 'null'}"]  # the default run's LLLN does not tile 2 layers
    assert main(["train", *args, *TRAIN]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"initialised from {arch} {hf_dir}" in err
    stored = yaml.safe_load((run / "checkpoints" / "step-0000010" / "config.yaml").read_text())["model"]
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert stored["hidden_size"] == 32 and stored["vocab_size"] == VOCAB and stored["mixer"] == mixer
    assert stored["moe"]["num_experts"] == hf_config.get("num_experts", hf_config.get("n_routed_experts", 4))


def test_init_from_bad_inputs(hf_dirs, data_dir, tmp_path, capsys):
    hf_dir, _ = hf_dirs["mixtral"]
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(
        json.dumps({**json.loads((hf_dir / "config.json").read_text()), "num_attention_heads": 5})
    )
    words = tmp_path / "words.txt"
    words.write_text(" ".join(f"{a}{b}{c}" for a in "bcdfgh" for b in "aeiou" for c in "klmnprst") * 3)
    big_vocab = tmp_path / "big"
    prepare([str(words)], big_vocab, vocab_size=600, progress=False)
    cases = [
        (tmp_path / "nothing", [], "is not a directory"),
        (tmp_path, [], "is not a Hugging Face model directory (no config.json)"),
        (llama, [], "unsupported architecture 'llama' (LlamaForCausalLM); supported: " + ", ".join(ARCHITECTURES)),
        (odd, [], "num_heads=5 must divide hidden_size=32"),
        (hf_dir, [f"data.path={big_vocab}"], f"has a vocabulary of {VOCAB}; prepare the data with the model's"),
    ]
    for i, (src, extra, match) in enumerate(cases):
        run = tmp_path / f"run{i}"
        args = ["train", f"model.init_from={src}", f"data.path={data_dir}", f"train.run_dir={run}", *TRAIN, *extra]
        args.append("model.layer_pattern=null")
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and match in err[-1], (match, err)
        assert not run.exists() or not any(p.is_file() for p in run.rglob("*"))  # nothing written


def test_report_lists_every_tensor_once(hf_dirs):
    hf_dir, _ = hf_dirs["qwen2_moe"]
    model, report = ours(hf_dir, mixer="rwkv7", pattern="LN")
    mapped = [m.split(" <- ")[0] for m in report.mapped]
    assert sorted(report.copied + mapped + report.initialised) == sorted(model.state_dict())
    # the hybrid's softmax layer takes all of q/k/v/o; its biases have no place there and are reported unused
    assert {f"layers.1.mixer.{p}_proj.weight" for p in "qkvo"} <= set(mapped)
    assert "model.layers.1.self_attn.q_proj.bias" in report.unused
    with pytest.raises(HFError, match="was not built for"):
        linearise(LinearMoEForCausalLM(ModelConfig()), hf_dir)
