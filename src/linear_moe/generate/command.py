"""`linear-moe generate CHECKPOINT`: prompts from flags, a file or stdin; one prompt streams to the terminal."""

from __future__ import annotations

import sys
from pathlib import Path

from ..train.logging import note
from .engine import GenerationConfig, GenerationStats, generate
from .loader import load_model
from .sampling import SamplingParams


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    """`--prompt` texts, else the lines of `--prompts-file` (`-`: stdin), else all of stdin as one prompt."""
    if prompt:
        return list(prompt)
    if prompts_file is not None:
        text = sys.stdin.read() if prompts_file == "-" else _read(Path(prompts_file))
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{prompts_file}: no prompts (one per line)")
        return lines
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no prompt: give --prompt TEXT, --prompts-file FILE (one per line) or a prompt on stdin")
    return [sys.stdin.read().rstrip("\n")]


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    return path.read_text(encoding="utf-8")


def run_generate(
    checkpoint: str,
    prompts: list[str],
    config: GenerationConfig,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | None = None,
    chat: bool = False,
    cuda_graph: bool = False,
) -> GenerationStats:
    """Generate for `prompts` and print: a single prompt streams (prompt, then the continuation as it comes);
    several print `[i] prompt+continuation` blocks at the end. The stats line goes to stderr."""
    from ..data import chat_prompt

    loaded = load_model(checkpoint, device, dtype, tokenizer)
    step = None
    if cuda_graph:
        from .cuda_graph import CUDAGraphDecodeStep

        if next(loaded.model.parameters()).device.type != "cuda":
            raise ValueError("--cuda-graph needs the model on CUDA (--device cuda)")
        step = CUDAGraphDecodeStep(loaded.model)
    tok = loaded.tokenizer
    ids = [chat_prompt(tok, [{"role": "user", "content": p}]) if chat else tok.encode(p) for p in prompts]
    ids = [i or [tok.eos_id] for i in ids]  # an empty prompt starts a new document
    stream = len(prompts) == 1
    if stream:
        print(prompts[0], end="", flush=True)
    gens, stats = generate(
        loaded.model,
        ids,
        config,
        tok,
        on_text=(lambda _n, text: print(text, end="", flush=True)) if stream else None,
        step=step,
    )
    if stream:
        print()
    else:
        print("\n\n".join(f"[{i}] {p}{g.text}" for i, (p, g) in enumerate(zip(prompts, gens, strict=True))))
    note(stats.line())
    return stats


def generation_config(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    stop: list[str] | None,
    eos: bool,
    seed: int,
    max_seq_len: int | None,
    prefill_chunk: int,
) -> GenerationConfig:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature, top_k, top_p, repetition_penalty),
        stop=tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in stop or ()),  # --stop "\\n\\n": newlines
        stop_at_eos=eos,
        seed=seed,
        prefill_chunk=prefill_chunk,
        max_seq_len=max_seq_len,
    )
