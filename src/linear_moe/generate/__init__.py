"""Generation from Linear-MoE models: chunked prefill, then constant-memory recurrent decoding (docs/generation.md).

`generate(model, prompts, GenerationConfig(...), tokenizer)` continues a batch of token-id prompts of any lengths;
`load_model(checkpoint)` builds a model and tokenizer from a checkpoint directory; `prefill` / `decode_step` are the
two halves for callers that drive decoding themselves (the server, the decode benchmark).
"""

from .engine import (
    DecodeStep,
    Generation,
    GenerationConfig,
    GenerationError,
    GenerationStats,
    TextStream,
    check_fits,
    decode_step,
    generate,
    prefill,
)
from .loader import LoadedModel, load_model, resolve_checkpoint
from .sample import sample_text
from .sampling import SamplingParams, sample_next
from .states import States, init_states, join_rows, put_rows, select_rows, state_bytes, state_shapes

__all__ = [
    "DecodeStep",
    "Generation",
    "GenerationConfig",
    "GenerationError",
    "GenerationStats",
    "LoadedModel",
    "SamplingParams",
    "States",
    "TextStream",
    "check_fits",
    "decode_step",
    "generate",
    "init_states",
    "join_rows",
    "load_model",
    "prefill",
    "put_rows",
    "resolve_checkpoint",
    "sample_next",
    "sample_text",
    "select_rows",
    "state_bytes",
    "state_shapes",
]
