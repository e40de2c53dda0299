"""GPU throughput of one training step's forward + backward (no optimizer step).

    python -m linear_moe.model.bench --preset A0.3B-2B --mixer gla --shape 32x2048 --shape 4x16384:packed

Precision (`--precision`): `autocast` (default, as the trainer runs) = fp32 master weights with bf16 autocast;
`bf16` = bf16 weights without autocast (a throughput upper bound: no casts, bf16 residual stream). Each shape `BxT` is a batch of B rows
of T tokens; `BxT:packed` instead packs B documents of T tokens into one row with `cu_seqlens` (the layout the
data pipeline feeds the trainer). After `--warmup` steps, `--steps` steps are timed with CUDA events and the
script prints tokens/s, MFU (`flops_per_token(cfg, T)` over `--peak` FLOP/s, 989e12 = H200 dense bf16) and
`torch.cuda.max_memory_allocated`. Targets (65,536-token steps, 2K context, one H200): HF Qwen2-MoE ran
81.5k tokens/s, fla's dense GLA 200k tokens/s; we aim well above the first and near the second.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from linear_moe.model.flops import count_params, flops_per_token
from linear_moe.model.lm import LinearMoEForCausalLM
from linear_moe.model.presets import PRESETS, get_preset
from linear_moe.ops.autotune import MODES, limit_autotune


@dataclass
class BenchResult:
    shape: str
    tokens_per_s: float
    mfu: float
    max_mem_gib: float


def parse_shape(spec: str) -> tuple[int, int, bool]:
    """'32x2048' -> (32, 2048, False); '4x16384:packed' -> (4, 16384, True)."""
    dims, _, layout = spec.partition(":")
    try:
        b, t = (int(v) for v in dims.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shape {spec!r}: expected BxT or BxT:packed, e.g. 32x2048") from None
    if layout not in ("", "packed"):
        raise ValueError(f"--shape {spec!r}: layout must be empty or 'packed'")
    return b, t, layout == "packed"


def bench_shape(
    model: LinearMoEForCausalLM,
    spec: str,
    steps: int,
    warmup: int,
    peak: float,
    autocast: bool = True,
    profile_rows: int = 0,
) -> BenchResult:
    """Time `steps` forward+backward steps of shape `spec` on the model's device (CUDA events on GPU; wall clock
    on CPU, which only smoke-tests the script); `profile_rows` > 0 then prints a torch.profiler table."""
    b, t, packed = parse_shape(spec)
    cfg, dev = model.cfg, model.lm_head.weight.device
    ids = torch.randint(0, cfg.vocab_size, (b, t), device=dev)
    labels = torch.randint(0, cfg.vocab_size, (b, t), device=dev)
    cu = None
    if packed:
        ids, labels = ids.reshape(1, b * t), labels.reshape(1, b * t)
        cu = torch.arange(0, b * t + 1, t, device=dev, dtype=torch.int32)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=labels, cu_seqlens=cu)
            loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    cuda = dev.type == "cuda"
    for i in range(warmup):  # the first step compiles and autotunes fla's Triton kernels: report its time
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        print(f"  {spec}: warm-up step {i + 1}/{warmup} {time.perf_counter() - t0:.1f} s", flush=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        end.record()
        torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t0
    tok_s = b * t * steps / seconds
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if profile_rows:
        print_profile(step, profile_rows, cuda)
    return BenchResult(spec, tok_s, tok_s * flops_per_token(cfg, t) / peak, mem)


def print_profile(step, rows: int, cuda: bool, steps: int = 2) -> None:
    """Run `steps` more steps under torch.profiler and print the `rows` ops with the most self device time
    (self CPU time for a CPU model)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"profile of {steps} steps, top {rows} by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90))


def main(argv: list[str] | None = None) -> list[BenchResult]:
    p = argparse.ArgumentParser(prog="linear-moe bench model", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="A0.3B-2B", choices=PRESETS)
    p.add_argument("--mixer", default="gla")
    p.add_argument("--layer-pattern", default=None, help="e.g. LLLN (hybrid with softmax attention)")
    p.add_argument("--shape", action="append", help="BxT or BxT:packed (repeatable); default 32x2048, 4x16384:packed")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak", type=float, default=989e12, help="peak bf16 FLOP/s for MFU")
    p.add_argument(
        "--precision",
        choices=("autocast", "bf16"),
        default="autocast",
        help="autocast: fp32 weights + bf16 autocast; bf16: bf16 weights, no autocast",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--no-fused-ce", action="store_true", help="plain cross-entropy (materialises logits)")
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block in backward (as train.activation_checkpointing)",
    )
    p.add_argument(
        "--checkpoint-experts",
        action="store_true",
        help="recompute only the routed experts in backward (as train.checkpoint_experts)",
    )
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size (e.g. 32000)")
    p.add_argument(
        "--autotune",
        choices=MODES,
        default="full",
        help="Triton configs fla's autotuners try: full (fla's lists), few (three) or one; a cold "
        "full autotune of the A0.3B-2B step takes minutes",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="after timing, profile two steps and print the ROWS ops with the most device time",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: the model bench needs a CUDA GPU; --device cpu only smoke-tests the script")
    limit_autotune(args.autotune)
    cfg = get_preset(args.preset).replace(
        mixer=args.mixer, layer_pattern=args.layer_pattern, fuse_linear_cross_entropy=not args.no_fused_ce
    )
    if args.vocab is not None:
        cfg = cfg.replace(vocab_size=args.vocab)
    torch.manual_seed(0)
    model = LinearMoEForCausalLM(cfg).to(args.device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    from linear_moe.parallel import apply_step_options

    apply_step_options(model, args.activation_checkpointing, args.checkpoint_experts, args.compile)
    print(
        f"{args.preset} mixer={cfg.mixer} pattern={cfg.layer_pattern} params={count_params(cfg) / 1e6:,.1f}M "
        f"active={count_params(cfg, active=True) / 1e6:,.1f}M precision={args.precision} compile={args.compile} "
        f"autotune={args.autotune} ac={args.activation_checkpointing} ckpt_experts={args.checkpoint_experts} vocab={cfg.vocab_size}"
    )
    results = []
    for spec in args.shape or ["32x2048", "4x16384:packed"]:
        r = bench_shape(
            model,
            spec,
            args.steps,
            args.warmup,
            args.peak,
            autocast=args.precision == "autocast",
            profile_rows=args.profile,
        )
        print(
            f"  {r.shape:>16}: {r.tokens_per_s / 1e3:8.1f}k tokens/s  MFU {100 * r.mfu:5.1f}%  "
            f"max mem {r.max_mem_gib:6.1f} GiB",
            flush=True,
        )
        results.append(r)
    return results


if __name__ == "__main__":
    main()
