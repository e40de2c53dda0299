"""Context parallelism through fla's kernels (`parallel.cp_backend`, parallel/cp.py) on CPU: the config switch, the
routing decision on real models, layouts and process groups, the ops refusing fla's `cp_context` off its CUDA
path, and every declared `Mixer.fla_cp_ops()` op receiving the context. fla itself cannot run here: its split is
checked against a transcription of fla 0.6.0's `_interval_cp_meta` (fla/ops/cp/context.py), and the numbers of the
fla path against one process on the GPU (tests/gpu/test_parallel_cp_fla_gpu.py)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dist_pool import dist_pool, tiny_model
from linear_moe.config import ConfigError, apply_overrides, from_dict, to_dict
from linear_moe.mixers import MIXERS, MixerContext
from linear_moe.mixers.attention import Attention
from linear_moe.model import ModelConfig
from linear_moe.ops import _dispatch
from linear_moe.parallel import cp as cp_mod
from linear_moe.parallel.config import ParallelConfig, check_layout
from linear_moe.parallel.cp import CPLayout, apply_cp, check_backend, cp_layout, fla_split_mismatch, shard_batch
from linear_moe.train.config import RunConfig

# ---------------------------------------------------------------- the config switch


def test_cp_backend_defaults_to_auto_and_round_trips():
    run = RunConfig()
    assert run.parallel.cp_backend == "auto"
    run = apply_overrides(run, ["parallel.cp=2", "parallel.cp_backend=fla"])
    assert run.parallel.cp_backend == "fla"
    assert from_dict(RunConfig, to_dict(run)).parallel == run.parallel


def test_unknown_cp_backend_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^config key 'parallel.cp_backend' must be one of auto, fla, own; got 'x'$"):
        apply_overrides(RunConfig(), ["parallel.cp_backend=x"])
    model = ModelConfig(512, 64, 2, 4)
    with pytest.raises(ConfigError, match=r"^parallel.cp_backend must be one of auto, fla, own, got 'zigzag'$"):
        check_layout(ParallelConfig(cp=2, cp_backend="zigzag"), 2, model, 64)


def test_fla_backend_off_cuda_or_with_other_mixers_is_a_one_line_error(monkeypatch):
    gdn, gla = (tiny_model(m).layers[0].mixer for m in ("gated_deltanet", "gla"))
    attention = tiny_model("gated_deltanet", "LN").layers[1].mixer
    with pytest.raises(
        ValueError, match=r"runs fla's CUDA kernels .* but the model is on cpu; use parallel.cp_backend"
    ):
        check_backend("fla", [gdn], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"unknown backend 'zigzag'; parallel.cp_backend is one of"):
        check_backend("zigzag", [gdn], torch.device("cpu"))
    for backend in ("auto", "own"):  # our exchange needs nothing from fla
        check_backend(backend, [gla], torch.device("cpu"))
    monkeypatch.setattr(cp_mod, "use_fla", lambda x: True)  # as on CUDA with fla
    check_backend("fla", [gdn, attention], torch.device("cpu"))  # softmax attention keeps its all-gathered KV
    with pytest.raises(ValueError, match=r"fla: GatedLinearAttention declares no ops that take fla's cp_context"):
        check_backend("fla", [gdn, gla], torch.device("cpu"))


# ---------------------------------------------------------------- fla's split against ours


def fla_interval_meta(cu: list[int], rank: int, size: int) -> tuple[list[int], int, int, bool]:
    """fla 0.6.0's contiguous split of rank `rank` (`_interval_cp_meta` in fla/ops/cp/context.py, transcribed):
    (local offsets, tokens of the first document before the slice, earlier ranks that document spans, whether
    this rank is its first)."""
    cu_t = torch.tensor(cu, dtype=torch.long)
    part_len = cu[-1] // size
    start, end = part_len * rank, part_len * (rank + 1)
    first = torch.searchsorted(cu_t[1:], start, side="right")
    last = torch.searchsorted(cu_t[:-1], end, side="left")
    local = (cu_t[first : last + 1].clamp(min=start, max=end) - start).unique_consecutive()
    first_start = int(cu_t[first])
    return local.tolist(), max(0, start - first_start), rank - first_start // part_len, rank == first_start // part_len


def random_offsets(g: torch.Generator, total: int, empty: bool) -> list[int]:
    cuts = torch.randint(1, total, (int(torch.randint(0, 6, (1,), generator=g)),), generator=g).tolist()
    cu = sorted({0, total, *cuts})
    if empty:  # a repeated offset: an empty document
        cu.insert(int(torch.randint(1, len(cu), (1,), generator=g)), cu[-2])
        cu.sort()
    return cu


@pytest.mark.parametrize("size", [2, 4])
def test_our_split_is_flas_without_empty_documents(size):
    """Local offsets, tokens before the slice, whether a document continues in, and how many ranks it spans: ours
    (CPLayout, as shard_batch cuts) equal fla's wherever `fla_split_mismatch` lets fla run; where it does not
    (empty documents), fla's local offsets really differ from ours for some rank."""
    g = torch.Generator().manual_seed(0)
    total = 12 * size
    differs = 0
    for trial in range(200):
        cu = random_offsets(g, total, empty=trial % 4 == 0)
        lays = [cp_layout(cu, total, 1, r, size) for r in range(size)]
        fla = [fla_interval_meta(cu, r, size) for r in range(size)]
        if fla_split_mismatch(lays[0]):
            assert len(set(cu)) < len(cu)
            differs += any(f[0] != lay.local_offsets() for f, lay in zip(fla, lays, strict=True))
            continue
        for r, (lay, (local, before, ranks, is_first)) in enumerate(zip(lays, fla, strict=True)):
            assert lay.local_offsets() == local
            assert lay.first_offset[r] == before
            assert lay.continues[r] == (not is_first)
            assert len(lay.chain(r)) == ranks
    assert differs > 0


def test_split_mismatch_reasons():
    assert fla_split_mismatch(cp_layout([0, 13, 40, 48], 48, 1, 0, 4)) == ""
    assert "one packed row" in fla_split_mismatch(cp_layout(None, 48, 2, 0, 2))  # unpacked [B, T] rows
    assert "empty documents" in fla_split_mismatch(cp_layout([0, 13, 13, 48], 48, 1, 0, 2))
    short = CPLayout(0, 2, 1, 24, [False] * 2, [True] * 2, [0] * 2, [0] * 2, [24] * 2, [0, 40])
    assert "not over the 48 tokens split" in fla_split_mismatch(short)


# ---------------------------------------------------------------- routing on 2 gloo ranks


def fake_build_cp_context(cu_seqlens, group, conv1d_kernel_size=None, cu_seqlens_cpu=None, **kwargs):
    """fla.ops.cp.build_cp_context for the routing tests: fla's contiguous split (transcribed) of this rank."""
    cu = cu_seqlens_cpu.tolist()
    local, before, ranks, is_first = fla_interval_meta(cu, dist.get_rank(group), dist.get_world_size(group))
    local_cpu = torch.tensor(local, dtype=torch.int32)
    return types.SimpleNamespace(
        group=group, cu_seqlens=local_cpu.to(cu_seqlens.device), cu_seqlens_cpu=local_cpu, is_first_rank=is_first,
        pre_num_ranks=ranks, pre_num_conv_tokens=before, conv1d_kernel_size=conv1d_kernel_size, built_from=cu,
    )  # fmt: skip


def route_job(backend: str) -> dict:
    """On 2 ranks, a hybrid model (gated_deltanet, gla, softmax attention) with fla "available" (cp's `use_fla`
    patched, a fake `fla.ops.cp`): the route each layer takes for a packed row, an unpacked batch and a row with an
    empty document, and how often the step's fla context was built."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    model = tiny_model("gated_deltanet", "LLN", layers=3)
    model.layers[1].mixer = tiny_model("gla").layers[0].mixer
    saved = cp_mod.use_fla, sys.modules.get("fla.ops.cp")
    builds = []

    def build(*args, **kwargs):
        builds.append(1)
        return fake_build_cp_context(*args, **kwargs)

    cp_mod.use_fla = lambda x: True
    sys.modules["fla.ops.cp"] = types.SimpleNamespace(build_cp_context=build)
    try:
        apply_cp(model, mesh, backend)
        cp = model.context_parallel
        out = {"conv_size": cp.conv_size}
        ids = torch.zeros(1, 48, dtype=torch.long)
        for name, cu in (("packed", [0, 13, 40, 48]), ("empty-doc", [0, 13, 13, 48])):
            _, _, lcu = shard_batch(model, ids, None, torch.tensor(cu, dtype=torch.int32))
            x = torch.zeros(1, 24, 64)
            out[name] = [route(block.mixer, cp, lcu.cp_layout, x, lcu) for block in model.layers]
            context = getattr(lcu, "fla_cp", None)
            if context is not None:  # what crosses the process boundary (the group does not pickle)
                out[name + "-context"] = (context.built_from, context.conv1d_kernel_size, context.cu_seqlens_cpu)
        lay = cp_layout(None, 48, 2, cp.rank, 2)  # unpacked: 2 whole rows
        out["unpacked"] = [route(block.mixer, cp, lay, torch.zeros(2, 24, 64), None) for block in model.layers]
        out["builds"] = len(builds)
    finally:
        cp_mod.use_fla = saved[0]
        if saved[1] is None:
            sys.modules.pop("fla.ops.cp")
        else:
            sys.modules["fla.ops.cp"] = saved[1]
    return out


def route(mixer, cp, lay, x, cu) -> str:
    if isinstance(mixer, Attention):
        return "attention"
    context, why = cp_mod.fla_route(mixer, cp, lay, x, cu)
    return "fla" if context is not None else why


def test_auto_routes_fla_capable_mixers_of_packed_rows_to_fla():
    for rank, out in enumerate(dist_pool(2).run(route_job, "auto")):
        assert out["conv_size"] == 4  # gated_deltanet's short convs (the widest window + 1)
        gla = "GatedLinearAttention declares no ops that take fla's cp_context (Mixer.fla_cp_ops)"
        assert out["packed"] == ["fla", gla, "attention"]
        built_from, conv_size, local = out["packed-context"]
        assert built_from == [0, 13, 40, 48] and conv_size == 4
        assert local.tolist() == ([0, 13, 24] if rank == 0 else [0, 16, 24])
        assert out["builds"] == 1  # once per step, kept on the local cu_seqlens
        for name, why in (("unpacked", "one packed row"), ("empty-doc", "empty documents")):
            assert why in out[name][0] and out[name][1:] == [gla, "attention"]
            assert out.get(name + "-context") is None


def test_a_split_unlike_ours_from_fla_is_an_error_not_a_fallback(monkeypatch):
    """Every rank must take the same path; a context whose offsets differ from ours would be one rank's surprise."""
    off = types.SimpleNamespace(cu_seqlens_cpu=torch.tensor([0, 5, 24]), pre_num_conv_tokens=0)
    monkeypatch.setitem(sys.modules, "fla.ops.cp", types.SimpleNamespace(build_cp_context=lambda *a, **k: off))
    lay = cp_layout([0, 13, 40, 48], 48, 1, 1, 2)
    cp = types.SimpleNamespace(group=None, conv_size=4)
    with pytest.raises(
        RuntimeError, match=r"fla splits this batch unlike cp_layout \(rank 1: .* ours \(\[0, 16, 24\], 11\)\)"
    ):
        cp_mod._fla_context(cp, lay, torch.device("cpu"))


def fla_forward_job(cu: list[int] | None) -> str:
    """backend=fla with fla "available": a batch fla cannot split raises a one-line error naming the fix."""
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    model = tiny_model("gated_deltanet")
    saved = cp_mod.use_fla
    cp_mod.use_fla = lambda x: True
    try:
        apply_cp(model, mesh, "fla")
        ids = torch.zeros(1 if cu else 2, 48, dtype=torch.long)
        lids, _, lcu = shard_batch(model, ids, None, None if cu is None else torch.tensor(cu))
        try:
            model(lids, cu_seqlens=lcu)
        except ValueError as e:
            return str(e)
        return "no error"
    finally:
        cp_mod.use_fla = saved


@pytest.mark.parametrize(("cu", "why"), [(None, "one packed row"), ([0, 30, 30, 48], "empty documents")])
def test_fla_backend_refuses_a_batch_fla_cannot_split(cu, why):
    for msg in dist_pool(2).run(fla_forward_job, cu):
        assert msg.startswith("context parallel: parallel.cp_backend=fla cannot run GatedDeltaNet here: ")
        assert why in msg and msg.endswith(
            "use parallel.cp_backend=auto (our state exchange where fla's cannot run) or own"
        )
        assert "\n" not in msg


# ---------------------------------------------------------------- the ops and the mixers with a cp_context

CP_OPS = {  # op -> inputs of one call (CPU, packed); every op whose dispatch takes fla's cp_context is here
    "causal_conv1d": lambda: dict(x=torch.randn(1, 10, 6), weight=torch.randn(6, 4), cu_seqlens=torch.tensor([0, 4, 10])),
    "chunk_gated_delta_rule": lambda: dict(
        q=torch.randn(1, 10, 2, 4), k=torch.randn(1, 10, 2, 4), v=torch.randn(1, 10, 2, 3),
        g=-torch.rand(1, 10, 2), beta=torch.rand(1, 10, 2), cu_seqlens=torch.tensor([0, 4, 10]),
    ),
    "chunk_rwkv7": lambda: dict(
        r=torch.randn(1, 10, 2, 4), w=-torch.rand(1, 10, 2, 4), k=torch.randn(1, 10, 2, 4), v=torch.randn(1, 10, 2, 3),
        a=torch.randn(1, 10, 2, 4), b=torch.randn(1, 10, 2, 4), cu_seqlens=torch.tensor([0, 4, 10]),
    ),
    "token_shift": lambda: dict(x=torch.randn(1, 10, 6), cu_seqlens=torch.tensor([0, 4, 10])),
}  # fmt: skip
CTX = object()  # stands for fla's FLACPContext: the ops only hand it on


def test_every_cp_call_of_the_dispatch_is_exercised():
    table = _dispatch.dispatch_table()
    assert {n for n, op in table.items() if any(c.cp for c in op.calls)} == set(CP_OPS)
    assert all(c.cp for n, op in table.items() for c in op.calls if c.cp_only)


@pytest.mark.parametrize("op", list(CP_OPS))
def test_cp_context_off_flas_cuda_path_is_a_one_line_error(op, monkeypatch):
    fn = _dispatch.OPS[op]
    with pytest.raises(ValueError, match=rf"^{op}: cp_context \(fla's context parallelism\) runs only fla's CUDA kernel, got a cpu tensor; use parallel.cp_backend=own \(our state exchange\)$"):  # fmt: skip
        fn(**CP_OPS[op](), cp_context=CTX)
    monkeypatch.setattr(_dispatch, "fla_available", lambda: True)
    monkeypatch.setenv("LINEAR_MOE_KERNELS", "torch")
    inputs = CP_OPS[op]()
    inputs[next(iter(inputs))] = types.SimpleNamespace(is_cuda=True)  # stands for a CUDA tensor
    with pytest.raises(ValueError, match=r"got LINEAR_MOE_KERNELS=torch; use parallel.cp_backend=own"):
        fn(**inputs, cp_context=CTX)


def test_ops_without_fla_context_parallelism_refuse_a_cp_context():
    q = torch.randn(1, 10, 2, 4)
    with pytest.raises(
        ValueError, match=r"^chunk_gla: fla's context parallelism \(cp_context\) does not cover this op"
    ):
        _dispatch.OPS["chunk_gla"](q, q, q, -torch.rand(1, 10, 2, 4), cp_context=CTX)


def record_fla_calls(monkeypatch) -> list[tuple[str, str, object]]:
    """fla "available", and every fla call replaced by our PyTorch op on the same arguments (one rank: the
    cp_context is recorded, not used); returns the (op, fla function, cp_context) of each call."""
    owner = {id(c): name for name, op in _dispatch.dispatch_table().items() for c in op.calls}
    calls = []

    def fake_call(self, a, cp_context=None):
        name = owner[id(self)]
        calls.append((name, self.name, cp_context))
        return _dispatch.OPS[name].torch(**{k: v for k, v in a.items() if k != "kwargs"}, **a.get("kwargs", {}))

    monkeypatch.setattr(_dispatch, "use_fla", lambda x: True)
    monkeypatch.setattr(_dispatch.FlaCall, "__call__", fake_call)
    return calls


@pytest.mark.parametrize("op", list(CP_OPS))
def test_cp_context_reaches_flas_context_parallel_kernel(op, monkeypatch):
    calls = record_fla_calls(monkeypatch)
    fn, inputs = _dispatch.OPS[op], CP_OPS[op]()
    fn(**inputs, cp_context=CTX)
    cp_call = next(c for c in fn.calls if c.cp)
    assert calls == [(op, cp_call.name, CTX)]
    calls.clear()
    fn(**inputs)  # without a context: the usual path (fla's plain kernel, or PyTorch for the token shift)
    assert all(c[2] is None for c in calls) and (calls == []) == all(c.cp_only for c in fn.calls)


def test_fla_context_parallel_token_shift_takes_no_state(monkeypatch):
    record_fla_calls(monkeypatch)
    x = torch.randn(1, 10, 6)
    with pytest.raises(ValueError, match=r"^token_shift: fla's context-parallel kernel does not take these arguments"):
        _dispatch.OPS["token_shift"](x, torch.zeros(2, 6), torch.tensor([0, 4, 10]), cp_context=CTX)


@pytest.mark.parametrize(
    ("mixer", "kwargs", "ops"),
    [
        ("gated_deltanet", {}, {"chunk_gated_delta_rule", "causal_conv1d"}),
        ("gated_deltanet", {"use_short_conv": False}, {"chunk_gated_delta_rule"}),
        ("rwkv7", {}, {"chunk_rwkv7", "token_shift"}),
    ],
)
def test_mixer_hands_the_cp_context_to_exactly_its_declared_ops(mixer, kwargs, ops, monkeypatch):
    """A mixer run with `context.cp_context` passes it to every op it declares in `fla_cp_ops()` and to no other;
    with fla's kernels standing in as one rank, the output is the plain run's. v_first still travels (RWKV-7)."""
    model = tiny_model(mixer, **kwargs)
    mix = model.layers[1].mixer
    assert set(mix.fla_cp_ops()) == ops
    x, cu = torch.randn(1, 20, 64), torch.tensor([0, 7, 20])
    v_first = torch.randn(1, 20, getattr(mix, "value_dim", 1))
    want, _ = mix(x, cu_seqlens=cu, context=MixerContext(v_first=v_first))
    calls = record_fla_calls(monkeypatch)
    got, _ = mix(x, cu_seqlens=cu, context=MixerContext(v_first=v_first, cp_context=CTX))
    assert {c[0] for c in calls if c[2] is CTX} == ops
    assert all(c[0] in ops for c in calls if c[2] is not None)
    torch.testing.assert_close(got, want)


def test_every_declared_fla_cp_op_takes_the_context():
    """The contract (mixers/base.py): what a built-in mixer declares in `fla_cp_ops()` are public ops whose
    dispatch hands fla's cp_context on; mixers that declare nothing run our exchange."""
    table = _dispatch.dispatch_table()
    declared = {}
    for name in MIXERS:
        ops = tiny_model(name).layers[0].mixer.fla_cp_ops()
        assert all(any(c.cp for c in table[op].calls) for op in ops), name
        declared[name] = set(ops)
    assert {n for n, ops in declared.items() if ops} == {"gated_deltanet", "rwkv7"}


def test_a_mixer_too_wide_for_flas_kernels_declares_nothing():
    assert tiny_model("gated_deltanet", head_dim=288).layers[0].mixer.fla_cp_ops() == ()


def test_context_parallel_context_is_not_a_per_token_field():
    ctx = MixerContext(v_first=torch.ones(1, 4, 2), cp_context=CTX)
    assert set(ctx.tensors()) == {"v_first"}
    part = ctx.map(lambda t: t[:, 2:])
    assert part.cp_context is None and part.v_first.shape == (1, 2, 2)
