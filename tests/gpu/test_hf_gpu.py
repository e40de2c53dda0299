"""Hugging Face interop on CUDA (fla's kernels): an exported hybrid model loaded with transformers gives our logits
and generates our greedy tokens (its cache holds fla's recurrent states); a linearised Qwen2-MoE with
`mixer=attention` gives transformers' logits on the GPU too."""

from __future__ import annotations

import pytest
import torch

from linear_moe.generate.engine import GenerationConfig, generate
from linear_moe.hf import linearise, model_config_from_hf, save_hf
from linear_moe.model import LinearMoEForCausalLM, ModelConfig, get_preset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("mixer", ["gated_deltanet", "gla", "rwkv7"])
def test_export_loads_and_generates_on_cuda(tmp_path, mixer):
    cfg = get_preset("debug-qwen2-moe").replace(mixer=mixer, layer_pattern="LN", num_layers=2, vocab_size=320)
    torch.manual_seed(0)
    ours = LinearMoEForCausalLM(cfg).eval()
    out = save_hf(ours, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).cuda()
    ours = ours.cuda()
    ids = torch.randint(0, 320, (2, 40), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    greedy = hf.generate(ids[:1], max_new_tokens=12, do_sample=False, eos_token_id=None)
    gens, _ = generate(ours, [ids[0].tolist()], GenerationConfig(max_new_tokens=12, stop_at_eos=False))
    assert greedy[0, 40:].tolist() == gens[0].ids


def test_linearised_qwen2_moe_equals_transformers_on_cuda(tmp_path):
    config = transformers.Qwen2MoeConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "qwen")
    ours = LinearMoEForCausalLM(model_config_from_hf(tmp_path / "qwen", ModelConfig(max_seq_len=128))).eval()
    linearise(ours, tmp_path / "qwen")
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours.cuda()(ids).logits, hf.cuda()(ids).logits, atol=1e-4, rtol=1e-4)
