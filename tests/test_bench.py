"""`linear-moe bench MODE`: every mode's CPU smoke run writes a JSON report and a PNG plot whose numbers are positive
and consistent (tokens/s == tokens / seconds of the same record, tokens == rows x tokens per row x steps); the
options of each mode are reachable through `--help`; misuse is one `error:` line. No timing thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from linear_moe.bench.model import model_config
from linear_moe.bench.report import Record, Report, format_pivot
from linear_moe.bench.timer import Timing, time_calls
from linear_moe.cli import build_parser, main
from linear_moe.model.flops import flops_per_token
from linear_moe.model.lm import LinearMoEForCausalLM
from linear_moe.model.presets import get_preset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~40x faster than two competing ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_bench(capsys, out: Path, *argv: str) -> dict:
    """Run `linear-moe bench ARGV --device cpu --out OUT`; check the table, JSON and PNG; return the JSON."""
    mode = argv[0]
    assert main(["bench", *argv, "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    doc = json.loads((out / f"{mode}.json").read_text())
    assert doc["mode"] == mode and doc["records"]
    assert (out / f"{mode}.png").read_bytes()[:8] == PNG_MAGIC
    for r in doc["records"]:
        assert r["error"] is None, r
        assert r["name"] in stdout
        assert r["seconds"] > 0 and r["steps"] > 0 and r["tokens"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=1e-12)
        assert r["peak_mem_gib"] is None  # measured on CUDA only
    return doc


def by_name(doc: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in doc["records"]:
        out.setdefault(r["name"], []).append(r)
    return out


def lines_of(doc: dict, names: list[str], shapes: list[tuple[int, int]]) -> dict[str, list[dict]]:
    """The records by plot line, checking the lines' names (in order) and each line's (batch, seq_len) points."""
    lines = by_name(doc)
    assert list(lines) == names
    for name, records in lines.items():
        assert [(r["batch"], r["seq_len"]) for r in records] == shapes, name
    return lines


def test_kernel_smoke(capsys, tmp_path):
    doc = run_bench(
        capsys,
        tmp_path,
        *("kernel", "--family", "gla,gated_delta_rule", "--seq-len", "8", "--seq-len", "16", "--tokens", "32"),
        *("--heads", "2", "--key-dim", "8", "--value-dim", "8", "--steps", "2", "--warmup", "1"),
    )
    # softmax baseline in the same run; B = tokens // T
    lines = lines_of(doc, ["gla", "gated_delta_rule", "attention"], [(4, 8), (2, 16)])
    assert all(r["tokens"] == r["batch"] * r["seq_len"] * r["steps"] == 64 for rs in lines.values() for r in rs)


@pytest.mark.parametrize("family", ["simple_gla", "delta_rule", "linear_attn", "hgrn", "rwkv6", "rwkv7"])
def test_kernel_inputs_are_valid_for_every_family(family):
    """Each family's random inputs suit its op: one fwd+bwd gives a finite output and a finite gradient to every
    input that takes one."""
    from linear_moe.bench.kernel import kernel_call

    op, leaves, other = kernel_call(family, 2, 8, 2, 4, 4, torch.device("cpu"), torch.float32)
    out = op(**leaves, **other)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves.values())


def test_layer_smoke(capsys, tmp_path):
    doc = run_bench(
        capsys,
        tmp_path,
        *("layer", "--preset", "debug-dense", "--mixer", "gla", "--seq-len", "8,16", "--tokens", "16"),
        *("--steps", "2", "--warmup", "0"),
    )
    lines = lines_of(doc, ["gla", "attention"], [(2, 8), (1, 16)])
    assert all(r["tokens"] == r["batch"] * r["seq_len"] * 2 for rs in lines.values() for r in rs)


def test_model_smoke_keeps_its_flags(capsys, tmp_path):
    """The flags of the former `python -m linear_moe.model.bench` still work; several mixers share one report."""
    doc = run_bench(
        capsys,
        tmp_path,
        *("model", "--preset", "debug-qwen2-moe", "--mixer", "gated_deltanet,attention", "--vocab", "256"),
        *("--shape", "2x16", "--shape", "2x16:packed", "--autotune", "one", "--steps", "2", "--warmup", "1"),
    )
    records = doc["records"]
    assert [(r["name"], r["layout"]) for r in records] == [
        ("gated_deltanet", "rows"),
        ("gated_deltanet", "packed"),
        ("attention", "rows"),
        ("attention", "packed"),
    ]
    for r in records:
        assert r["tokens"] == 2 * 16 * 2
        cfg = get_preset("debug-qwen2-moe").replace(mixer=r["name"], vocab_size=256)
        assert r["extra"]["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token(cfg, 16) / 989e12, rel=1e-9)
    assert doc["meta"]["autotune"] == "one" and doc["meta"]["vocab"] == 256


def test_moe_smoke(capsys, tmp_path):
    doc = run_bench(
        capsys,
        tmp_path,
        *("moe", "--experts", "4", "--top-k", "2", "--hidden", "16", "--ffn", "8", "--tokens", "32"),
        *("--steps", "2", "--warmup", "0"),
    )
    # CPU: the PyTorch path, named so (a merged report keeps it apart from a run with the kernels)
    assert list(by_name(doc)) == ["grouped experts", "MoELayer (PyTorch combine)", "gather+combine (PyTorch combine)"]
    assert doc["meta"]["moe_kernels"] is False
    for r in doc["records"]:
        assert r["tokens"] == 32 * 2
        assert r["extra"]["ms_per_step"] == pytest.approx(1e3 * r["seconds"] / r["steps"])
        if not r["name"].startswith("gather+combine"):
            flops = 18.0 * 32 * 2 * 16 * 8 * r["steps"]  # 18*D*F per (token, expert) assignment, fwd+bwd
            assert r["extra"]["expert_TFLOP/s"] == pytest.approx(flops / r["seconds"] / 1e12, rel=1e-9)


def test_decode_smoke_linear_state_is_constant(capsys, tmp_path):
    doc = run_bench(
        capsys,
        tmp_path,
        *("decode", "--preset", "debug-dense", "--vocab", "128", "--mixer", "gla", "--context", "8,24"),
        *("--batch", "2", "--steps", "3", "--warmup", "1"),
    )
    lines = lines_of(doc, ["gla", "attention"], [(2, 8), (2, 24)])
    for r in doc["records"]:
        assert r["tokens"] == 2 * 3  # B tokens per step
        assert r["extra"]["ms_per_token"] == pytest.approx(1e3 * r["seconds"] / r["steps"], rel=1e-12)
    gla, attn = ([r["extra"]["state_MiB"] for r in lines[n]] for n in ("gla", "attention"))
    assert gla[0] == gla[1] > 0  # a linear mixer's state does not grow with the context
    assert attn[1] > attn[0] > 0  # the KV cache does


def test_peers_smoke(capsys, tmp_path):
    """Ours beside each peer whose package is installed (fla needs CUDA); ratios from the same records."""
    from importlib.util import find_spec

    doc = run_bench(
        capsys,
        tmp_path,
        *("peers", "--preset", "debug-qwen2-moe", "--vocab", "256", "--seq-len", "8,16", "--tokens", "16"),
        *("--steps", "2", "--warmup", "0"),
    )
    ours = "ours debug-qwen2-moe gla"
    has_hf = find_spec("transformers") is not None
    names = lines_of(doc, [ours] + (["hf-qwen2-moe"] if has_hf else []), [(2, 8), (1, 16)])
    skipped = doc["summary"].get("skipped", {})
    assert "fla-gla" in skipped and ("hf-qwen2-moe" in skipped) == (not has_hf)
    expected = {
        f"hf-qwen2-moe T={t}": {"tokens_per_s": mine["tokens_per_s"] / peer["tokens_per_s"]}
        for t, mine, peer in zip((8, 16), names[ours], names.get("hf-qwen2-moe", []), strict=False)
    }
    assert doc["summary"]["ratios"] == expected


def test_hf_peer_experts_run_in_the_autocast_dtype():
    """Under bf16 autocast the Hugging Face peer's experts keep bf16 tensors for backward (stock `grouped_mm`
    keeps float32 ones: twice the memory), and their gradients reach the float32 weights."""
    pytest.importorskip("transformers")
    from linear_moe.bench.peers import hf_qwen2_moe

    cfg = get_preset("debug-qwen2-moe")
    experts = hf_qwen2_moe(cfg, 16).model.layers[0].mlp.experts
    x_TD = torch.randn(16, cfg.hidden_size, requires_grad=True)
    experts_TK = torch.randint(0, cfg.moe.num_experts, (16, cfg.moe.top_k))
    weights_TK = torch.rand(16, cfg.moe.top_k, dtype=torch.bfloat16)  # as the router gives them under autocast
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_TD = experts(x_TD, experts_TK, weights_TK)
    assert y_TD.dtype == torch.bfloat16
    assert torch.float32 not in saved and torch.bfloat16 in saved
    y_TD.float().sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32 and experts.down_proj.grad.abs().sum() > 0
    assert x_TD.grad is not None


def test_report_merges_files_of_one_mode(capsys, tmp_path):
    """`bench report` joins the records of several JSON files (e.g. one per mixer) into one JSON + PNG."""
    files = []
    for i, name in enumerate(("gla", "attention")):
        rep = Report("model", tmp_path / name)
        for t in (8, 16):
            rep.add(Record.measured("model", name, 2, t, 2 * t, Timing(0.5 + i, 3, 1.5 * t)))
        files.append(str(rep.write_json()))
    out = tmp_path / "merged"
    assert main(["bench", "report", *files, "--out", str(out)]) == 0
    doc = json.loads((out / "model.json").read_text())
    assert [(r["name"], r["seq_len"]) for r in doc["records"]] == [
        ("gla", 8),
        ("gla", 16),
        ("attention", 8),
        ("attention", 16),
    ]
    assert doc["records"][3]["tokens_per_s"] == 2 * 16 * 3 / 1.5 and doc["records"][3]["peak_mem_gib"] == 24.0
    assert (out / "model.png").read_bytes()[:8] == PNG_MAGIC
    other = Report("decode", tmp_path / "d")
    other.add(Record.measured("decode", "gla", 1, 8, 1, Timing(1.0, 2, None)))
    capsys.readouterr()
    assert main(["bench", "report", files[0], str(other.write_json()), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "different modes" in err[0]


def test_record_and_timer_count_what_they_time():
    calls = []
    timing = time_calls(lambda: calls.append(1), "cpu", iters=4, warmup=2)
    assert len(calls) == 6 and timing.iters == 4 and timing.seconds > 0 and timing.peak_mem_gib is None
    r = Record.measured("layer", "gla", 8, 2048, 8 * 2048, Timing(2.0, 4, None))
    assert (r.tokens, r.steps, r.tokens_per_s, r.ms_per_step) == (65536, 4, 32768.0, 500.0)
    assert r.shape == "8x2048"


def test_pivot_table_has_a_row_per_line_and_a_column_per_length():
    records = [
        Record.measured("model", "gla", 32, 2048, 65536, Timing(0.5, 2, 93.2)),  # 65,536 x 2 tokens in 0.5 s
        Record.measured("model", "gla", 4, 16384, 65536, Timing(1.0, 2, 90.0)),
        Record("model", "attention", 1, 16384, error="out of memory"),
    ]
    assert format_pivot(records).splitlines() == [
        "|  | 2K tokens/s | 16K tokens/s | peak GiB |",
        "|---|---|---|---|",
        "| gla | 262.1k | 131.1k | 93.2 |",
        "| attention |  | OOM | - |",
    ]


@pytest.mark.parametrize(
    ("mode", "option"),
    [
        ("kernel", "--family"),
        ("layer", "--seq-len"),
        ("model", "--shape"),
        ("moe", "--experts"),
        ("decode", "--context"),
        ("peers", "--peers"),
        ("report", "FILE.json"),
    ],
)
def test_each_mode_has_its_own_help(capsys, mode, option):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", mode, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: linear-moe bench {mode}") and option in out


def test_list_options_take_commas_and_repeats():
    parser = build_parser()
    args = parser.parse_args(["bench", "kernel", "--seq-len", "16,32", "--seq-len", "64", "--family", "gla"])
    assert args.seq_len == [16, 32, 64] and args.family == ["gla"]
    again = parser.parse_args(["bench", "kernel"])  # the default list is not extended by the first parse
    assert again.seq_len == [2048, 8192, 32768] and again.family == ["gla", "simple_gla", "gated_delta_rule"]


def test_model_mixer_kwargs_reach_every_mixer_layer():
    argv = ["bench", "model", "--preset", "debug-dense", "--layer-pattern", "LN", "--mixer-kwarg", "seq_split=8"]
    args = build_parser().parse_args([*argv, "--mixer-kwarg", "seq_split_local=sum"])
    cfg = model_config(args, "gla")
    assert cfg.mixer_kwargs == {"seq_split": 8, "seq_split_local": "sum"}
    gla, attention = LinearMoEForCausalLM(cfg).layers
    assert (gla.mixer.seq_split, gla.mixer.seq_split_local) == (8, "sum")
    assert not hasattr(attention.mixer, "seq_split")  # N layers take only the attention options


def one_error_line(capsys, argv: list[str], match: str) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from the parser
        code = e.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("mode", ["kernel", "layer", "model", "moe", "decode", "peers"])
def test_bench_without_gpu_is_one_line_error(capsys, tmp_path, mode):
    one_error_line(capsys, ["bench", mode, "--out", str(tmp_path)], "needs a CUDA GPU")
    assert not any(tmp_path.iterdir())


def test_bench_misuse_is_one_line_error(capsys, tmp_path):
    one_error_line(capsys, ["bench", "attention"], "invalid choice")
    cpu = ["--device", "cpu", "--out", str(tmp_path)]
    one_error_line(capsys, ["bench", "kernel", "--family", "gla2", *cpu], "unknown kernel family 'gla2'")
    tiny = ["--preset", "debug-dense", *cpu]
    one_error_line(capsys, ["bench", "layer", "--mixer", "gla2", *tiny], "unknown mixer 'gla2'")
    one_error_line(capsys, ["bench", "peers", "--peers", "hf", *tiny], "unknown peer 'hf'")
    one_error_line(capsys, ["bench", "model", "--shape", "16", *tiny], "expected BxT")
    one_error_line(capsys, ["bench", "model", "--mixer-kwarg", "seq_split", *tiny], "must look like key=value")
    one_error_line(capsys, ["bench", "model", "--mixer-kwarg", "split=8", *tiny], "unknown option(s) split")
    one_error_line(capsys, ["bench", "kernel", "--seq-len", "0", *cpu], "expected positive integers")
