"""linear_moe.generate on CPU: chunked, packed prefill + recurrent decoding equals full forwards for every mixer and a
hybrid stack; batched prompts equal one-at-a-time generation; constant state size; sampling filters against brute
force; streaming and stop strings; `linear-moe generate` end to end and its one-line errors."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from linear_moe.cli import main
from linear_moe.data import Tokenizer
from linear_moe.generate import (
    GenerationConfig,
    SamplingParams,
    TextStream,
    decode_step,
    generate,
    load_model,
    prefill,
    sample_next,
    state_bytes,
    state_shapes,
)
from linear_moe.generate.sampling import apply_repetition_penalty, filter_top_k_top_p
from linear_moe.mixers import MIXERS
from linear_moe.model import LinearMoEForCausalLM, ModelConfig
from tiny_checkpoint import TEXT, make_checkpoint

V = 53
STACKS = [pytest.param(name, None, id=name) for name in MIXERS] + [pytest.param("gla", "LLLN", id="hybrid-LLLN")]


def tiny_model(mixer: str, layer_pattern: str | None = None, seed: int = 0) -> LinearMoEForCausalLM:
    """Two layers (four for a pattern), float64, weights perturbed so gates and zero-initialised projections matter."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=32,
        num_layers=4 if layer_pattern else 2,
        num_heads=2,
        mixer=mixer,
        layer_pattern=layer_pattern,
        ffn_hidden_size=48,
    )
    model = LinearMoEForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits after `ids` from one forward over the whole sequence (no states)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize(("mixer", "pattern"), STACKS)
@torch.no_grad()
def test_every_decode_step_equals_full_forward(mixer, pattern):
    """Prompts of 3, 9 and 5 tokens prefilled together in chunks of 4 (rows drop out of later chunks), then greedy
    decoding from the states: each step's logits equal a full forward of that row alone, and no state grows."""
    model = tiny_model(mixer, pattern)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 9, 5)]
    logits_NV, states = prefill(model, prompts, max_seq_len=16, chunk=4)
    shapes, nbytes = state_shapes(states), state_bytes(states)
    seqs = [list(p) for p in prompts]
    for _ in range(2):
        for n, seq in enumerate(seqs):
            torch.testing.assert_close(logits_NV[n], full_logits(model, seq), atol=1e-9, rtol=1e-7)
        tokens_N = logits_NV.argmax(-1)
        for seq, t in zip(seqs, tokens_N.tolist(), strict=True):
            seq.append(t)
        logits_NV, states = decode_step(model, tokens_N, states)
        assert state_shapes(states) == shapes and state_bytes(states) == nbytes


@pytest.mark.parametrize("mixer", ["gla", "rwkv7"])
@torch.no_grad()
def test_linear_state_size_does_not_depend_on_context_length(mixer):
    model = tiny_model(mixer)
    short = prefill(model, [[1, 2]], max_seq_len=4)[1]
    long = prefill(model, [list(range(20))], max_seq_len=300)[1]
    assert state_shapes(short) == state_shapes(long) and state_bytes(short) == state_bytes(long) > 0


@torch.no_grad()
def test_attention_cache_is_preallocated_written_in_place_and_equals_no_state():
    from linear_moe.mixers import build_mixer

    torch.manual_seed(0)
    m = build_mixer("attention", 32, 4, num_kv_heads=2).double().eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    y_ref, _ = m(x)
    empty = m.init_state(2, max_seq_len=10)
    assert empty["k"].shape == (2, 2, 10, 8) and not empty["valid"].any()
    y_pre, state = m(x[:, :5], state=empty)
    pointers = [t.data_ptr() for t in state.values()]
    ys = [y_pre]
    for t in range(5, 7):  # decoding writes into the same preallocated tensors
        y_t, state = m(x[:, t : t + 1], state=state)
        ys.append(y_t)
        assert [t.data_ptr() for t in state.values()] == pointers
    torch.testing.assert_close(torch.cat(ys, 1), y_ref, atol=1e-12, rtol=1e-10)
    assert state["valid"].sum(-1).tolist() == [7, 7]
    with pytest.raises(ValueError, match="max_seq_len"):
        m.init_state(2)
    with pytest.raises(ValueError, match=r"state\['k'\] has shape"):
        m(x, state=m.init_state(3, max_seq_len=10))


def test_prompt_longer_than_the_kv_cache_is_a_one_line_error():
    model = tiny_model("gla", "LLLN")
    with pytest.raises(ValueError, match="does not fit the 8-token KV cache"):
        generate(model, [list(range(6))], GenerationConfig(max_new_tokens=4, max_seq_len=8))
    gens, _ = generate(tiny_model("gla"), [list(range(6))], GenerationConfig(max_new_tokens=4, max_seq_len=8))
    assert len(gens[0].ids) == 4  # a pure linear stack has no cache to overflow


def test_decode_benchmark_state_is_flat_for_linear_and_grows_for_softmax():
    from linear_moe.generate.cuda_graph import benchmark_decode

    linear = benchmark_decode(tiny_model("gla"), 2, [4, 20], steps=1, warmup=0)
    hybrid = benchmark_decode(tiny_model("gla", "LLLN"), 2, [4, 20], steps=1, warmup=0)
    assert linear[0]["state_MiB"] == linear[1]["state_MiB"] and hybrid[1]["state_MiB"] > hybrid[0]["state_MiB"]


def greedy_by_full_forwards(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(full_logits(model, seq).argmax()))
    return seq[len(prompt) :]


def test_generate_greedy_equals_repeated_full_forwards_and_batch_equals_single():
    model = tiny_model("gla", "LLLN", seed=3)
    prompts = [[5, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]
    cfg = GenerationConfig(max_new_tokens=4, prefill_chunk=4)
    batched, stats = generate(model, prompts, cfg)
    for prompt, gen in zip(prompts, batched, strict=True):
        assert gen.ids == greedy_by_full_forwards(model, prompt, 4) and gen.finish_reason == "length"
        (alone,), _ = generate(model, [prompt], cfg)
        assert alone.ids == gen.ids
    assert stats.new_tokens == 12 and stats.prompt_tokens == 14 and stats.batch_size == 3
    assert "tokens/s" in stats.line() and "MiB per sequence" in stats.line()


def test_eos_ends_a_row_and_the_others_go_on():
    model = tiny_model("gla")
    prompts = [[5, 7, 11], [1, 2, 3, 4]]
    first = int(full_logits(model, prompts[0]).argmax())
    gens, _ = generate(model, prompts, GenerationConfig(max_new_tokens=3), eos_id=first)
    assert gens[0].ids == [] and gens[0].finish_reason == "eos"
    expected = greedy_by_full_forwards(model, prompts[1], 3)
    cut = expected.index(first) if first in expected else 3
    assert gens[1].ids == expected[:cut]


# ---------------------------------------------------------------- sampling


def brute_force_filter(logits_V: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """The allowed set, one token at a time: in the top k, and fewer than p probability strictly above it."""
    probs = logits_V.softmax(-1)
    allowed = torch.zeros_like(logits_V, dtype=torch.bool)
    for i in range(len(logits_V)):
        rank = int((logits_V > logits_V[i]).sum())
        above = float(probs[logits_V > logits_V[i]].sum())
        allowed[i] = (k == 0 or rank < k) and (above < p or rank == 0)
    return allowed


def test_top_k_top_p_filter_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    logits_BV = torch.randn(4, 30, generator=g, dtype=torch.float64) * 2
    ks, ps = [0, 5, 1, 12], [0.9, 1.0, 0.5, 0.3]
    out = filter_top_k_top_p(logits_BV, torch.tensor(ks)[:, None], torch.tensor(ps, dtype=torch.float64)[:, None])
    for b in range(4):
        allowed = brute_force_filter(logits_BV[b], ks[b], ps[b])
        assert torch.equal(out[b].isfinite(), allowed)
        torch.testing.assert_close(out[b][allowed], logits_BV[b][allowed])


def test_repetition_penalty_and_sampled_tokens_stay_in_the_allowed_set():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    g = torch.Generator().manual_seed(0)
    logits_BV = torch.randn(64, 50, generator=g)
    params = [SamplingParams(temperature=1.5, top_k=3)] * 32 + [SamplingParams(temperature=0.0)] * 32
    tokens = sample_next(logits_BV, params, generator=g)
    top3 = logits_BV.topk(3).indices
    assert all(int(tokens[b]) in top3[b].tolist() for b in range(32))
    assert torch.equal(tokens[32:], logits_BV[32:].argmax(-1))
    again = sample_next(logits_BV, params, generator=torch.Generator().manual_seed(0).manual_seed(0))
    assert again.shape == tokens.shape


def test_bad_sampling_settings_are_value_errors():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ---------------------------------------------------------------- text, stop strings, streaming


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=300)


def test_text_stream_emits_final_text_and_stops_before_a_stop_string(tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    stream = TextStream(tok, stop=["lazy"])
    pieces = []
    for i in ids:
        pieces.append(stream.push(i))
        assert not "".join(pieces).endswith("la")  # a possible start of "lazy" is held back
        if stream.stopped:
            break
    assert "".join(pieces) + stream.flush() == "The quick brown fox jumps over the " and stream.stopped
    plain = TextStream(tok)
    assert "".join(plain.push(i) for i in ids) + plain.flush() == text


def test_generate_stop_string_cuts_the_text(tok):
    model = tiny_model("gla")
    model = LinearMoEForCausalLM(model.cfg.replace(vocab_size=tok.vocab_size)).double().eval()
    prompt = [tok.encode("The quick")]
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    (free,), _ = generate(model, prompt, cfg, tok)
    stop = free.text[4:6]
    streamed = []
    (cut,), _ = generate(
        model,
        prompt,
        GenerationConfig(max_new_tokens=12, stop=(stop,), stop_at_eos=False),
        tok,
        on_text=lambda n, t: streamed.append(t),
    )
    assert cut.text == free.text[: free.text.index(stop)] == "".join(streamed) and cut.finish_reason == "stop"


# ---------------------------------------------------------------- CLI and bad input


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run"), mixer="gla", layer_pattern="LN")


def run_cli(args: list[str], monkeypatch, capsys, stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_streams_the_same_text_as_generate(checkpoint, monkeypatch, capsys):
    loaded = load_model(checkpoint)
    cfg = GenerationConfig(max_new_tokens=10, stop_at_eos=False)
    (gen,), _ = generate(loaded.model, [loaded.tokenizer.encode("The quick")], cfg, loaded.tokenizer)
    args = ["generate", str(checkpoint.parent.parent), "--max-new-tokens", "10", "--temperature", "0", "--no-eos"]
    code, out, err = run_cli([*args, "--prompt", "The quick"], monkeypatch, capsys)
    assert code == 0 and out == "The quick" + gen.text + "\n"
    assert "tokens/s" in err and "MiB per sequence" in err
    code, out, _ = run_cli(args, monkeypatch, capsys, stdin="The quick")  # prompt from stdin
    assert code == 0 and out == "The quick" + gen.text + "\n"


def test_cli_prompts_file_runs_one_batch(checkpoint, tmp_path, monkeypatch, capsys):
    loaded = load_model(checkpoint)
    prompts = ["The quick", "A linear model mixes", "Experts"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    gens, _ = generate(loaded.model, [loaded.tokenizer.encode(p) for p in prompts], cfg, loaded.tokenizer)
    code, out, _ = run_cli(
        ["generate", str(checkpoint), "--prompts-file", str(tmp_path / "p.txt"), "--max-new-tokens", "6", "--no-eos"]
        + ["--temperature", "0"],
        monkeypatch,
        capsys,
    )
    assert code == 0
    expected = [f"[{i}] {p}{g.text}" for i, (p, g) in enumerate(zip(prompts, gens, strict=True))]
    assert out == "\n\n".join(expected) + "\n"


def test_cli_bad_inputs_are_one_line_errors(checkpoint, tmp_path, monkeypatch, capsys):
    other = Tokenizer.train([TEXT], vocab_size=400)  # 374 tokens: more than the model's 300 rows
    other.save(tmp_path / "other.json")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    cases = [
        (["generate", str(tmp_path / "hf"), "--prompt", "x"], "is not a Linear-MoE checkpoint"),
        (["generate", str(tmp_path / "nope"), "--prompt", "x"], "no such directory"),
        (["generate", str(checkpoint), "--prompt", "x", "--tokenizer", str(tmp_path / "other.json")], "vocabulary"),
        (["generate", str(checkpoint), "--prompt", TEXT[:200], "--max-seq-len", "16"], "does not fit"),
        (["generate", str(checkpoint), "--prompt", "x", "--top-p", "0"], "top_p"),
    ]
    for args, match in cases:
        code, _, err = run_cli(args, monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and match in lines[-1], err
        assert "Traceback" not in err


def test_a_tokenizer_smaller_than_the_vocabulary_never_samples_rows_without_a_token(checkpoint):
    """A padded vocabulary (more rows than tokens, as Qwen's): generation loads and samples only known ids."""
    small = Tokenizer.train([TEXT], vocab_size=280)
    loaded = load_model(checkpoint, device="cpu")
    assert small.vocab_size < loaded.config.vocab_size
    with torch.no_grad():  # make the rows without a token the likeliest ones: unmasked, they would be sampled
        loaded.model.lm_head.weight[small.vocab_size :] *= 100
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False, sampling=SamplingParams(temperature=5.0), seed=3)
    out, _ = generate(loaded.model, [small.encode("The quick")], cfg, tokenizer=small)
    assert len(out[0].ids) == 12 and max(out[0].ids) < small.vocab_size
