"""`ops/split.py` with fla's kernels on CUDA: chunk_gla / chunk_simple_gla through pieces run side by side against
the unsplit op (fla's kernel over the whole row, or over the packed documents with `cu_seqlens`) on the same bf16
inputs: outputs, final states and the gradients of every input; and the GLA layer with `seq_split` against the same
layer without it, under bf16 autocast, on rows and on packed documents.

Decays are weak (about -0.004 per token), so a piece's start state carries most of the earlier pieces: a wrong
combine shows as an O(1) error. Errors are relative (||a - b|| / ||b||); tolerances as tests/gpu/test_ops_gla_gpu.py.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

from linear_moe.mixers import build_mixer
from linear_moe.ops import gla, simple_gla, split
from linear_moe.ops._dispatch import use_fla

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

B, H, K, V = 2, 4, 64, 64
TOL_OUT, TOL_GRAD = 1e-2, 2e-2
BF16 = torch.bfloat16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def leaves(family: str, t: int, b: int = B, n: int = B) -> dict[str, torch.Tensor]:
    """Inputs of `[b, t]` tokens with `n` initial-state rows."""
    x = {
        "q": torch.randn(b, t, H, K, device="cuda", dtype=BF16),
        "k": torch.randn(b, t, H, K, device="cuda", dtype=BF16),
        "v": torch.randn(b, t, H, V, device="cuda", dtype=BF16),
        "initial_state": torch.randn(n, H, K, V, device="cuda"),
    }
    if family == "gla":
        x["g"] = -0.008 * torch.rand(b, t, H, K, device="cuda")
    if family == "simple_gla":
        x["g"] = -0.008 * torch.rand(b, t, H, device="cuda")  # float32 as Mamba2 makes it
    return {n: v.requires_grad_() for n, v in x.items()}


def run(fn, x: dict[str, torch.Tensor], extra: dict, grads_out: list[torch.Tensor], **kw):
    o, s = fn(**x, **extra, output_final_state=True, **kw)
    ((o.float() * grads_out[0]).sum() + (s.float() * grads_out[1]).sum()).backward()
    return o, s, {n: t.grad for n, t in x.items()}


OPS = {
    "gla": (gla.chunk_gla, split.chunk_gla_split),
    "simple_gla": (simple_gla.chunk_simple_gla, split.chunk_simple_gla_split),
    "simple_gla-g_gamma": (simple_gla.chunk_simple_gla, split.chunk_simple_gla_split),
}


def compare(family: str, local: str, base: dict, extra: dict, piece_len: int) -> None:
    """The split op against the unsplit one on copies of `base` (plus `extra`: g_gamma, cu_seqlens)."""
    whole, pieces = OPS[family]
    q, s0 = base["q"], base["initial_state"]
    grads_out = [torch.randn(*q.shape[:3], V, device="cuda"), torch.randn(s0.shape, device="cuda")]
    x_whole = {n: v.detach().clone().requires_grad_() for n, v in base.items()}
    x_split = {n: v.detach().clone().requires_grad_() for n, v in base.items()}
    o, s, grads = run(whole, x_whole, extra, grads_out)
    o_split, s_split, grads_split = run(pieces, x_split, extra, grads_out, piece_len=piece_len, local=local)

    errors = {"o": rel_err(o_split, o), "state": rel_err(s_split, s)}
    bad = {n: e for n, e in errors.items() if not e < TOL_OUT}
    for name, g in grads.items():
        assert grads_split[name] is not None, f"the split run gave no gradient for {name}"
        e = rel_err(grads_split[name], g)
        errors[f"d{name}"] = e
        if not e < TOL_GRAD or math.isnan(e):
            bad[f"d{name}"] = e
    assert not bad, f"{family} local={local}: relative errors over tolerance {bad} (all: {errors})"


def g_gamma(family: str) -> dict[str, torch.Tensor]:
    # RetNet's decays 1 - 2^(-5 - h) are too strong to carry a state over a piece; fla gives g_gamma no gradient
    return {"g_gamma": -0.004 * torch.arange(1, H + 1, device="cuda")} if family.endswith("g_gamma") else {}


@pytest.mark.parametrize("t,piece_len", [(1024, 256), (1000, 256)], ids=["T1024-L256", "T1000-L256-remainder"])
@pytest.mark.parametrize("local", split.LOCAL)
@pytest.mark.parametrize("family", list(OPS))
def test_split_matches_unsplit_fla_kernel(family, local, t, piece_len):
    torch.manual_seed(0)
    base = leaves(family, t)
    if not use_fla(base["q"]):
        pytest.skip("fla is not installed (or LINEAR_MOE_KERNELS=torch)")
    compare(family, local, base, g_gamma(family), piece_len)


# packed documents, pieces of 256: 100 and 37 tokens run whole, 1000 -> 4 pieces (the last 232), 600 -> 3 (88),
# 300 -> 2 (44), 512 -> 2 full pieces
DOC_LENS = [100, 1000, 37, 600, 300, 512]


@pytest.mark.parametrize("local", split.LOCAL)
@pytest.mark.parametrize("family", list(OPS))
def test_packed_split_matches_unsplit_fla_kernel(family, local):
    torch.manual_seed(0)
    base = leaves(family, sum(DOC_LENS), b=1, n=len(DOC_LENS))
    if not use_fla(base["q"]):
        pytest.skip("fla is not installed (or LINEAR_MOE_KERNELS=torch)")
    cu = torch.tensor([0, *DOC_LENS], device="cuda").cumsum(0).to(torch.int32)  # int32 like the data pipeline
    compare(family, local, base, {**g_gamma(family), "cu_seqlens": cu}, 256)


@pytest.mark.parametrize("packed", [False, True], ids=["row", "packed"])
@pytest.mark.parametrize("local", split.LOCAL)
def test_gla_layer_seq_split_matches_unsplit(local, packed):
    torch.manual_seed(0)
    cu = torch.tensor([0, 100, 700, 737, 1000], device="cuda", dtype=torch.int32) if packed else None
    m = build_mixer("gla", 512, 4, seq_split=256, seq_split_local=local).cuda().train()
    if not use_fla(next(m.parameters())):
        pytest.skip("fla is not installed (or LINEAR_MOE_KERNELS=torch)")
    with torch.no_grad():  # log decays about logsigmoid(5) / 16 = -4e-4 per token: the state crosses the pieces
        m.gk_proj[1].bias.fill_(5.0)
    plain = copy.deepcopy(m)
    plain.seq_split = 0
    x = torch.randn(1, 1000, 512, device="cuda")
    dy = torch.randn(1, 1000, 512, device="cuda")
    outs = []
    for layer in (plain, m):
        with torch.autocast("cuda", dtype=BF16):
            y, _ = layer(x, cu_seqlens=cu)
        (y.float() * dy).sum().backward()
        outs.append((y, {n: p.grad for n, p in layer.named_parameters()}))
    (y0, g0), (y1, g1) = outs
    assert rel_err(y1, y0) < TOL_OUT
    bad = {n: rel_err(g1[n], g) for n, g in g0.items() if not rel_err(g1[n], g) < TOL_GRAD}
    assert not bad, f"parameter gradients over tolerance: {bad}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
