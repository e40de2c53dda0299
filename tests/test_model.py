"""Tests for linear_moe.model: config, causal LM, presets, parameter and FLOP counts (CPU, tiny models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from linear_moe.config import load_yaml, save_yaml
from linear_moe.mixers import MIXERS, build_mixer
from linear_moe.model import PRESETS, LinearMoEForCausalLM, ModelConfig, count_params, flops_per_token, get_preset
from linear_moe.model.flops import forward_flops_per_token, matmul_params

MIXER_SET = ["attention", "gla", "gated_deltanet", "mamba2", "retnet"]
FAMILIES = ["dense", "mixtral", "qwen2-moe", "deepseek-v2", "deepseek-v3"]


def tiny(family: str = "dense", mixer: str = "attention", **overrides) -> ModelConfig:
    """The family's debug preset with `mixer`."""
    return get_preset(f"debug-{family}").replace(mixer=mixer, **overrides)


def build(cfg: ModelConfig, seed: int = 0) -> LinearMoEForCausalLM:
    torch.manual_seed(seed)
    return LinearMoEForCausalLM(cfg)


def unique_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


# ---------------------------------------------------------------- config


def test_config_yaml_round_trip(tmp_path):
    cfg = get_preset("debug-dense").replace(
        layer_pattern="LN", mixer="gla", mixer_kwargs={"expand_k": 0.5}, num_kv_heads=2, tie_embeddings=True
    )
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    save_yaml(cfg, tmp_path / "m.yaml")
    assert load_yaml(tmp_path / "m.yaml", ModelConfig) == cfg
    for name in PRESETS:
        p = get_preset(name)
        assert ModelConfig.from_dict(p.to_dict()) == p
    moe = get_preset("debug-deepseek-v3")
    assert ModelConfig(**moe.to_dict()) == moe  # `moe` given as a plain dict


def test_config_errors():
    with pytest.raises(ValueError, match="valid keys.*hidden_size"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="valid mixers"):
        ModelConfig(mixer="lstm")
    with pytest.raises(ValueError, match="valid presets: .*debug-dense"):
        get_preset("gpt5")


def test_layer_pattern():
    cfg = ModelConfig(num_layers=12, mixer="gla", layer_pattern="LLLN")
    assert cfg.layer_mixers() == ["gla", "gla", "gla", "attention"] * 3
    assert ModelConfig(num_layers=3, mixer="retnet", layer_pattern="NLN").layer_mixers() == [
        "attention",
        "retnet",
        "attention",
    ]
    with pytest.raises(ValueError, match="unknown letters \\['X'\\].*L = .*N = "):
        ModelConfig(num_layers=4, layer_pattern="LLXN")
    with pytest.raises(ValueError, match="tile them exactly"):
        ModelConfig(num_layers=10, layer_pattern="LLLN")
    model = build(tiny("dense", "gla", layer_pattern="LN"))
    assert [type(b.mixer).__name__ for b in model.layers] == ["GatedLinearAttention", "Attention"]


def expected_parameter_names(cfg: ModelConfig) -> set[str]:
    """Every parameter name of the model, spelled out from the config: the Hugging Face layout (embed_tokens,
    layers.i.{attn_norm,mixer,ffn_norm,ffn}, norm, lm_head), fla's mixer names, the MoE names of docs/moe.md."""
    names = {"embed_tokens.weight", "norm.weight"} | (set() if cfg.tie_embeddings else {"lm_head.weight"})
    for i, mixer in enumerate(cfg.layer_mixers()):
        pre = f"layers.{i}"
        names |= {f"{pre}.attn_norm.weight", f"{pre}.ffn_norm.weight"}
        names |= {f"{pre}.mixer.{n}" for n, _ in build_mixer(mixer, cfg.hidden_size, cfg.num_heads, i,
                                                            cfg.num_layers, **cfg.layer_mixer_kwargs(i)).named_parameters()}  # fmt: skip
        dense = {f"{pre}.ffn.{n}_proj.weight" for n in ("gate", "up", "down")}
        if not cfg.is_moe_layer(i):
            names |= dense
            continue
        names |= {f"{pre}.ffn.router.weight", f"{pre}.ffn.experts.w13", f"{pre}.ffn.experts.w2"}
        if cfg.moe.shared_ffn_size:
            names |= {n.replace(".ffn.", ".ffn.shared_experts.") for n in dense}
            if cfg.moe.shared_expert_gate:
                names.add(f"{pre}.ffn.shared_expert_gate.weight")
    return names


@pytest.mark.parametrize(
    ("family", "mixer"),
    [("dense", "gla"), ("mixtral", "hgrn2"), ("qwen2-moe", "rwkv7"), ("deepseek-v2", "gla"), ("deepseek-v3", "hgrn")],
)
def test_parameter_names_are_the_full_hf_mapping(family, mixer):
    cfg = tiny(family, mixer, layer_pattern="LN", num_layers=2)
    if family == "deepseek-v2":
        cfg = cfg.replace(first_k_dense=1)
    names = {n for n, _ in build(cfg).named_parameters()}
    assert names == expected_parameter_names(cfg)
    mixer_names = {n.split(".mixer.")[1] for n in names if n.startswith("layers.0.mixer.")}
    assert {"o_proj.weight"} <= mixer_names  # every mixer projects back with fla's o_proj


# ---------------------------------------------------------------- training


def _train(cfg: ModelConfig, steps: int = 8) -> list[float]:
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
    losses = []
    for _ in range(steps):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("mixer", MIXER_SET)
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_trains(family, mixer):
    losses = _train(tiny(family, mixer))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("mixer", sorted(set(MIXERS) - set(MIXER_SET)))
def test_other_mixers_train(mixer):
    losses = _train(tiny("mixtral", mixer))
    assert losses[-1] < losses[0] - 0.5, losses


def test_hybrid_pattern_trains():
    losses = _train(tiny(FAMILIES[-1], "gla", num_layers=4, layer_pattern="LLLN"))
    assert losses[-1] < losses[0] - 0.5, losses


# ---------------------------------------------------------------- packing and decoding


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_packed_equals_separate(mixer):
    cfg = tiny("dense", mixer)
    model = build(cfg).eval()
    lens = [5, 9, 2]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lens)))
    labels = torch.randint(0, cfg.vocab_size, (1, sum(lens)))
    labels[0, 3] = -100
    cu = torch.tensor([0, 5, 14, 16])
    with torch.no_grad():
        packed = model(ids, labels=labels, cu_seqlens=cu)
        packed_logits = model(ids, cu_seqlens=cu).logits
        sep_logits = torch.cat([model(ids[:, a:b]).logits for a, b in zip(cu[:-1], cu[1:], strict=True)], dim=1)
    torch.testing.assert_close(packed_logits, sep_logits, atol=1e-5, rtol=1e-4)
    ref = F.cross_entropy(sep_logits[0], labels[0], ignore_index=-100)
    torch.testing.assert_close(packed.loss, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_prefill_and_decode_equal_full_forward(mixer):
    cfg = tiny("dense", mixer, layer_pattern="LN")
    model = build(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)  # chunked prefill: 5 + 4 tokens, then 3 single steps
        assert len(out.states) == cfg.num_layers
        pieces = [out.logits]
        out = model(ids[:, 5:9], states=out.states)
        pieces.append(out.logits)
        for t in range(9, 12):
            out = model(ids[:, t : t + 1], states=out.states, use_cache=True)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- logits_to_keep


@pytest.mark.parametrize("family,mixer", [("dense", "gla"), ("dense", "attention"), ("deepseek-v3", "rwkv7")])
def test_logits_to_keep_equals_full_logits_sliced(family, mixer):
    cfg = tiny(family, mixer, layer_pattern="LN")
    model = build(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=True)
        for keep, want in [(1, full.logits[:, -1:]), (4, full.logits[:, -4:]), (0, full.logits), (20, full.logits)]:
            out = model(ids, use_cache=True, logits_to_keep=keep)
            assert out.logits.shape == want.shape
            torch.testing.assert_close(out.logits, want, rtol=1e-12, atol=1e-12)
            for s_out, s_full in zip(out.states, full.states, strict=True):  # the states do not depend on it
                for k in s_full:
                    torch.testing.assert_close(s_out[k], s_full[k], rtol=0, atol=0)
        positions = torch.tensor([8, 0, 3, 3])
        out = model(ids, logits_to_keep=positions)
    torch.testing.assert_close(out.logits, full.logits[:, [8, 0, 3, 3]], rtol=1e-12, atol=1e-12)


def test_logits_to_keep_packed_last_token_of_each_document():
    cfg = tiny("dense", "gated_deltanet")
    model = build(cfg).double().eval()
    cu = torch.tensor([0, 5, 14, 16])
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        kept = model(ids, cu_seqlens=cu, logits_to_keep=cu[1:] - 1).logits
        last = [model(ids[:, a:b]).logits[:, -1] for a, b in zip(cu[:-1], cu[1:], strict=True)]
    assert kept.shape == (1, 3, cfg.vocab_size)
    torch.testing.assert_close(kept, torch.stack(last, dim=1), rtol=1e-10, atol=1e-10)


def test_logits_to_keep_with_labels_keeps_the_loss_over_all_positions():
    cfg = tiny("dense", "gla", fuse_linear_cross_entropy=False)
    model = build(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    labels = torch.randint(0, cfg.vocab_size, (2, 7))
    full = model(ids, labels=labels)
    out = model(ids, labels=labels, logits_to_keep=2)
    ref = F.cross_entropy(full.logits.flatten(0, 1).float(), labels.flatten())  # the loss is float32 math
    torch.testing.assert_close(out.loss, ref)
    assert out.loss.item() == full.loss.item()
    torch.testing.assert_close(out.logits, full.logits[:, -2:], rtol=0, atol=0)


def test_prefill_with_logits_to_keep_builds_no_full_logits():
    """The final norm and the LM head see [B, 1, D]; no op anywhere makes a tensor with T x V elements per row."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg = tiny("dense", "gla", vocab_size=1000)
    model = build(cfg).eval()
    B, T, V = 2, 64, cfg.vocab_size
    norm_inputs = []
    model.norm.register_forward_hook(lambda mod, args, output: norm_inputs.append(tuple(args[0].shape)))

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest_with_vocab = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and V in t.shape:
                    self.largest_with_vocab = max(self.largest_with_vocab, t.numel() // V)
            return out

    ids = torch.randint(0, V, (B, T))
    with torch.no_grad(), Shapes() as shapes:
        out = model(ids, use_cache=True, logits_to_keep=1)
    assert out.logits.shape == (B, 1, V)
    assert norm_inputs == [(B, 1, cfg.hidden_size)]
    assert shapes.largest_with_vocab == max(B, cfg.hidden_size)  # the logits [B, 1, V] and the head weight [V, D]
    with torch.no_grad(), Shapes() as shapes:  # the probe sees full logits when they are built
        model(ids)
    assert shapes.largest_with_vocab == B * T


def test_bad_logits_to_keep_is_one_value_error():
    model = build(tiny())
    ids = torch.zeros(1, 3, dtype=torch.long)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
            model(ids, logits_to_keep=bad)
    for bad in (torch.tensor([[0, 1]]), torch.tensor([0.0]), torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match="logits_to_keep: a tensor must be 1-D integer positions"):
            model(ids, logits_to_keep=bad)


def test_all_ignored_targets_give_zero_loss():
    model = build(tiny())
    ids = torch.randint(0, 512, (2, 5))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() == 0


def test_states_length_checked():
    model = build(tiny())
    with pytest.raises(ValueError, match="one state per layer"):
        model(torch.zeros(1, 3, dtype=torch.long), states=[None])


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_count_params_matches_model(family, tie):
    cfg = tiny(family, "gla", layer_pattern="LN", tie_embeddings=tie)
    _check_counts(cfg)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_count_params_every_mixer(mixer):
    _check_counts(tiny("dense", mixer, layer_pattern="NL"))


def _check_counts(cfg: ModelConfig) -> None:
    tie = cfg.tie_embeddings
    model = build(cfg)
    assert count_params(cfg) == unique_numel(model)
    assert count_params(cfg, embeddings=False) == unique_numel(model) - (
        0 if tie else model.embed_tokens.weight.numel()
    )


def _forward_flops(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, int]:
    """FLOPs per aten op of one forward, as FlopCounterMode counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids)
    return {str(op): int(n) for op, n in fc.get_flop_counts()["Global"].items()}


def _weight_flops(counts: dict[str, int]) -> int:
    """Weight products: linear layers lower to mm/addmm, the short convolutions to aten.convolution."""
    return sum(counts.get(op, 0) for op in ("aten.mm", "aten.addmm", "aten.convolution"))


@pytest.mark.parametrize("mixer", ["attention", "retnet", "mamba2", "gla"])
def test_forward_flops_match_flop_counter(mixer):
    """Weight matmuls must match FlopCounterMode exactly. The mixing part (bmm) is exact for mixers whose PyTorch
    path does exactly the products `sequence_flops` describes (retnet, mamba2: chunked, full blocks); softmax
    attention runs SDPA's math backend here, which computes the full T x T score matrix where `sequence_flops`
    counts the causal half: counted * (T + 1) / (2T) == formula. GLA's PyTorch path folds part of the intra-chunk
    work into elementwise ops, so only its weight part is compared."""
    cfg = tiny("dense", mixer)
    model = build(cfg).eval()
    B, T = 2, 128
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        counts = _forward_flops(model, torch.randint(0, cfg.vocab_size, (B, T)))
    assert _weight_flops(counts) == 2 * matmul_params(cfg) * B * T
    seq_formula = (forward_flops_per_token(cfg, T) - 2 * matmul_params(cfg)) * B * T
    counted = counts.get("aten.bmm", 0) + counts.get("aten.baddbmm", 0)
    if mixer == "attention":
        assert counted * (T + 1) / (2 * T) == pytest.approx(seq_formula, rel=1e-12)
    elif mixer != "gla":
        assert counted == seq_formula
    assert flops_per_token(cfg, T) == 3 * forward_flops_per_token(cfg, T)


def _grouped_mm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm(x [N, K], w [E, K, M], offs): each of the N routed rows meets exactly one expert matrix,
    so 2*N*K*M FLOPs. FlopCounterMode has no formula for it (it would count 0); this one counts the actual routing."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


@pytest.mark.parametrize("family", FAMILIES[1:])
@pytest.mark.parametrize("mixer", ["attention", "retnet"])
def test_moe_forward_flops_match_flop_counter(family, mixer):
    """Routed experts: N = tokens x top_k rows (dropless), whatever the routing, so 2 x tokens x (top_k experts +
    router + shared experts) is exact when the grouped GEMM is counted per routed row (not per padded expert)."""
    cfg = tiny(family, mixer)
    model = build(cfg).eval()
    B, T = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with (
        torch.no_grad(),
        FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops}) as fc,
    ):
        out = model(ids)
    counts = {str(op): int(n) for op, n in fc.get_flop_counts()["Global"].items()}
    assert out.expert_load.sum() == B * T * cfg.moe.top_k * len(model.moe_layers())
    if "aten._grouped_mm" not in counts:  # the padded-bmm fallback counts every padded slot: compare the rest only
        pytest.skip("torch._grouped_mm unavailable on this CPU build")
    assert _weight_flops(counts) + counts["aten._grouped_mm"] == 2 * matmul_params(cfg) * B * T


@pytest.mark.parametrize("family", FAMILIES[1:])
def test_moe_layers_and_expert_load(family):
    cfg = tiny(family, num_layers=3)
    model = build(cfg)
    moe = model.moe_layers()
    assert len(moe) == cfg.num_layers - cfg.first_k_dense and all(
        m is b.ffn for m, b in zip(moe, model.layers[cfg.first_k_dense :], strict=True)
    )
    seen = []
    for m in moe:
        m.register_forward_hook(lambda mod, args, output: seen.append(output[1]))
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model(ids, labels=ids)
    assert out.expert_load.shape == (len(moe), cfg.moe.num_experts)
    torch.testing.assert_close(out.expert_load, torch.stack([a.load for a in seen]))
    assert (out.expert_load.sum(1) == ids.numel() * cfg.moe.top_k).all()
    torch.testing.assert_close(out.aux_loss, sum(a.loss for a in seen))


def test_packed_equals_separate_moe():
    """Dropless routing is per token, so packing documents changes no token's output (aux losses aside)."""
    cfg = tiny("deepseek-v3", "gated_deltanet")
    model = build(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 13))
    cu = torch.tensor([0, 6, 13])
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu).logits
        sep = torch.cat([model(ids[:, :6]).logits, model(ids[:, 6:]).logits], dim=1)
    torch.testing.assert_close(packed, sep, atol=1e-5, rtol=1e-4)


def test_presets_match_published_sizes():
    """Instantiated on `meta` (no memory). Non-embedding = without the input embedding and the LM head."""
    for name, total_b, active_b in [("A0.3B-2B", 2.0, 0.3), ("A1B-7B", 7.0, 1.0)]:
        cfg = get_preset(name)
        with torch.device("meta"):
            model = LinearMoEForCausalLM(cfg)
        assert count_params(cfg) == unique_numel(model)
        vocab = cfg.vocab_size * cfg.hidden_size
        total, active = (
            count_params(cfg, embeddings=False) - vocab,
            count_params(cfg, active=True, embeddings=False) - vocab,
        )
        assert abs(total / 1e9 - total_b) / total_b < 0.1, (name, total)
        assert abs(active / 1e9 - active_b) / active_b < 0.1, (name, active)
        dense = get_preset(name.split("-")[0] + "-dense")
        assert dense.moe is None and dense.ffn_hidden_size == cfg.moe.top_k * cfg.moe.expert_ffn_hidden_size
        router = cfg.num_layers * cfg.moe.num_experts * cfg.hidden_size
        assert count_params(dense) == count_params(cfg, active=True) - router  # same active width


def test_bad_cu_seqlens_is_one_value_error():
    cfg = tiny("dense", "gla")
    model = build(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    for cu in (torch.tensor([0, 4, 9]), torch.tensor([1, 10]), torch.tensor([[0, 10]])):
        with pytest.raises(ValueError, match="cu_seqlens must be 1-D offsets from 0 to T=10"):
            model(ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids.expand(2, 10), cu_seqlens=torch.tensor([0, 10]))


def test_rwkv7_value_residual_prefill_and_decode_equal_full_forward():
    """Two RWKV-7 layers: layer 1 mixes in layer 0's v (value residual) in every mode."""
    cfg = tiny("dense", "rwkv7", layer_pattern="LL")
    model = build(cfg).eval()
    assert model.layers[1].mixer.v_lora is not None
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        steps = [out.logits]
        states = out.states
        for t in range(7, 12):
            out = model(ids[:, t : t + 1], states=states)
            steps.append(out.logits)
            states = out.states
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
