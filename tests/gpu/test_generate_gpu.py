"""Generation on CUDA with fla's kernels: CUDA-graph decode steps equal eager steps (logits and greedy tokens) for
linear, hybrid and softmax stacks; `generate` with the graph step equals eager `generate`; the decode benchmark runs
with graphs and a linear stack's state does not grow with the context; a long prefill builds no [T, V] logits."""

from __future__ import annotations

import pytest
import torch

from linear_moe.generate import GenerationConfig, decode_step, generate, prefill
from linear_moe.generate.cuda_graph import CUDAGraphDecodeStep, benchmark_decode
from linear_moe.model import LinearMoEForCausalLM, get_preset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STACKS = [("gla", None), ("gated_deltanet", None), ("mamba2", None), ("gla", "LLLN"), ("attention", None)]


def model_of(mixer: str, pattern: str | None, dtype=torch.float32) -> LinearMoEForCausalLM:
    torch.manual_seed(0)
    cfg = get_preset("debug-qwen2-moe").replace(mixer=mixer, layer_pattern=pattern, num_layers=4, vocab_size=512)
    return LinearMoEForCausalLM(cfg).to("cuda", dtype).eval()


def clone(states):
    return [None if s is None else {k: t.clone() for k, t in s.items()} for s in states]


@pytest.mark.parametrize(("mixer", "pattern"), STACKS, ids=[f"{m}-{p or 'L'}" for m, p in STACKS])
@torch.no_grad()
def test_cuda_graph_steps_equal_eager_steps(mixer, pattern):
    model = model_of(mixer, pattern)
    prompts = [list(range(3, 40)), list(range(7, 20)), [5]]
    logits, states = prefill(model, prompts, max_seq_len=64)
    graph_step = CUDAGraphDecodeStep(model)
    eager_states, graph_states = clone(states), clone(states)
    tokens_e = tokens_g = logits.argmax(-1)
    for _ in range(8):
        logits_e, eager_states = decode_step(model, tokens_e, eager_states)
        logits_g, graph_states = graph_step(tokens_g, graph_states)
        torch.testing.assert_close(logits_g, logits_e, atol=2e-3, rtol=2e-3)
        tokens_e, tokens_g = logits_e.argmax(-1), logits_g.argmax(-1)
        assert torch.equal(tokens_e, tokens_g)


@torch.no_grad()
def test_generate_with_graph_step_equals_eager_generate():
    model = model_of("gla", "LLLN", torch.bfloat16)
    prompts = [list(range(3, 40)), list(range(7, 20))]
    cfg = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    eager, _ = generate(model, prompts, cfg)
    graphed, stats = generate(model, prompts, cfg, step=CUDAGraphDecodeStep(model))
    assert [g.ids for g in graphed] == [g.ids for g in eager]
    assert stats.peak_bytes > 0


def test_decode_benchmark_with_graphs_keeps_a_linear_state_flat():
    model = model_of("gla", None, torch.bfloat16)
    rows = benchmark_decode(model, batch=4, contexts=[256, 4096], steps=5, warmup=2)
    assert all("error" not in r and r["ms_per_token"] > 0 for r in rows)
    assert rows[0]["state_MiB"] == rows[1]["state_MiB"]
    hybrid = benchmark_decode(model_of("gla", "LLLN", torch.bfloat16), 4, [256, 4096], steps=5, warmup=2)
    assert hybrid[1]["state_MiB"] > hybrid[0]["state_MiB"]  # the softmax layer's KV cache grows with the context


def _peak_bytes(fn) -> int:
    """Peak CUDA memory that `fn()` allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@torch.no_grad()
def test_long_prefill_builds_no_full_logits():
    """A 4096-token prompt, 32k vocabulary: a 2048-token chunk's float32 logits are 250 MiB; prefill (logits_to_keep
    of the last position) stays far below that, while a plain forward of one chunk does build them."""
    torch.manual_seed(0)
    cfg = get_preset("debug-dense").replace(mixer="gla", vocab_size=32000)
    model = LinearMoEForCausalLM(cfg).to("cuda").eval()
    prompt = torch.randint(0, cfg.vocab_size, (4096,)).tolist()
    chunk_logits = 2048 * cfg.vocab_size * 4
    prefill(model, [prompt], max_seq_len=4096, chunk=2048)  # warm-up: kernels compiled, cuBLAS workspaces allocated
    assert _peak_bytes(lambda: prefill(model, [prompt], max_seq_len=4096, chunk=2048)) < chunk_logits / 8
    ids = torch.tensor([prompt[:2048]], device="cuda")
    assert _peak_bytes(lambda: model(ids)) >= chunk_logits  # the measure sees full logits when they are built
