"""On CUDA (fla's kernels, pinned host memory): checkpointed blocks with chunked expert recomputation and the
activations offloaded to the host give the plain step's loss and gradients."""

import pytest
import torch

from linear_moe.model.lm import LinearMoEForCausalLM
from linear_moe.model.presets import get_preset
from linear_moe.parallel import StepOptions, apply_step_options

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _step(options: StepOptions | None, mixer: str):
    torch.manual_seed(0)
    cfg = get_preset("debug-qwen2-moe").replace(mixer=mixer, layer_pattern="LN")
    model = LinearMoEForCausalLM(cfg).cuda()
    if options is not None:
        apply_step_options(model, options)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids.roll(-1, 1))
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mixer", ["gla", "gated_deltanet"])
def test_checkpointing_chunks_and_offload_keep_the_step(mixer):
    options = StepOptions(activation_checkpointing=True, expert_chunk=100, offload_activations=True)
    loss, grads = _step(options, mixer)
    want_loss, want_grads = _step(None, mixer)
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=1e-3)
    for name, g in grads.items():
        w = want_grads[name]
        assert (g - w).norm() <= 2e-2 * w.norm() + 1e-6, name
