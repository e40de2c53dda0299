"""Start from a pretrained Hugging Face MoE: build the `ModelConfig` that fits it and copy / map its weights.

Supported architectures (config.json `model_type`): qwen2_moe, mixtral, deepseek_v2. Copied as they are:
token embeddings, the LM head, every RMSNorm, dense FFNs, routers, routed experts (either the per-expert
checkpoint layout or transformers >= 5's fused `gate_up_proj` / `down_proj`), shared experts and Qwen2-MoE's
shared-expert gate. Mapped: softmax attention's q/k/v/o projections onto the chosen mixer's projections where the
shapes allow (same shape; or k/v of grouped-query attention repeated over the query heads of their group).
Everything else of the mixer (gates, decays, convolutions, norms, HGRN lower bounds) keeps its initialisation.
DeepSeek-V2's multi-head latent attention has no counterpart in our mixers: nothing of it is mapped.
`InitReport` lists what was copied, mapped, initialised and which source tensors went unused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linear_moe.hf.io import HFError, read_config, read_weights
from linear_moe.model import ModelConfig
from linear_moe.moe import MoEConfig

ARCHITECTURES = ("qwen2_moe", "mixtral", "deepseek_v2")
# Our mixers name their projections like HF attention; RWKV's receptance plays the query, Mamba2 has out_proj.
PROJECTION_NAMES = {"q_proj": ("q_proj", "r_proj"), "k_proj": ("k_proj",), "v_proj": ("v_proj",)}
PROJECTION_NAMES["o_proj"] = ("o_proj", "out_proj")


@dataclass
class InitReport:
    """What `linearise` did, by our state-dict name (`mapped` entries say from what and how)."""

    source: str
    architecture: str
    copied: list[str] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # source tensors not used (e.g. MLA attention, dropped biases)

    def summary(self) -> str:
        return (
            f"initialised from {self.architecture} {self.source}: {len(self.copied)} tensors copied, "
            f"{len(self.mapped)} mapped, {len(self.initialised)} initialised, {len(self.unused)} source tensors unused"
        )

    def details(self) -> str:
        parts = [self.summary()]
        for title, names in (("mapped", self.mapped), ("initialised", self.initialised), ("unused", self.unused)):
            if names:
                parts.append(f"{title}: " + ", ".join(names))
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- config


def architecture(config: dict[str, Any], where: str | Path) -> str:
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise HFError(
            f"{where}: unsupported architecture {arch!r} ({', '.join(config.get('architectures') or [])}); "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return arch


def _rope_theta(c: dict[str, Any], where: str | Path) -> float:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise HFError(f"{where}: RoPE type {kind!r} is not supported (only the default RoPE)")
    return float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))


def _common(c: dict[str, Any], where: str | Path) -> dict[str, Any]:
    if c.get("hidden_act", "silu") != "silu":
        raise HFError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (our experts are SwiGLU: silu)")
    return dict(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=c.get("num_key_value_heads"),
        rope_theta=_rope_theta(c, where),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        ffn_hidden_size=int(c["intermediate_size"]),
    )


def _qwen2_moe(c: dict[str, Any], where: str | Path) -> dict[str, Any]:
    layers, step = int(c["num_hidden_layers"]), int(c.get("decoder_sparse_step", 1))
    only = set(c.get("mlp_only_layers") or [])
    dense = [i for i in range(layers) if i in only or not (c["num_experts"] > 0 and (i + 1) % step == 0)]
    if dense != list(range(len(dense))):
        raise HFError(f"{where}: dense layers {dense} are not the first k layers (only first_k_dense is supported)")
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    moe = MoEConfig(
        family="qwen2_moe",
        num_experts=int(c["num_experts"]),
        top_k=int(c["num_experts_per_tok"]),
        expert_ffn_hidden_size=int(c["moe_intermediate_size"]),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        num_shared_experts=1 if shared else 0,
        shared_expert_ffn_hidden_size=shared or None,
        shared_expert_gate=bool(shared),
        balance_coef=float(c.get("router_aux_loss_coef", 0.001)),
    )
    return dict(moe=moe, first_k_dense=len(dense))


def _mixtral(c: dict[str, Any], where: str | Path) -> dict[str, Any]:
    moe = MoEConfig(
        family="mixtral",
        num_experts=int(c["num_local_experts"]),
        top_k=int(c["num_experts_per_tok"]),
        expert_ffn_hidden_size=int(c["intermediate_size"]),
        norm_topk_prob=True,
        balance_coef=float(c.get("router_aux_loss_coef", 0.02)),
    )
    return dict(moe=moe, first_k_dense=0)


def _deepseek_v2(c: dict[str, Any], where: str | Path) -> dict[str, Any]:
    if int(c.get("moe_layer_freq", 1)) != 1:
        raise HFError(f"{where}: moe_layer_freq={c['moe_layer_freq']} is not supported (only 1)")
    if c.get("scoring_func", "softmax") != "softmax":
        raise HFError(f"{where}: scoring_func {c['scoring_func']!r} is not supported for deepseek_v2 (softmax)")
    method = c.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise HFError(f"{where}: topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    moe = MoEConfig(
        family="deepseek_v2",
        num_experts=int(c["n_routed_experts"]),
        top_k=int(c["num_experts_per_tok"]),
        expert_ffn_hidden_size=int(c["moe_intermediate_size"]),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
        n_group=int(c.get("n_group") or 1) if grouped else 1,
        topk_group=int(c.get("topk_group") or 1) if grouped else 1,
        group_score="max",
        num_shared_experts=int(c.get("n_shared_experts") or 0),
        balance_coef=float(c.get("aux_loss_alpha", 0.001)),
        balance_seq_wise=bool(c.get("seq_aux", True)),
    )
    return dict(moe=moe, first_k_dense=int(c.get("first_k_dense_replace", 0)), num_kv_heads=None)


_FAMILY = {"qwen2_moe": _qwen2_moe, "mixtral": _mixtral, "deepseek_v2": _deepseek_v2}


def model_config_from_hf(hf_dir: str | Path, base: ModelConfig) -> ModelConfig:
    """`base` with the architecture of the HF model in `hf_dir` (sizes, heads, RoPE, norms, MoE); the mixer
    choice (`mixer`, `mixer_kwargs`, `layer_pattern`) and the training options stay `base`'s."""
    config = read_config(hf_dir)
    arch = architecture(config, hf_dir)
    try:
        fields = {**_common(config, hf_dir), **_FAMILY[arch](config, hf_dir)}
    except KeyError as e:
        raise HFError(f"{hf_dir}/config.json: missing key {e.args[0]!r} for {arch}") from None
    head_dim = config.get("head_dim") if arch != "deepseek_v2" else None
    attention = {}
    if head_dim and head_dim != fields["hidden_size"] // fields["num_heads"]:
        attention["head_dim"] = int(head_dim)
    if arch == "qwen2_moe" and config.get("qkv_bias", True):
        attention["qkv_bias"] = True
    kwargs = dict(base.mixer_kwargs)
    if base.mixer == "attention":
        kwargs = {**attention, **kwargs}
    elif "head_dim" in attention and "N" in (base.layer_pattern or ""):
        raise HFError(
            f"{hf_dir}: head_dim={head_dim} differs from hidden_size / num_heads, which the softmax layers of a "
            "hybrid stack (layer_pattern with N) do not support; use model.mixer=attention or a pattern without N"
        )
    try:
        return base.replace(**fields, mixer_kwargs=kwargs)
    except ValueError as e:  # e.g. a layer_pattern that does not tile the pretrained model's layers
        raise HFError(f"model.init_from={hf_dir}: {e}") from None


# ---------------------------------------------------------------------------------------------- weights


class _Plan:
    """Target tensors by our state-dict name, with the source names used."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights, self.used = weights, set()
        self.copied: dict[str, torch.Tensor] = {}
        self.mapped: dict[str, tuple[torch.Tensor, str]] = {}

    def take(self, name: str) -> torch.Tensor | None:
        t = self.weights.get(name)
        if t is not None:
            self.used.add(name)
        return t

    def copy(self, ours: str, theirs: str) -> bool:
        t = self.take(theirs)
        if t is not None:
            self.copied[ours] = t
        return t is not None


def _experts(plan: _Plan, moe: str, ours: str, num_experts: int) -> None:
    """Routed experts -> our grouped layout (w13 [E, D, 2F] = gate | up, w2 [E, F, D])."""
    if f"{moe}experts.gate_up_proj" in plan.weights:  # transformers >= 5 in memory: [E, 2F, D], [E, D, F]
        gate_up_E2FD = plan.take(f"{moe}experts.gate_up_proj")
        down_EDF = plan.take(f"{moe}experts.down_proj")
        gate_EFD, up_EFD = gate_up_E2FD.chunk(2, dim=1)
    else:  # the checkpoint layout: one module per expert (Mixtral w1/w3/w2, others gate/up/down_proj)
        names = {"gate": ("w1", "gate_proj"), "up": ("w3", "up_proj"), "down": ("w2", "down_proj")}
        found = {}
        for role, options in names.items():
            for opt in options:
                keys = [f"{moe}experts.{e}.{opt}.weight" for e in range(num_experts)]
                if all(k in plan.weights for k in keys):
                    found[role] = torch.stack([plan.take(k) for k in keys])
                    break
            else:
                raise HFError(f"missing routed expert weights {moe}experts.*.{'|'.join(options)}.weight")
        gate_EFD, up_EFD, down_EDF = found["gate"], found["up"], found["down"]
    plan.copied[f"{ours}experts.w13"] = torch.cat([gate_EFD, up_EFD], dim=1).transpose(1, 2)
    plan.copied[f"{ours}experts.w2"] = down_EDF.transpose(1, 2)


def _ffn(plan: _Plan, i: int, cfg: ModelConfig) -> None:
    src, ours = f"model.layers.{i}.mlp.", f"layers.{i}.ffn."
    if not cfg.is_moe_layer(i):
        for p in ("gate_proj", "up_proj", "down_proj"):
            if not plan.copy(f"{ours}{p}.weight", f"{src}{p}.weight"):
                raise HFError(f"missing dense FFN weight {src}{p}.weight")
        return
    if f"model.layers.{i}.block_sparse_moe.gate.weight" in plan.weights:  # Mixtral's checkpoint names
        src = f"model.layers.{i}.block_sparse_moe."
    if not plan.copy(f"{ours}router.weight", f"{src}gate.weight"):
        raise HFError(f"missing router weight {src}gate.weight")
    _experts(plan, src, ours, cfg.moe.num_experts)
    if cfg.moe.shared_ffn_size:
        names = [n for n in ("shared_expert.", "shared_experts.") if f"{src}{n}up_proj.weight" in plan.weights]
        if not names:
            raise HFError(f"missing shared expert weights {src}shared_expert(s).up_proj.weight")
        shared = names[0]
        for p in ("gate_proj", "up_proj", "down_proj"):
            plan.copy(f"{ours}shared_experts.{p}.weight", f"{src}{shared}{p}.weight")
        if cfg.moe.shared_expert_gate:
            plan.copy(f"{ours}shared_expert_gate.weight", f"{src}shared_expert_gate.weight")


def _find_linear(mixer: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Linear] | None:
    """The mixer's projection called one of `names` (an nn.Linear, or a module wrapping one as `.linear`)."""
    for n in names:
        m = getattr(mixer, n, None)
        if isinstance(m, nn.Linear):
            return n, m
        if isinstance(getattr(m, "linear", None), nn.Linear):
            return f"{n}.linear", m.linear
    return None


def _fit(w: torch.Tensor, shape: torch.Size, role: str, group: int, head_dim: int) -> tuple[torch.Tensor, str] | None:
    """`w` (HF [out, in] or bias [out]) reshaped to our `shape`, or None when it does not fit."""
    if w.shape == shape:
        return w, "same shape"
    if role in ("k_proj", "v_proj") and group > 1 and shape[0] == w.shape[0] * group and w.shape[1:] == shape[1:]:
        heads = w.shape[0] // head_dim  # GQA -> one k/v head per query head: repeat each over its group
        return w.unflatten(0, (heads, head_dim)).repeat_interleave(group, 0).flatten(0, 1), f"kv heads x{group}"
    return None


def _group_fit(
    plan: _Plan, mixer: nn.Module, src: str, ours: str, group: tuple[str, ...], gqa: int, head_dim: int
) -> dict[str, tuple[torch.Tensor, str, str]]:
    """Our tensors for the source projections in `group` -> (tensor, source name, how); empty when one does not
    fit (the whole group then keeps its initialisation)."""
    out = {}
    for role in group:
        found = _find_linear(mixer, PROJECTION_NAMES[role])
        if found is None:
            continue
        name, linear = found
        for kind in ("weight", "bias"):
            key = f"{src}{role}.{kind}"
            w, target = plan.weights.get(key), getattr(linear, kind)
            if w is None or target is None:
                continue
            fit = _fit(w, target.shape, role, gqa, head_dim)
            if fit is None:
                return {}
            out[f"{ours}{name}.{kind}"] = (fit[0], key, fit[1])
    return out


def _attention(plan: _Plan, i: int, mixer: nn.Module, config: dict[str, Any], arch: str) -> None:
    """q/k/v/o onto the mixer's projections. q with k, and v with o, map together or not at all: a q that
    fits means our heads have the source's head dim, so k's rows line up with them (and likewise v with o)."""
    if arch == "deepseek_v2":
        return  # MLA (low-rank kv with a norm inside) does not map onto any of our projections
    src, ours = f"model.layers.{i}.self_attn.", f"layers.{i}.mixer."
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    for group in (("q_proj", "k_proj"), ("v_proj", "o_proj")):
        for name, (t, key, how) in _group_fit(plan, mixer, src, ours, group, heads // kv_heads, head_dim).items():
            plan.take(key)
            plan.mapped[name] = (t, f"{key} ({how})")


def linearise(model: nn.Module, hf_dir: str | Path) -> InitReport:
    """Copy / map the weights of the HF MoE in `hf_dir` into `model` (built from `model_config_from_hf`);
    parameters without a source keep their initialisation. Returns the report."""
    config = read_config(hf_dir)
    arch = architecture(config, hf_dir)
    cfg: ModelConfig = model.cfg
    expected = model_config_from_hf(hf_dir, cfg)
    if expected != cfg:
        raise HFError(f"the model was not built for {hf_dir}; build it from model_config_from_hf(DIR, config)")
    plan = _Plan(read_weights(hf_dir))
    if not plan.copy("embed_tokens.weight", "model.embed_tokens.weight"):
        raise HFError(f"{hf_dir}: missing model.embed_tokens.weight")
    plan.copy("norm.weight", "model.norm.weight")
    if not cfg.tie_embeddings:
        plan.copy("lm_head.weight", "lm_head.weight")
    for i, block in enumerate(model.layers):
        plan.copy(f"layers.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight")
        plan.copy(f"layers.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")
        _attention(plan, i, block.mixer, config, arch)
        _ffn(plan, i, cfg)
    own = model.state_dict()
    targets = {**plan.copied, **{k: v for k, (v, _) in plan.mapped.items()}}
    for name, t in targets.items():
        if name not in own or own[name].shape != t.shape:
            got = tuple(own[name].shape) if name in own else "no such tensor"
            raise HFError(f"{hf_dir}: {name} of shape {tuple(t.shape)} does not fit the model ({got})")
    model.load_state_dict(targets, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    report = InitReport(str(hf_dir), arch)
    report.copied = sorted(set(plan.copied) | tied)
    report.mapped = [f"{k} <- {how}" for k, (_, how) in sorted(plan.mapped.items())]
    report.initialised = sorted(set(own) - set(targets) - tied)
    report.unused = sorted(set(plan.weights) - plan.used)
    return report


# ---------------------------------------------------------------------------------------------- training runs


def run_config_from_hf(cfg: Any) -> Any:
    """A `RunConfig` whose `model.init_from` names a HF directory, with the model's architecture read from it
    (`model_config_from_hf`) and, when the data is still to be prepared without a tokenizer, the directory's
    tokenizer.json as `data.tokenizer`. Without `init_from`: `cfg` unchanged."""
    import dataclasses

    src = cfg.model.init_from
    if not src:
        return cfg
    data = cfg.data
    tokenizer = Path(src) / "tokenizer.json"
    if data.tokenizer is None and data.path is None and tokenizer.is_file():
        data = dataclasses.replace(data, tokenizer=str(tokenizer))
    new = dataclasses.replace(cfg, model=model_config_from_hf(src, cfg.model), data=data)
    new.preset = cfg.preset
    return new


def check_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> None:
    """The data's tokenizer must fit the pretrained model's vocabulary (its ids index the embeddings)."""
    if tokenizer_vocab > cfg.vocab_size:
        raise HFError(
            f"the data's tokenizer has {tokenizer_vocab} tokens but {cfg.init_from} has a vocabulary of "
            f"{cfg.vocab_size}; prepare the data with the model's tokenizer (data.tokenizer=DIR/tokenizer.json)"
        )
