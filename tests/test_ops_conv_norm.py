"""`ops.conv.causal_conv1d`, `ops.norm.rms_norm_gated` and `ops.activations.swiglu` (PyTorch path) against
hand-written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.layers.conv import ShortConvolution
from linear_moe.ops.activations import swiglu
from linear_moe.ops.conv import causal_conv1d
from linear_moe.ops.norm import rms_norm_gated

F64 = torch.float64


def conv_reference(x_TD, w_DW, bias_D, silu):
    """y[t] = sum_j w[:, j] * x[t - W + 1 + j] (zeros before t = 0), token by token."""
    T, D = x_TD.shape
    W = w_DW.shape[1]
    y = torch.zeros_like(x_TD)
    for t in range(T):
        for j in range(W):
            s = t - W + 1 + j
            if s >= 0:
                y[t] += w_DW[:, j] * x_TD[s]
    if bias_D is not None:
        y = y + bias_D
    return F.silu(y) if silu else y


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_causal_conv1d_matches_token_loop(silu, bias):
    torch.manual_seed(0)
    B, T, D, W = 2, 9, 5, 4
    x, w = torch.randn(B, T, D, dtype=F64), torch.randn(D, W, dtype=F64)
    b = torch.randn(D, dtype=F64) if bias else None
    y = causal_conv1d(x, w, b, "silu" if silu else None)
    for i in range(B):
        torch.testing.assert_close(y[i], conv_reference(x[i], w, b, silu))


def test_causal_conv1d_packed_documents_do_not_mix():
    torch.manual_seed(1)
    D, W, lens = 3, 4, [2, 6, 1, 5]
    x, w = torch.randn(1, sum(lens), D, dtype=F64), torch.randn(D, W, dtype=F64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    y = causal_conv1d(x, w, None, "silu", cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        torch.testing.assert_close(y[0, s:e], conv_reference(x[0, s:e], w, None, True))


def test_short_convolution_final_state_only_when_asked():
    torch.manual_seed(2)
    conv = ShortConvolution(6, 4).double()
    x = torch.randn(2, 7, 6, dtype=F64)
    y, state = conv(x)
    y2, none = conv(x, output_final_state=False)
    torch.testing.assert_close(y, y2)
    assert none is None
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


def test_causal_conv1d_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"weight \[D, W\]"):
        causal_conv1d(torch.randn(1, 4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.randn(1, 4, 3), torch.randn(3, 4), activation="gelu")


@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
def test_rms_norm_gated_matches_formula(activation):
    torch.manual_seed(3)
    x, g, w = torch.randn(3, 4, 8, dtype=F64), torch.randn(3, 4, 8, dtype=F64), torch.randn(8, dtype=F64)
    eps = 1e-5
    act = g * torch.sigmoid(g) if activation == "swish" else torch.sigmoid(g)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w * act
    torch.testing.assert_close(rms_norm_gated(x, g, w, eps, activation), want)


def test_rms_norm_gated_keeps_input_dtype_and_checks_shapes():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert rms_norm_gated(x, torch.randn(2, 8), torch.ones(8)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="one shape"):
        rms_norm_gated(x, torch.randn(2, 4), torch.ones(8))


def test_swiglu_matches_formula_and_checks_shapes():
    gate, up = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    torch.testing.assert_close(swiglu(gate, up), gate / (1 + torch.exp(-gate)) * up)
    with pytest.raises(ValueError, match="one shape"):
        swiglu(gate, up[:, :3])
