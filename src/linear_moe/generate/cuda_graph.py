"""Decoding steps replayed from a CUDA graph, so per-token latency is GPU time rather than kernel-launch time.

A decode step has static shapes: `[B]` tokens in, `[B, V]` logits out, and states whose shapes do not change (the
recurrent and short-conv states; softmax layers' KV caches are preallocated and written in place, and attend over
all their slots with a mask while capturing). `CUDAGraphDecodeStep` captures one step on the first call and replays
it afterwards; it is a drop-in `step` for `generate()`:

    gens, stats = generate(model, prompts, config, tokenizer, step=CUDAGraphDecodeStep(model))

`benchmark_decode` times steps against context length (eager or graphed) and reports per-token latency and memory.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .engine import decode_step
from .states import States, init_states, state_bytes


class CUDAGraphDecodeStep:
    """`decode_step(model, tokens_B, states)` captured in a CUDA graph for the batch size and state shapes of its
    first call. Returns the graph's static logits `[B, V]` (overwritten by the next call: clone to keep them) and
    static states; passing those states back avoids copying them in (any other states are copied in first)."""

    def __init__(self, model: nn.Module, warmup: int = 2):
        self.model, self.warmup = model, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens_B: torch.Tensor | None = None
        self.states: States = []
        self.logits_BV: torch.Tensor | None = None

    def __call__(self, tokens_B: torch.Tensor, states: States) -> tuple[torch.Tensor, States]:
        if self.graph is None:
            self._capture(tokens_B, states)
        if tokens_B.shape != self.tokens_B.shape:
            raise ValueError(
                f"CUDAGraphDecodeStep: captured for batch {self.tokens_B.shape[0]}, got {tokens_B.shape[0]}"
            )
        self.tokens_B.copy_(tokens_B)
        if states is not self.states:
            _copy_states(self.states, states)
        self.graph.replay()
        return self.logits_BV, self.states

    def _step(self, states: States) -> torch.Tensor:
        logits_BV, new = decode_step(self.model, self.tokens_B, states)
        _copy_states(states, new)  # recurrent mixers return new tensors; attention writes in place
        return logits_BV

    def _capture(self, tokens_B: torch.Tensor, states: States) -> None:
        if tokens_B.device.type != "cuda":
            raise ValueError("CUDAGraphDecodeStep needs the model on CUDA")
        if any(s is None for s in states):
            raise ValueError("CUDAGraphDecodeStep needs preallocated states (prefill with init_states)")
        self.tokens_B = tokens_B.clone()
        self.states = [{k: t.clone() for k, t in s.items()} for s in states]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        scratch = [{k: t.clone() for k, t in s.items()} for s in states]  # warm-up steps must not use up cache slots
        with torch.cuda.stream(side), torch.no_grad():  # warm up (Triton compiles, cuBLAS workspaces) off the graph
            for _ in range(self.warmup):
                self._step(scratch)
        torch.cuda.current_stream().wait_stream(side)
        del scratch
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():  # records only: self.states keeps its values
            self.logits_BV = self._step(self.states)


def _copy_states(dst: States, src: States) -> None:
    for d, s in zip(dst, src, strict=True):
        for k, t in d.items():
            if s[k] is not t:
                t.copy_(s[k])


def filled_states(model: nn.Module, batch: int, context: int, room: int, dtype: torch.dtype) -> States:
    """States as after `context` tokens, without running them: zero recurrent states and KV caches whose first
    `context` slots hold random keys and values (a step's cost does not depend on the values)."""
    device = next(model.parameters()).device
    states = init_states(model, batch, device, dtype, max_seq_len=context + room)
    for s in states:
        if s is not None and "valid" in s:
            s["valid"][:, :context] = True
            s["k"].normal_(0, 0.1)
            s["v"].normal_(0, 0.1)
    return states


@torch.no_grad()
def benchmark_decode(
    model: nn.Module,
    batch: int,
    contexts: list[int],
    steps: int = 50,
    warmup: int = 5,
    cuda_graph: bool = True,
) -> list[dict[str, float]]:
    """Per-token latency (ms per step), tokens/s and memory of decoding after each context length; one dict per
    context: `context`, `batch`, `ms_per_token`, `tokens_per_s`, `state_MiB` (all rows), `peak_MiB` (CUDA)."""
    device = next(model.parameters()).device
    model.eval()
    rows = []
    for context in contexts:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            rows.append(_time_steps(model, batch, context, steps, warmup, cuda_graph and device.type == "cuda"))
        except torch.cuda.OutOfMemoryError:
            rows.append({"context": context, "batch": batch, "error": "out of memory"})
    return rows


def _time_steps(model: nn.Module, batch: int, context: int, steps: int, warmup: int, graph: bool) -> dict:
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    states = filled_states(model, batch, context, steps + warmup + 4, dtype)
    step = CUDAGraphDecodeStep(model) if graph else (lambda t, s: decode_step(model, t, s))
    tokens_B = torch.randint(0, model.cfg.vocab_size, (batch,), device=device)
    for _ in range(warmup):
        logits_BV, states = step(tokens_B, states)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits_BV, states = step(tokens_B, states)
        tokens_B = logits_BV.argmax(-1)
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3 / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {
        "context": context,
        "batch": batch,
        "ms_per_token": ms,
        "tokens_per_s": batch * 1e3 / ms,
        "state_MiB": state_bytes(states) / 2**20,
        "peak_MiB": peak,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    """`python -m linear_moe.generate.cuda_graph --preset A0.3B-2B --mixer gla --batch 1 64`: a Markdown table of
    decode latency and memory against context (random weights, bf16 on CUDA)."""
    import argparse

    from ..model import LinearMoEForCausalLM, get_preset

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--preset", default="A0.3B-2B")
    p.add_argument("--mixer", nargs="+", default=["gla"])
    p.add_argument("--pattern", default=None, help="layer pattern, e.g. LLLN for a hybrid stack")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eager", action="store_true", help="no CUDA graph")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("| mixer | pattern | batch | context | ms/token | tokens/s | state MiB | peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mixer in args.mixer:
        cfg = get_preset(args.preset).replace(mixer=mixer, layer_pattern=args.pattern, vocab_size=args.vocab)
        model = LinearMoEForCausalLM(cfg).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        for batch in args.batch:
            for r in benchmark_decode(model, batch, args.context, args.steps, cuda_graph=not args.eager):
                if "error" in r:
                    print(f"| {mixer} | {args.pattern or '-'} | {batch} | {r['context']} | {r['error']} | | | |")
                    continue
                print(
                    f"| {mixer} | {args.pattern or '-'} | {batch} | {r['context']} | {r['ms_per_token']:.2f} | "
                    f"{r['tokens_per_s']:.0f} | {r['state_MiB']:.1f} | {r['peak_MiB']:.0f} |",
                    flush=True,
                )
        del model


if __name__ == "__main__":
    main()
