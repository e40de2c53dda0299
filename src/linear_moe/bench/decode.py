"""`linear-moe bench decode`: per-token latency, tokens/s and memory of step-by-step decoding against context.

For each context length C the model (bf16 weights on CUDA, no gradients) prefills B random rows of C tokens in
chunks of `--prefill-chunk` into states preallocated by `model.init_states` (a KV cache of exactly the slots the run
needs for softmax layers, as generation sizes it); then `--steps` single-token steps are timed
with CUDA events after `--warmup` steps. A linear mixer's state has the same size at every context; softmax
attention's KV cache grows with C, which the `state_MiB` column and the memory plot show. tokens/s counts the
B tokens each step produces; `ms_per_token` is one step's latency.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from linear_moe.bench.model import build_model, model_config
from linear_moe.bench.report import Report
from linear_moe.bench.timer import free_memory, resolve_device
from linear_moe.mixers import MixerState
from linear_moe.model.lm import LinearMoEForCausalLM
from linear_moe.ops.autotune import limit_autotune

BASELINE = "attention"
States = list[MixerState | None]


def state_bytes(states: States | None) -> int:
    """Bytes held by every layer's state tensors."""
    return sum(t.numel() * t.element_size() for s in states or [] if s is not None for t in s.values())


@torch.no_grad()
def prefill(model: LinearMoEForCausalLM, ids_BT: torch.Tensor, chunk: int, room: int) -> tuple[torch.Tensor, States]:
    """Run `ids_BT` through the model `chunk` tokens at a time from states preallocated for `room` more tokens (a KV
    cache of T + room slots, as generation sizes it); the greedy next token [B] and the states after the last."""
    B, T = ids_BT.shape
    states = model.init_states(B, max_seq_len=T + room)
    for start in range(0, T, chunk):
        out = model(ids_BT[:, start : start + chunk], states=states, use_cache=True)
        states = out.states
    return out.logits[:, -1].argmax(-1), states


class Decoder:
    """Greedy decoding one token per row and step after a prefill (`prefill`); `states` are the current states."""

    def __init__(self, model: LinearMoEForCausalLM, ids_BT: torch.Tensor, chunk: int, room: int):
        self.model = model
        self.tokens_B, self.states = prefill(model, ids_BT, chunk, room)

    @torch.no_grad()
    def __call__(self) -> None:
        out = self.model(self.tokens_B[:, None], states=self.states, use_cache=True)
        self.tokens_B, self.states = out.logits[:, -1].argmax(-1), out.states


def new_decoder(model: LinearMoEForCausalLM, B: int, C: int, chunk: int, room: int, made: list[Decoder]) -> Decoder:
    """A `Decoder` after B random rows of C tokens with room for `room` steps, also appended to `made` (to read
    its states afterwards)."""
    ids_BT = torch.randint(0, model.cfg.vocab_size, (B, C), device=model.lm_head.weight.device)
    made.append(Decoder(model, ids_BT, chunk, room))
    return made[-1]


def run(args: argparse.Namespace) -> Report:
    device = resolve_device(args.device)
    limit_autotune(args.autotune)
    names = list(args.mixer) + ([] if args.no_baseline or BASELINE in args.mixer else [BASELINE])
    report = Report("decode", args.out, vars(args))
    B = args.batch
    print(f"{args.preset} decoding, batch {B}, {args.steps} timed steps per context, autotune={args.autotune}")
    for name in names:
        model = build_model(model_config(args, name), device, bf16=device.type == "cuda").eval()
        for C in args.context:
            made: list[Decoder] = []
            step = partial(new_decoder, model, B, C, args.prefill_chunk, args.warmup + args.steps, made)
            record = report.measure(name, B, C, step, device, args.steps, args.warmup, tokens_per_step=B)
            if not record.error:
                record.extra = {"ms_per_token": record.ms_per_step, "state_MiB": state_bytes(made[-1].states) / 2**20}
                report.write_json()
            made.clear()
        del model
        free_memory(device)
    report.finish(plot=not args.no_plot, title=f"{args.preset}: decoding one token per step after C tokens")
    return report
