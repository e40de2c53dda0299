"""The step options that trade memory for time keep the model's losses and gradients: chunked expert recomputation
(alone and inside checkpointed blocks), and the host-memory offload of saved activations."""

import pytest
import torch

from linear_moe.model.lm import LinearMoEForCausalLM
from linear_moe.model.presets import get_preset
from linear_moe.moe import MoELayer
from linear_moe.parallel import StepOptions, apply_step_options


def _loss_and_grads(options: StepOptions | None, ids, labels):
    torch.manual_seed(0)
    cfg = get_preset("debug-qwen2-moe").replace(mixer="gla", layer_pattern="LN")
    model = LinearMoEForCausalLM(cfg).double()
    if options is not None:
        apply_step_options(model, options)
    out = model(ids, labels=labels)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), out.expert_load, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "options",
    [
        StepOptions(expert_chunk=5),
        StepOptions(activation_checkpointing=True, expert_chunk=16),
        StepOptions(activation_checkpointing=True, offload_activations=True),
        StepOptions(activation_checkpointing=True, expert_chunk=7, offload_activations=True),
    ],
    ids=["chunk", "ac+chunk", "ac+offload", "ac+chunk+offload"],
)
def test_memory_options_keep_loss_load_and_gradients(options):
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (2, 37))  # 74 tokens: chunks of 5, 16 and 7 leave a shorter last chunk
    labels = torch.randint(0, 512, (2, 37))
    loss, load, grads = _loss_and_grads(options, ids, labels)
    want_loss, want_load, want_grads = _loss_and_grads(None, ids, labels)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(load, want_load)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], msg=name)


def test_chunked_experts_keep_only_the_chunk_inputs_for_backward():
    # what autograd keeps for backward of the chunked experts: the router's tensors and each chunk's input view,
    # none of the [tokens * k, 2F] expert activations that the plain layer keeps
    cfg = get_preset("debug-qwen2-moe").moe
    layer = MoELayer(cfg, 64)
    x = torch.randn(1, 96, 64, requires_grad=True)

    def saved_numel(chunk):
        layer.recompute_chunk = chunk
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layer(x)
        return sum(sizes)

    rows = 96 * cfg.top_k
    plain = saved_numel(None)
    for chunk in (32, 96, 4096):  # several chunks, one exact chunk, one chunk longer than the tokens
        assert plain - saved_numel(chunk) >= rows * 2 * cfg.expert_ffn_hidden_size, chunk  # gate|up output gone


def test_negative_expert_chunk_is_a_one_line_error():
    model = LinearMoEForCausalLM(get_preset("debug-mixtral"))
    with pytest.raises(ValueError, match="expert_chunk must be >= 0"):
        apply_step_options(model, StepOptions(expert_chunk=-1))
