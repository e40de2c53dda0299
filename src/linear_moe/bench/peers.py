"""`linear-moe bench peers`: our preset beside Hugging Face Qwen2-MoE and fla's dense GLA at the same shape.

All three run a training step's forward + backward (fp32 weights, bf16 autocast, no optimizer step) on the same
random batches, B = tokens // T rows of T tokens, timed by the same CUDA-event timer, one model at a time, each in
a fresh process (spawned), so that no model's memory, allocator cache or autotuning is left for the next:

- ours: `--preset` with `--mixer` and `--vocab` (as `bench model`);
- `hf-qwen2-moe`: transformers' `Qwen2MoeForCausalLM` with the preset's sizes (hidden size, layers, heads,
  experts, top-k, expert FFN, vocabulary; no shared expert), SDPA attention and its grouped-GEMM experts run in the
  autocast dtype (`HF_EXPERTS`), router aux loss on;
- `fla-gla`: fla's dense `GLAForCausalLM` of the same active width (hidden size, layers, heads, a SwiGLU FFN of
  top-k x expert FFN), fla's fused linear cross-entropy; CUDA only (fla's kernels are Triton).

A peer whose package is missing (transformers, fla) or that cannot run on the device is listed as skipped. The
table ends with our tokens/s and peak memory as ratios of each peer's at every sequence length.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import torch
from torch import nn

from linear_moe.bench.model import build_model, lm_step, model_config, random_batch, training_step
from linear_moe.bench.report import Record, Report
from linear_moe.bench.timer import resolve_device
from linear_moe.model.config import ModelConfig
from linear_moe.model.loss import tf32_matmuls
from linear_moe.ops.autotune import limit_autotune

PEERS = ("hf-qwen2-moe", "fla-gla")
HF_EXPERTS = "grouped_mm_autocast"  # transformers' grouped_mm experts, registered under this name by `hf_qwen2_moe`


class _CastExperts:
    """transformers' experts module seen with its weights cast to `dtype`, differentiably (gradients reach the
    float32 parameters), as autocast casts a linear layer's weight."""

    def __init__(self, experts: nn.Module, dtype: torch.dtype) -> None:
        self._experts = experts
        self.gate_up_proj = experts.gate_up_proj.to(dtype)
        self.down_proj = experts.down_proj.to(dtype)

    def __getattr__(self, name: str):
        return getattr(self._experts, name)


def grouped_mm_autocast(
    experts: nn.Module, x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor
) -> torch.Tensor:
    """transformers' own `grouped_mm` experts forward, its operands in the autocast dtype when autocast is on.

    `torch._grouped_mm` is not on autocast's list and transformers casts its input to the weight's dtype, so with
    float32 weights under bf16 autocast the stock `grouped_mm` experts run in float32: float32 GEMMs and twice the
    bytes kept for backward (11.0 instead of 5.5 GiB a layer at A0.3B-2B's sizes and 65,536 tokens, ~195 GiB peak in
    all), out of memory on the H200. Our experts cast to the autocast dtype the same way (moe/experts.py)."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    device = x_TD.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        experts, x_TD = _CastExperts(experts, dtype), x_TD.to(dtype)
    return grouped_mm_experts_forward(experts, x_TD, experts_TK, weights_TK)


def hf_qwen2_moe(cfg: ModelConfig, max_len: int) -> nn.Module:
    """transformers' Qwen2-MoE with `cfg`'s sizes (SDPA, grouped-GEMM experts in the autocast dtype, no shared
    expert)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(HF_EXPERTS, grouped_mm_autocast)
    moe = cfg.moe
    if moe is None:
        raise ValueError("bench peers: hf-qwen2-moe needs an MoE preset (e.g. A0.3B-2B)")
    hf = Qwen2MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=max(max_len, cfg.max_seq_len),
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        shared_expert_intermediate_size=0,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.norm_topk_prob,
        output_router_logits=True,
        use_cache=False,
        attn_implementation="sdpa",
        # explicit: transformers falls back to its per-expert loop ("eager") without saying so when it cannot set
        # "grouped_mm", and that loop ran out of memory on the H200 (12-02); see `grouped_mm_autocast`
        experts_implementation=HF_EXPERTS,
    )
    with warnings.catch_warnings():  # the empty shared expert: "Initializing zero-element tensors is a no-op"
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return Qwen2MoeForCausalLM(hf)


def fla_dense_gla(cfg: ModelConfig, max_len: int) -> nn.Module:
    """fla's dense GLA model of `cfg`'s active width: a SwiGLU FFN of top-k x expert FFN in every layer."""
    from fla.models import GLAConfig, GLAForCausalLM

    ffn = cfg.moe.top_k * cfg.moe.expert_ffn_hidden_size if cfg.moe else cfg.ffn_hidden_size
    return GLAForCausalLM(
        GLAConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            intermediate_size=ffn,
            max_position_embeddings=max(max_len, cfg.max_seq_len),
            norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            fuse_cross_entropy=False,
            fuse_linear_cross_entropy=True,
            use_cache=False,
        )
    )


def why_not(peer: str, device: torch.device) -> str | None:
    """Why `peer` cannot run here (a missing package, no GPU), or None."""
    package = {"hf-qwen2-moe": "transformers", "fla-gla": "fla"}[peer]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed"
    if peer == "fla-gla" and device.type != "cuda":
        return "fla's kernels need CUDA"
    if peer == "hf-qwen2-moe" and importlib.util.find_spec("transformers.integrations.moe") is None:
        return (
            "this transformers has no grouped-GEMM experts (transformers.integrations.moe); pip install -U transformers"
        )
    return None


def hf_step(vocab_size: int, model: nn.Module, b: int, t: int) -> Callable[[], None]:
    """A training step of a Hugging Face causal LM (its loss includes the router aux loss when it has one). The
    forward runs with TF32 float32 matmuls allowed, as our loss does (`tf32_matmuls`): fla's fused linear
    cross-entropy accumulates the LM-head gradient in float32 inside the forward, and without TF32 that runs as
    SIMT sgemm, a handicap ours does not carry."""
    ids, labels, _ = random_batch(vocab_size, b, t, False, next(model.parameters()).device)

    def loss() -> torch.Tensor:
        with tf32_matmuls():
            return model(input_ids=ids, labels=labels).loss

    return training_step(loss, model, autocast=True)


def ratios(records: list[Record], ours: str) -> dict[str, dict[str, float]]:
    """{f"{peer} T={T}": {"tokens_per_s": ours / peer, "peak_mem": ours / peer}} where both were measured."""
    by = {(r.name, r.seq_len): r for r in records if not r.error}
    out = {}
    for (name, t), peer in by.items():
        mine = by.get((ours, t))
        if name == ours or mine is None:
            continue
        row = {"tokens_per_s": mine.tokens_per_s / peer.tokens_per_s}
        if mine.peak_mem_gib is not None and peer.peak_mem_gib:
            row["peak_mem"] = mine.peak_mem_gib / peer.peak_mem_gib
        out[f"{name} T={t}"] = row
    return out


def run(args: argparse.Namespace) -> Report:
    device = resolve_device(args.device)
    limit_autotune(args.autotune)
    cfg = model_config(args, args.mixer)
    ours = f"ours {args.preset} {args.mixer}"
    report = Report("peers", args.out, vars(args))
    peers = list(args.peers)
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"unknown peer {p!r}; valid: {', '.join(PEERS)}")
    print(f"{ours} beside {', '.join(peers) or 'no peers'}: {args.tokens:,} tokens per step, vocab {cfg.vocab_size}")
    systems = [(ours, None)]
    for p in peers:
        reason = why_not(p, device)
        if reason:
            print(f"  {p}: skipped ({reason})")
            report.summary.setdefault("skipped", {})[p] = reason
            continue
        systems.append((p, p))
    spawn = multiprocessing.get_context("spawn")
    for name, peer in systems:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:  # printed its records as it went
            report.records += pool.submit(_measure_system, args, name, peer).result()
        report.write_json()
    report.summary["ratios"] = ratios(report.records, ours)
    for key, row in report.summary["ratios"].items():
        parts = [f"ours/{key}: tokens/s x{row['tokens_per_s']:.2f}"]
        if "peak_mem" in row:
            parts.append(f"peak memory x{row['peak_mem']:.2f}")
        print("  " + ", ".join(parts))
    report.finish(plot=not args.no_plot, title=f"{args.preset} beside its peers: training step fwd+bwd")
    return report


def _measure_system(args: argparse.Namespace, name: str, peer: str | None) -> list[Record]:
    """In a fresh process: build one system (ours when `peer` is None) and time its step at every `--seq-len`."""
    device = resolve_device(args.device)
    limit_autotune(args.autotune)
    cfg = model_config(args, args.mixer)
    if peer is None:
        model, step_of = build_model(cfg, device), lm_step
    else:
        build = hf_qwen2_moe if peer == "hf-qwen2-moe" else fla_dense_gla
        model, step_of = _on_device(build, cfg, max(args.seq_len), device), partial(hf_step, cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        report = Report("peers", tmp)
        for T in args.seq_len:
            B = max(1, args.tokens // T)
            report.measure(name, B, T, partial(step_of, model, B, T), device, args.steps, args.warmup)
    return report.records


def _on_device(build: Callable[[ModelConfig, int], nn.Module], cfg: ModelConfig, max_len: int, device) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return build(cfg, max_len)
