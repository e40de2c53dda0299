"""`linear-moe serve CHECKPOINT`: an OpenAI-compatible HTTP server (completions and chat completions, streaming)
that batches concurrent requests at every decode step (docs/generation.md). Needs the `serve` extra (aiohttp)."""

from __future__ import annotations

SERVE_EXTRA = "pip install 'linear-moe[serve]'"


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_seq_len: int = 2048,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
) -> None:
    """Serve a checkpoint over HTTP with OpenAI's API: POST /v1/completions and /v1/chat/completions (stream: true
    for server-sent events), GET /v1/models. Concurrent requests are batched at every decode step; --max-seq-len
    is the KV-cache size of softmax layers per request. Needs the serve extra (aiohttp). See docs/generation.md."""
    try:
        from aiohttp import web
    except ImportError:
        raise ImportError(f"linear-moe serve needs aiohttp: {SERVE_EXTRA}") from None
    from ..generate.loader import load_model
    from ..train.logging import note
    from .app import build_app
    from .engine import BatchEngine

    if max_batch < 1 or max_seq_len < 1:
        raise ValueError(f"--max-batch and --max-seq-len must be >= 1, got {max_batch} and {max_seq_len}")
    loaded = load_model(checkpoint, device, dtype)
    engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch, max_seq_len, seed)
    note(f"serving {loaded.path} on http://{host}:{port}/v1 (batch up to {max_batch}, {max_seq_len} tokens)")
    try:
        web.run_app(build_app(engine, loaded.path.parent.parent.name or str(loaded.path)), host=host, port=port,
                    print=None)  # fmt: skip
    finally:
        engine.close()


__all__ = ["SERVE_EXTRA", "serve"]
