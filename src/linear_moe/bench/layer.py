"""`linear-moe bench layer`: one mixer layer's forward + backward against sequence length.

Each mixer is built as layer 0 of `--preset` (hidden size, heads, the preset's mixer options), with fp32 weights
under bf16 autocast on CUDA (as the trainer runs) and fed bf16 hidden states `[B, T, D]`, B = tokens // T. Softmax
attention (the `attention` mixer) is measured in the same run as the baseline unless `--no-baseline`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch

from linear_moe.bench.report import Report
from linear_moe.bench.timer import free_memory, resolve_device
from linear_moe.mixers import build_mixer
from linear_moe.model.config import ModelConfig
from linear_moe.model.presets import get_preset
from linear_moe.ops.autotune import limit_autotune

BASELINE = "attention"


def build_layer(cfg: ModelConfig, name: str, device: torch.device) -> torch.nn.Module:
    """Mixer `name` as layer 0 of the model `cfg` describes, on `device`."""
    cfg = cfg.replace(mixer=name, layer_pattern=None)
    with torch.device(device):
        return build_mixer(name, cfg.hidden_size, cfg.num_heads, 0, **cfg.layer_mixer_kwargs(0))


def layer_step(mixer: torch.nn.Module, B: int, T: int, device: torch.device, autocast: bool) -> Callable[[], None]:
    """One forward + backward of `mixer` on random hidden states [B, T, D] (bf16 under autocast)."""
    dtype = torch.bfloat16 if autocast else next(mixer.parameters()).dtype
    x_BTD = torch.randn(B, T, mixer.hidden_size, device=device, dtype=dtype, requires_grad=True)
    dy_BTD = torch.randn_like(x_BTD)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y_BTD, _ = mixer(x_BTD)
        y_BTD.backward(dy_BTD)
        mixer.zero_grad(set_to_none=True)
        x_BTD.grad = None

    return step


def run(args: argparse.Namespace) -> Report:
    device = resolve_device(args.device)
    limit_autotune(args.autotune)
    cfg = get_preset(args.preset)
    names = list(args.mixer) + ([] if args.no_baseline or BASELINE in args.mixer else [BASELINE])
    autocast = device.type == "cuda"
    report = Report("layer", args.out, {"hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads, **vars(args)})
    print(
        f"{args.preset} mixer layer fwd+bwd, D={cfg.hidden_size} H={cfg.num_heads}, {args.tokens:,} tokens per "
        f"call, autocast={autocast}, autotune={args.autotune}"
    )
    for name in names:
        mixer = build_layer(cfg, name, device)
        params = sum(p.numel() for p in mixer.parameters())
        for T in args.seq_len:
            B = max(1, args.tokens // T)
            step = partial(layer_step, mixer, B, T, device, autocast)
            report.measure(name, B, T, step, device, args.steps, args.warmup, extra={"params_M": params / 1e6})
        del mixer
        free_memory(device)
    report.finish(plot=not args.no_plot, title=f"{args.preset}: one mixer layer fwd+bwd")
    return report
