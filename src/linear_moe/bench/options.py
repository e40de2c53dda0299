"""The command line of `linear-moe bench MODE`: one subparser per mode, each with its own `--help`.

Kept free of torch imports so `linear-moe --help` stays fast; a mode's description is its module docstring,
read from the source file without importing it. List options take comma lists or repeats
(`--seq-len 2048,16384 --seq-len 65536`).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

from linear_moe.bench import MODES
from linear_moe.ops.autotune import MODES as AUTOTUNE_MODES


def _doc(mode: str) -> str:
    spec = importlib.util.find_spec(f"linear_moe.bench.{mode}")
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


class _Extend(argparse.Action):
    """Repeatable list option: the first use replaces the default, later ones extend it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), *values])


def _list(p: argparse.ArgumentParser, flag: str, kind, default: list, help: str) -> None:
    p.add_argument(
        flag, type=kind, action=_Extend, default=default, help=f"{help} (default {','.join(map(str, default))})"
    )


def _common(p: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke test (wall clock, no memory)")
    p.add_argument("--steps", type=int, default=steps, help=f"timed calls per measurement (default {steps})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls first (default {warmup})")
    p.add_argument(
        "--out", default="bench-results", help="directory for MODE.json and MODE.png (default bench-results)"
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument(
        "--autotune",
        choices=AUTOTUNE_MODES,
        default="full",
        help="Triton configs fla's autotuners try: full (fla's lists), few (three) or one; a cold full autotune "
        "of the A0.3B-2B step takes minutes",
    )


def _model_options(p: argparse.ArgumentParser, vocab: int | None) -> None:
    p.add_argument("--preset", default="A0.3B-2B", help="model preset (default A0.3B-2B)")
    p.add_argument("--layer-pattern", default=None, help="e.g. LLLN (hybrid with softmax attention)")
    p.add_argument("--vocab", type=int, default=vocab, help=f"override the preset's vocabulary size (default {vocab})")
    p.add_argument(
        "--mixer-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set model.mixer_kwargs KEY of our model's mixer (repeatable; YAML values), e.g. seq_split=2048",
    )


def _kernel(p: argparse.ArgumentParser) -> None:
    _list(p, "--family", _names, ["gla", "simple_gla", "gated_delta_rule"], "chunk_<family> ops to time")
    _list(p, "--seq-len", _ints, [2048, 8192, 32768], "sequence lengths T")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per call: B = tokens // T (default 65536)")
    p.add_argument("--heads", type=int, default=8, help="H (default 8)")
    p.add_argument("--key-dim", type=int, default=128, help="K per head (default 128)")
    p.add_argument("--value-dim", type=int, default=128, help="V per head (default 128)")
    p.add_argument("--no-baseline", action="store_true", help="leave out causal softmax attention (SDPA)")
    _common(p, steps=10, warmup=2)


def _layer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="A0.3B-2B", help="the model whose layer 0 is timed (default A0.3B-2B)")
    _list(p, "--mixer", _names, ["gla", "gated_deltanet", "lightning_attn"], "mixers to time")
    _list(p, "--seq-len", _ints, [2048, 16384, 32768, 65536], "sequence lengths T")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per call: B = tokens // T (default 65536)")
    p.add_argument("--no-baseline", action="store_true", help="leave out softmax attention")
    _common(p, steps=10, warmup=2)


def _model(p: argparse.ArgumentParser) -> None:
    _model_options(p, vocab=None)
    _list(p, "--mixer", _names, ["gla"], "mixers, one model each (attention = the softmax baseline)")
    p.add_argument("--shape", action="append", help="BxT or BxT:packed (repeatable); default 32x2048, 4x16384:packed")
    p.add_argument("--peak", type=float, default=989e12, help="peak bf16 FLOP/s for MFU (default 989e12, H200)")
    p.add_argument(
        "--precision",
        choices=("autocast", "bf16"),
        default="autocast",
        help="autocast: fp32 weights + bf16 autocast; bf16: bf16 weights, no autocast",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
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
    p.add_argument(
        "--expert-chunk",
        type=int,
        default=0,
        metavar="TOKENS",
        help="routed experts in chunks of TOKENS tokens, each recomputed in backward (as train.expert_chunk)",
    )
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="keep saved activations in host memory (as train.offload_activations)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="after timing, profile two steps and print the ROWS ops with the most device time",
    )
    _common(p, steps=10, warmup=3)


def _moe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=64, help="E (default 64)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (default 8)")
    p.add_argument("--hidden", type=int, default=1024, help="D (default 1024)")
    p.add_argument("--ffn", type=int, default=896, help="expert FFN width F (default 896)")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per call (default 65536)")
    p.add_argument("--backend", default="auto", choices=["auto", "grouped_mm", "bmm"], help="grouped matmul")
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="drop assignments beyond this capacity in the MoELayer and gather+combine rows (default: dropless)",
    )
    _common(p, steps=10, warmup=3)


def _decode(p: argparse.ArgumentParser) -> None:
    _model_options(p, vocab=32000)
    _list(p, "--mixer", _names, ["gla", "gated_deltanet", "lightning_attn"], "mixers, one model each")
    _list(p, "--context", _ints, [2048, 16384, 65536], "context lengths C before decoding")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    p.add_argument("--eager", action="store_true", help="no CUDA graph: time eager steps (kernel launches included)")
    p.add_argument("--no-baseline", action="store_true", help="leave out softmax attention")
    p.set_defaults(no_fused_ce=False)
    _common(p, steps=32, warmup=4)


def _peers(p: argparse.ArgumentParser) -> None:
    _model_options(p, vocab=32000)
    p.add_argument("--mixer", default="gla", help="our model's mixer (default gla)")
    _list(p, "--peers", _names, ["hf-qwen2-moe", "fla-gla"], "peer systems")
    _list(p, "--seq-len", _ints, [2048, 16384], "sequence lengths T")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per step: B = tokens // T (default 65536)")
    p.set_defaults(no_fused_ce=False)
    _common(p, steps=5, warmup=2)


def _report(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files", nargs="+", metavar="FILE.json", help="JSON files of one mode, written by `linear-moe bench`"
    )
    p.add_argument("--out", default="bench-results", help="directory for the merged MODE.json and MODE.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


_OPTIONS = {
    "kernel": _kernel,
    "layer": _layer,
    "model": _model,
    "moe": _moe,
    "decode": _decode,
    "peers": _peers,
    "report": _report,
}


def add_bench_parsers(bench: argparse.ArgumentParser, parser_class: type[argparse.ArgumentParser]) -> None:
    """One subparser per mode under the `bench` parser; the chosen mode lands in `args.mode`."""
    sub = bench.add_subparsers(dest="mode", required=True, metavar="MODE", parser_class=parser_class)
    for mode in MODES:
        doc = _doc(mode)
        p = sub.add_parser(
            mode,
            help=doc.split("\n")[0].split(": ", 1)[-1],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _OPTIONS[mode](p)
