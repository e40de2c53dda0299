"""`linear-moe bench model`: one training step's forward + backward (no optimizer step) of a preset, per mixer.

    linear-moe bench model --preset A0.3B-2B --mixer gla,attention --vocab 32000 --shape 32x2048 --shape 4x16384:packed

Precision (`--precision`): `autocast` (default, as the trainer runs) = fp32 master weights with bf16 autocast;
`bf16` = bf16 weights without autocast (a throughput upper bound: no casts, bf16 residual stream). Each shape `BxT`
is a batch of B rows of T tokens; `BxT:packed` instead packs B documents of T tokens into one row with
`cu_seqlens` (the layout the data pipeline feeds the trainer). After `--warmup` steps, `--steps` steps are timed
with CUDA events: tokens/s, MFU (`flops_per_token(cfg, T)` over `--peak` FLOP/s, 989e12 = H200 dense bf16) and
`torch.cuda.max_memory_allocated`. `--mixer` takes several mixers (one model each, in turn; `attention` is the
softmax baseline). `--mixer-kwarg KEY=VALUE` sets a mixer option for every `--mixer` (e.g. `seq_split=2048`: GLA's
long rows through pieces, docs/ops.md). `--profile ROWS` then prints a torch.profiler table of the ops with the most
device time.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from linear_moe.bench.report import Record, Report
from linear_moe.bench.timer import free_memory, resolve_device, sync
from linear_moe.config import merge_overrides
from linear_moe.model.config import ModelConfig
from linear_moe.model.flops import count_params, flops_per_token
from linear_moe.model.lm import LinearMoEForCausalLM
from linear_moe.model.presets import get_preset
from linear_moe.ops.autotune import limit_autotune
from linear_moe.parallel import StepOptions, apply_step_options

DEFAULT_SHAPES = ("32x2048", "4x16384:packed")


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


def random_batch(
    vocab_size: int, b: int, t: int, packed: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random ids and labels [B, T] (or [1, B*T] with `cu_seqlens` [B+1] of B documents when `packed`)."""
    ids = torch.randint(0, vocab_size, (b, t), device=device)
    labels = torch.randint(0, vocab_size, (b, t), device=device)
    if not packed:
        return ids, labels, None
    cu = torch.arange(0, b * t + 1, t, device=device, dtype=torch.int32)
    return ids.reshape(1, b * t), labels.reshape(1, b * t), cu


def training_step(loss_fn: Callable[[], torch.Tensor], model: nn.Module, autocast: bool) -> Callable[[], None]:
    """forward (`loss_fn`, under bf16 autocast when `autocast`) + backward, gradients dropped after each step."""
    device_type = next(model.parameters()).device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def lm_step(
    model: LinearMoEForCausalLM, b: int, t: int, packed: bool = False, autocast: bool = True
) -> Callable[[], None]:
    """Our model's training step (LM loss + MoE aux loss) on B rows of T tokens (B packed documents when
    `packed`)."""
    ids, labels, cu = random_batch(model.cfg.vocab_size, b, t, packed, model.lm_head.weight.device)

    def loss() -> torch.Tensor:
        out = model(ids, labels=labels, cu_seqlens=cu)
        return out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)

    return training_step(loss, model, autocast)


def build_model(cfg: ModelConfig, device: torch.device, bf16: bool = False) -> LinearMoEForCausalLM:
    """The model of `cfg`, initialised directly on `device` (seeded), in bf16 when `bf16`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LinearMoEForCausalLM(cfg)
    return model.to(torch.bfloat16) if bf16 else model


def print_profile(step: Callable[[], None], rows: int, device: torch.device, steps: int = 2) -> None:
    """Run `steps` more steps under torch.profiler and print the `rows` ops with the most self device time
    (self CPU time for a CPU model)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"profile of {steps} steps, top {rows} by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90))


def mfu(cfg: ModelConfig, seq_len: int, peak: float, record: Record) -> float:
    """Model FLOP utilisation of `record`: its tokens/s x FLOPs per token over `peak` FLOP/s."""
    return record.tokens_per_s * flops_per_token(cfg, seq_len) / peak


def model_config(args: argparse.Namespace, mixer: str) -> ModelConfig:
    """The preset with `mixer`, `--mixer-kwarg`s, `--layer-pattern`, `--vocab` and the cross-entropy choice."""
    base = get_preset(args.preset)
    cfg = base.replace(
        mixer=mixer,
        mixer_kwargs=merge_overrides(base.mixer_kwargs, args.mixer_kwarg),
        layer_pattern=args.layer_pattern,
        fuse_linear_cross_entropy=not args.no_fused_ce,
    )
    return cfg if args.vocab is None else cfg.replace(vocab_size=args.vocab)


def run(args: argparse.Namespace) -> Report:
    device = resolve_device(args.device)
    limit_autotune(args.autotune)
    shapes = [(spec, *parse_shape(spec)) for spec in args.shape or DEFAULT_SHAPES]  # bad shapes fail first
    report = Report("model", args.out, vars(args))
    autocast = args.precision == "autocast"
    for mixer in args.mixer:
        cfg = model_config(args, mixer)
        model = build_model(cfg, device, bf16=args.precision == "bf16")
        apply_step_options(model, StepOptions.of(args))
        print(
            f"{args.preset} mixer={cfg.mixer} mixer_kwargs={cfg.mixer_kwargs} pattern={cfg.layer_pattern} params={count_params(cfg) / 1e6:,.1f}M "
            f"active={count_params(cfg, active=True) / 1e6:,.1f}M precision={args.precision} "
            f"compile={args.compile} autotune={args.autotune} ac={args.activation_checkpointing} "
            f"ckpt_experts={args.checkpoint_experts} expert_chunk={args.expert_chunk} "
            f"offload={args.offload_activations} vocab={cfg.vocab_size}",
            flush=True,
        )
        for _, b, t, packed in shapes:
            report.measure(
                mixer,
                b,
                t,
                partial(lm_step, model, b, t, packed, autocast),
                device,
                args.steps,
                args.warmup,
                packed=packed,
                extra={"mfu": partial(mfu, cfg, t, args.peak)},
            )
            if args.profile:
                print_profile(lm_step(model, b, t, packed, autocast), args.profile, device)
        del model
        free_memory(device)
    report.finish(plot=not args.no_plot, title=f"{args.preset}: training step fwd+bwd ({args.precision})")
    return report
