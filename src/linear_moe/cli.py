"""`linear-moe prepare | train | finetune | plot | convert | bench`: thin typed functions over the library.

Every user-facing failure (bad config key or value, missing or empty data, corrupt or mismatched
checkpoint, a run directory that would be overwritten) prints one `error: ...` line on stderr and
exits with code 2.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

from .bench.options import add_bench_parsers
from .train.interrupt import Interrupted
from .train.logging import note

EXIT_USAGE = 2
ARGS_HELP = "[CONFIG.yaml] [section.key=value ...], e.g. train.steps=100 model.preset=debug-mixtral"
FINETUNE_ARGS_HELP = "[CONFIG.yaml] [section.key=value ...], e.g. train.steps=100 finetune.data=chat.jsonl"
SHOW_CONFIG_HELP = "print the merged config (every key, its value and default) and exit without training"


# ---------------------------------------------------------------------------------------------- commands


def prepare(
    inputs: list[str],
    out: str,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    text_field: str = "text",
    split_docs: bool = False,
    val_fraction: float = 0.0,
    shard_tokens: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize text (.txt/.md, .jsonl, .parquet, Hugging Face save_to_disk directories, builtin:python-docs)
    into a dataset directory for `train` (data.path=OUT). Without --tokenizer a byte-level BPE of
    --vocab-size is trained on the inputs."""
    from .data import prepare as prepare_data

    meta = prepare_data(
        inputs,
        out,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        text_field=text_field,
        split_docs=split_docs,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        overwrite=overwrite,
    )
    print(f"wrote {out}: {meta['n_tokens']:,} tokens in {meta['n_docs']:,} documents, vocab {meta['vocab_size']}")
    return meta


def train(config: str | None = None, overrides: list[str] = (), show_config: bool = False) -> dict[str, Any] | None:
    """Pretrain a model. CONFIG is a YAML run config (default: the built-in small hybrid Gated-DeltaNet /
    attention MoE on builtin:python-docs); `section.key=value` arguments override it, e.g.
    `train.steps=100 model.preset=debug-mixtral`. Continue a run with `train.resume=auto`.
    `linear-moe train --show-config [CONFIG] [key=value ...]` lists every config key with its value and default."""
    if show_config:
        from .train.config import load_run_config
        from .train.config import show_config as render

        print(render(load_run_config(config, list(overrides))), end="")
        return None
    from .train.run import run_training

    return run_training(config, list(overrides))


def finetune(config: str | None, from_checkpoint: str, overrides: list[str] = ()) -> dict[str, Any]:
    """Supervised finetuning from a checkpoint: the model (config and weights) and tokenizer come from
    --from, the optimizer starts fresh, and the loss covers response tokens only. CONFIG sets the data
    (finetune.data: a chat JSONL) and training options; `section.key=value` arguments override it."""
    from .train.run import run_finetuning

    return run_finetuning(config, from_checkpoint, list(overrides))


def plot(run_dir: str) -> list[Path]:
    """Write loss.png (train and val loss vs step) and expert_load.png (MoE layers x experts) into RUN_DIR
    from its metrics.jsonl."""
    from .train.plot import plot_run

    written = plot_run(Path(run_dir))
    print("wrote " + ", ".join(str(p) for p in written))
    return written


def convert(
    checkpoint: str | None = None,
    to_hf: str | None = None,
    from_hf: str | None = None,
    out: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert between checkpoints and Hugging Face directories. `convert CHECKPOINT --to-hf OUT` writes
    config.json, model.safetensors, the tokenizer and the modeling code, loadable with
    `transformers.AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`; `convert --from-hf DIR
    --out CHECKPOINT_DIR` reads such a directory back into a checkpoint. See docs/hf.md."""
    from .hf import export_hf, import_hf

    if checkpoint and to_hf and not (from_hf or out):
        written = export_hf(checkpoint, to_hf, overwrite)
    elif from_hf and out and not (checkpoint or to_hf):
        written = import_hf(from_hf, out, overwrite)
    else:
        raise ValueError("convert needs CHECKPOINT --to-hf OUT or --from-hf DIR --out CHECKPOINT_DIR")
    print(f"wrote {written}")
    return written


# ---------------------------------------------------------------------------------------------- inference


def generate(
    checkpoint: str,
    prompt: list[str] | None = None,
    prompts_file: str | None = None,
    chat: bool = False,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    eos: bool = True,
    seed: int = 0,
    max_seq_len: int | None = None,
    prefill_chunk: int = 2048,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | None = None,
    cuda_graph: bool = False,
) -> Any:
    """Continue prompts with a trained model. CHECKPOINT is a checkpoint directory (or a run directory: its newest
    checkpoint). Prompts come from --prompt (repeatable), --prompts-file (one per line; - reads stdin) or stdin;
    one prompt streams to the terminal, several run as one batch. Ends with a tokens/s and memory line on stderr.
    --cuda-graph replays each decode step from a CUDA graph. See docs/generation.md."""
    from .generate.command import generation_config, read_prompts, run_generate

    config = generation_config(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, eos, seed, max_seq_len, prefill_chunk
    )
    prompts = read_prompts(prompt, prompts_file)
    return run_generate(checkpoint, prompts, config, device, dtype, tokenizer, chat, cuda_graph)


def evaluate(
    checkpoint: str,
    tasks: str | None = None,
    include_path: str | None = None,
    builtin_tasks: bool = True,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 16,
    perplexity: str | None = None,
    out: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a checkpoint with lm-evaluation-harness (`--tasks hellaswag,arc_easy`; needs the eval extra) or its
    perplexity on a text file (`--perplexity FILE`). Tasks may be lm-eval's or task YAML files in --include-path
    (local data works offline). Prints a table; --out writes the results as JSON. See docs/evaluation.md."""
    from .eval import run_perplexity, run_tasks

    if perplexity is not None:
        return run_perplexity(checkpoint, perplexity, out, device=device, dtype=dtype)
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not names:
        raise ValueError("give --tasks TASK[,TASK...] or --perplexity FILE")
    return run_tasks(
        checkpoint, names, include_path, num_fewshot, limit, batch_size, out, device, dtype, seed, builtin_tasks
    )


def _call(fn):
    """`run` for a parser whose option names are `fn`'s parameter names."""
    names = list(inspect.signature(fn).parameters)
    return lambda a: fn(**{n: getattr(a, n) for n in names})


def _add_inference_parsers(sub, fmt) -> None:
    from .serve import serve  # its signature and docstring are the command's (the package imports nothing heavy)

    p = sub.add_parser("generate", help=_summary(generate), description=_doc(generate), formatter_class=fmt)
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", default=None, help="a file with one prompt per line (- = stdin)")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user turn (finetuned models)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all; default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's penalty (default 1.0 = off)")
    p.add_argument("--stop", action="append", help="a stop string (repeatable); the text ends before it")
    p.add_argument("--no-eos", dest="eos", action="store_false", help="do not stop at the end-of-text token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV-cache slots of softmax layers (default: fit)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill step (default 2048)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--cuda-graph", action="store_true", help="decode steps replayed from a CUDA graph (CUDA only)")
    p.set_defaults(run=_call(generate))

    p = sub.add_parser("eval", help=_summary(evaluate), description=_doc(evaluate), formatter_class=fmt)
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--tasks", default=None, help="lm-eval task names, comma separated")
    p.add_argument("--include-path", default=None, help="a directory of task YAML files (local tasks)")
    p.add_argument("--no-builtin-tasks", dest="builtin_tasks", action="store_false", help="only --include-path")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=16, help="requests per batch (default 16)")
    p.add_argument("--perplexity", default=None, metavar="FILE", help="perplexity of a text file instead of tasks")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--seed", type=int, default=0, help="seed of few-shot sampling and generation (default 0)")
    p.set_defaults(run=_call(evaluate))

    p = sub.add_parser("serve", help=_summary(serve), description=_doc(serve), formatter_class=fmt)
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="prompt + new tokens per request (default 2048)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.set_defaults(run=_call(serve))


# ---------------------------------------------------------------------------------------------- parser


def _doc(fn) -> str:
    return inspect.getdoc(fn) or ""


def _summary(fn) -> str:
    """The first sentence of `fn`'s docstring (the subcommand list of --help)."""
    text = " ".join(_doc(fn).split())
    return text.split(". ")[0].rstrip(".") + "."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user-facing failure
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def bench(args: argparse.Namespace) -> None:
    """Benchmarks: `linear-moe bench kernel | layer | model | moe | decode | peers | report` (GPU timings from CUDA
    events after warm-up; see docs/benchmarks.md).

    Each mode prints a table, writes OUT/MODE.json and draws OUT/MODE.png (tokens/s and peak memory against
    sequence length, one line per mixer, softmax attention measured in the same run as the baseline).
    `linear-moe bench model --preset A0.3B-2B --mixer gla,attention --vocab 32000 --shape 32x2048` times a preset's
    training step; `linear-moe bench MODE --help` lists each mode's options; `--device cpu` smoke-tests a mode.
    """
    from .bench import run_mode

    run_mode(args.mode, args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="linear-moe", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("prepare", help=_summary(prepare), description=_doc(prepare), formatter_class=fmt)
    p.add_argument("inputs", nargs="+", help="files, directories, or builtin:python-docs")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--tokenizer", default=None, help="an existing tokenizer.json (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when training (default 4096)")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet text field (default text)")
    p.add_argument("--split-docs", action="store_true", help="split .txt/.md files at blank lines into documents")
    p.add_argument("--val-fraction", type=float, default=0.0, help="documents held out for validation (default 0)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default: one file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.set_defaults(
        run=lambda a: prepare(
            a.inputs,
            a.out,
            a.tokenizer,
            a.vocab_size,
            a.text_field,
            a.split_docs,
            a.val_fraction,
            a.shard_tokens,
            a.overwrite,
        )
    )

    p = sub.add_parser("train", help=_summary(train), description=_doc(train), formatter_class=fmt)
    p.add_argument("args", nargs="*", metavar="ARGS", help=ARGS_HELP)
    p.add_argument("--show-config", action="store_true", help=SHOW_CONFIG_HELP)
    p.set_defaults(run=lambda a: train(*_split_config(a.args), show_config=a.show_config))

    p = sub.add_parser("finetune", help=_summary(finetune), description=_doc(finetune), formatter_class=fmt)
    p.add_argument("args", nargs="*", metavar="ARGS", help=FINETUNE_ARGS_HELP)
    p.add_argument(
        "--from", dest="from_checkpoint", required=True, metavar="CHECKPOINT_DIR", help="checkpoint to start from"
    )
    p.set_defaults(run=lambda a: _finetune_args(a.args, a.from_checkpoint))

    p = sub.add_parser("plot", help=_summary(plot), description=_doc(plot), formatter_class=fmt)
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.set_defaults(run=lambda a: plot(a.run_dir))

    p = sub.add_parser("convert", help=_summary(convert), description=_doc(convert), formatter_class=fmt)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint (or run) directory to export")
    p.add_argument("--to-hf", metavar="OUT", help="Hugging Face directory to write")
    p.add_argument("--from-hf", metavar="DIR", help="exported Hugging Face directory to import")
    p.add_argument("--out", metavar="CHECKPOINT_DIR", help="checkpoint directory to write (with --from-hf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.set_defaults(run=lambda a: convert(a.checkpoint, a.to_hf, a.from_hf, a.out, a.overwrite))

    p = sub.add_parser("bench", help=_summary(bench), description=_doc(bench), formatter_class=fmt)
    add_bench_parsers(p, _Parser)
    p.set_defaults(run=bench)
    _add_inference_parsers(sub, fmt)
    return parser


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]` -> (config path or None, overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    stray = [a for a in args[1:] if "=" not in a]
    if stray:
        raise ValueError(f"unexpected argument {stray[0]!r}: give the config file first, then key=value overrides")
    return None, args


def _finetune_args(args: list[str], from_checkpoint: str) -> dict[str, Any]:
    config, overrides = _split_config(args)
    return finetune(config, from_checkpoint, overrides)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of `linear-moe` and `python -m linear_moe`."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("train", "finetune") and not any(a.startswith("-") for a in extra):
        args.args += extra  # overrides after an option (`finetune CONFIG --from DIR key=value`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:  # a run stopped by SIGINT/SIGTERM after saving a checkpoint
        note(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        note("interrupted")
        return 130
    return 0


__all__ = ["main", "prepare", "train", "finetune", "plot", "convert", "bench", "generate", "evaluate"]
