"""Throughput, MFU and expert-load statistics."""

from __future__ import annotations

import torch

# Dense bf16 peak TFLOP/s (no sparsity) by a substring of the device name; the first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("4090", 165.0),
)


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device from its name, None on CPU or for an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved training FLOP/s over the device peak (None without a peak)."""
    return tokens_per_s * flops_per_token / peak if peak else None


def load_fractions(load_LE: torch.Tensor) -> torch.Tensor:
    """Per-layer fraction of routed tokens per expert: `load [L, E]` -> rows summing to 1 ([L, E])."""
    load_LE = load_LE.float()
    return load_LE / load_LE.sum(-1, keepdim=True).clamp_min(1e-9)


def load_imbalance(load_LE: torch.Tensor) -> float:
    """Max over layers of (max expert load / mean expert load): 1.0 is perfectly balanced."""
    load_LE = load_LE.float()
    return float((load_LE.max(-1).values / load_LE.mean(-1).clamp_min(1e-9)).max())


def memory_gb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory in GB since the last reset (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
