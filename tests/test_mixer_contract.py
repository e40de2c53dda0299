"""The mixer contract (mixers/base.py): declared state shapes, zero states equal to no state, the per-forward
context, and a mixer defined outside the package that plugs into the model with one registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linear_moe.mixers import MIXERS, Mixer, MixerContext, MixerState, StateSpec, build_mixer
from linear_moe.mixers.base import Tensor
from linear_moe.model import LinearMoEForCausalLM, ModelConfig

D, H, T = 32, 4, 11
RECURRENT = [n for n in MIXERS if n != "attention"]  # softmax attention's cache: tests/test_generate.py


def build(name: str, layer_idx: int = 1, **opts) -> Mixer:
    torch.manual_seed(0)
    m = build_mixer(name, D, H, layer_idx=layer_idx, num_layers=3, **opts).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


OPTIONAL_CONV = ["retnet", "gla", "lightning_attn", "based", "rebased", "linear_attn", "hgrn", "hgrn2"]
CASES = [(n, {}) for n in RECURRENT] + [(n, {"use_short_conv": True}) for n in OPTIONAL_CONV]


@pytest.mark.parametrize(("name", "opts"), CASES, ids=[f"{n}-{'conv' if o else 'plain'}" for n, o in CASES])
def test_zero_state_from_spec_equals_no_state(name, opts):
    m = build(name, **opts)
    x = torch.randn(2, T, D, dtype=torch.float64)
    state = m.init_state(2)
    spec = m.state_spec()
    assert set(state) == set(spec)
    for key, s in spec.items():
        assert tuple(state[key].shape) == (2, *s.shape), key
        assert not state[key].any()
    y_ref, s_ref = m(x, use_cache=True)
    y, s = m(x, state=state)
    torch.testing.assert_close(y, y_ref)
    assert set(s) == set(spec)
    for key in spec:  # the state a forward returns has the declared shape
        assert tuple(s[key].shape) == (2, *spec[key].shape), key
        torch.testing.assert_close(s[key].to(s_ref[key].dtype), s_ref[key])


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "hgrn"])
def test_state_with_wrong_shape_is_a_one_line_error(name):
    m = build(name)
    state = m.init_state(2)
    key = next(iter(state))
    state[key] = state[key][:, :1]
    with pytest.raises(ValueError, match=rf"state\['{key}'\] has shape .* expected"):
        m(torch.randn(2, T, D, dtype=torch.float64), state=state)


def test_rwkv7_value_residual_travels_in_the_context():
    first, later = build("rwkv7", layer_idx=0), build("rwkv7", layer_idx=1)
    x = torch.randn(1, T, D, dtype=torch.float64)
    ctx = MixerContext()
    first(x, context=ctx)
    assert ctx.v_first is not None and set(ctx.tensors()) == {"v_first"}
    # the later layer reads it: a different v_first changes its output; no context = its own v
    y1 = later(x, context=ctx)[0]
    y2 = later(x, context=MixerContext(v_first=torch.zeros_like(ctx.v_first)))[0]
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(later(x)[0], later(x, context=MixerContext())[0])


class ToyEMA(Mixer):
    """Outside the package: y_t = o_proj(h_t), h_t = a * h_{t-1} + (1 - a) * v_proj(x_t) with a learned a."""

    def __init__(self, hidden_size: int, num_heads: int, layer_idx: int = 0, decay: float = 0.5):
        super().__init__()
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.logit = nn.Parameter(torch.full((hidden_size,), float(torch.logit(torch.tensor(decay)))))

    def state_spec(self) -> dict[str, StateSpec]:
        return {"h": StateSpec((self.hidden_size,))}

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        assert cu_seqlens is None, "toy mixer: no packing"
        a, v = torch.sigmoid(self.logit), self.v_proj(x)
        h = x.new_zeros(x.shape[0], self.hidden_size) if state is None else state["h"].to(x.dtype)
        ys = []
        for t in range(x.shape[1]):
            h = a * h + (1 - a) * v[:, t]
            ys.append(h)
        return self.o_proj(torch.stack(ys, 1)), {"h": h}

    def sequence_flops(self, seq_len: int) -> float:
        return 3.0 * self.hidden_size


@pytest.fixture
def toy_registered():
    MIXERS.register("toy_ema", ToyEMA)
    yield
    MIXERS.unregister("toy_ema")


def test_mixer_from_outside_the_package_trains_and_decodes(toy_registered):
    cfg = ModelConfig(
        vocab_size=64, hidden_size=D, num_layers=2, num_heads=H, mixer="toy_ema", layer_pattern="LN",
        ffn_hidden_size=48, mixer_kwargs={"decay": 0.8},
    )  # fmt: skip
    torch.manual_seed(0)
    model = LinearMoEForCausalLM(cfg)
    assert isinstance(model.layers[0].mixer, ToyEMA)
    torch.testing.assert_close(torch.sigmoid(model.layers[0].mixer.logit), torch.full((D,), 0.8))
    ids = torch.randint(0, 64, (2, 9))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "layers.0.mixer" in n)
    assert model(ids[:, :-1], labels=ids[:, 1:]).loss < loss  # one step of SGD lowers the loss on this batch
    # prefill + one-token steps equal one full forward, through the model's explicit states
    model.eval()
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, 9):
        out = model(ids[:, t : t + 1], states=out.states)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_registry_refuses_duplicates_and_non_mixers(toy_registered):
    with pytest.raises(ValueError, match="already registered"):
        MIXERS.register("toy_ema", ToyEMA)
    with pytest.raises(TypeError, match="Mixer subclass"):
        MIXERS.register("not_a_mixer", nn.Linear)
