"""linear_moe.eval offline: packed scoring and carried-state document scoring against full forwards; `linear-moe eval`
on local lm-eval task YAMLs (multiple choice, rolling log-likelihood, generation) with data built here, its JSON, and
one-line errors; `--perplexity FILE`."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from linear_moe.cli import main
from linear_moe.eval import score_continuations, sequence_logprob
from linear_moe.generate import GenerationConfig, generate, load_model
from tiny_checkpoint import make_checkpoint

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The quick brown", ["fox", "dog", "state"], 0),
    ("A linear model mixes", ["tokens", "experts", "the lazy"], 1),
    ("Experts route each token to a few", ["feed forward networks", "foxes", "routers"], 2),
]
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Experts route each token to a few feed forward networks, and the router learns which ones fit.",
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("run"), mixer="gla", layer_pattern="LN")
    return load_model(path)


def full_logprob(model, ids: list[int], n_cont: int) -> float:
    """log p of the last `n_cont` tokens of `ids` from one plain forward."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    targets = torch.tensor(ids[1:])
    return float(logprobs.gather(1, targets[:, None])[-n_cont:].sum())


def test_packed_scores_equal_separate_full_forwards(loaded):
    g = torch.Generator().manual_seed(0)
    V = loaded.config.vocab_size
    pairs = [(torch.randint(0, V, (n,), generator=g).tolist(), torch.randint(0, V, (m,), generator=g).tolist())
             for n, m in ((5, 3), (1, 1), (12, 4), (7, 2))]  # fmt: skip
    got = score_continuations(loaded.model, pairs, max_len=64, max_tokens=20)  # several packed forwards
    for (ctx, cont), (lp, _) in zip(pairs, got, strict=True):
        assert lp == pytest.approx(full_logprob(loaded.model, ctx + cont, len(cont)), abs=1e-4)
    ctx = pairs[2][0]
    greedy = [int(loaded.model(torch.tensor([ctx])).logits[0, -1].argmax())]
    (_, is_greedy), (_, not_greedy) = score_continuations(
        loaded.model, [(ctx, greedy), (ctx, [(greedy[0] + 1) % V])], 64
    )
    assert is_greedy and not not_greedy
    ((lp_cut, _),) = score_continuations(loaded.model, [(list(range(30)), [3, 4])], max_len=8)  # 8 input tokens
    assert lp_cut == pytest.approx(full_logprob(loaded.model, list(range(23, 30)) + [3, 4], 2), abs=1e-4)


def test_document_scored_in_chunks_with_states_equals_one_forward(loaded):
    ids = loaded.tokenizer.encode(" ".join(DOCS))
    total, n = sequence_logprob(loaded.model, ids, chunk=7)
    assert n == len(ids) - 1 and total == pytest.approx(full_logprob(loaded.model, ids, len(ids) - 1), abs=1e-3)


def write_tasks(root, generated: str):
    """Three local tasks (YAML + JSONL) in `root`; the generation task's first answer is `generated`."""
    data = root / "data"
    data.mkdir()
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    gen = [{"question": "The quick brown", "answer": generated}, {"question": "Experts", "answer": "no such answer"}]
    for name, rows in (("mc", mc), ("docs", [{"text": t} for t in DOCS]), ("gen", gen)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ntest_split: train\ndataset_kwargs:\n  cache_dir: {root / 'cache'}\n"
    files = "  data_files:\n    train: {}\n"
    (root / "mc.yaml").write_text(
        f"task: lmoe_mc\n{common}{files.format(data / 'mc.jsonl')}output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    (root / "docs.yaml").write_text(
        f"task: lmoe_docs\n{common}{files.format(data / 'docs.jsonl')}output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n"
    )
    (root / "gen.yaml").write_text(
        f"task: lmoe_gen\n{common}{files.format(data / 'gen.jsonl')}output_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def reference_mc_accuracy(loaded) -> float:
    """Accuracy from full forwards: lm-eval scores ' ' + choice after the question (context split as it does)."""
    tok, correct = loaded.tokenizer, 0
    for q, choices, answer in QUESTIONS:
        scores = []
        for c in choices:
            whole, ctx = tok.encode(q + " " + c), tok.encode(q)
            scores.append(full_logprob(loaded.model, whole, len(whole) - len(ctx)))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return correct / len(QUESTIONS)


def test_eval_runs_local_tasks_offline_and_writes_json(loaded, tmp_path, capsys):
    tok = loaded.tokenizer
    cfg = GenerationConfig(max_new_tokens=6, stop=(".",))
    (gen,), _ = generate(loaded.model, [tok.encode("The quick brown")], cfg, tok)
    write_tasks(tmp_path, gen.text)
    out = tmp_path / "results.json"
    args = ["eval", str(loaded.path), "--tasks", "lmoe_mc,lmoe_docs,lmoe_gen", "--include-path", str(tmp_path)]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "lmoe_mc" in printed and "bits_per_byte" in printed
    res = json.loads(out.read_text())["results"]
    assert res["lmoe_mc"]["acc,none"] == pytest.approx(reference_mc_accuracy(loaded))
    nll = -sum(full_logprob(loaded.model, [tok.eos_id] + tok.encode(t), len(tok.encode(t))) for t in DOCS)
    n_bytes = sum(len(t.encode()) for t in DOCS)
    assert res["lmoe_docs"]["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)
    assert res["lmoe_gen"]["exact_match,none"] == pytest.approx(0.5)  # the first answer is our own generation


def test_perplexity_file(loaded, tmp_path, capsys):
    text = " ".join(DOCS)
    (tmp_path / "held_out.txt").write_text(text)
    out = tmp_path / "ppl.json"
    assert main(["eval", str(loaded.path), "--perplexity", str(tmp_path / "held_out.txt"), "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    ids = [loaded.tokenizer.eos_id] + loaded.tokenizer.encode(text)
    ref = -full_logprob(loaded.model, ids, len(ids) - 1) / (len(ids) - 1)
    got = json.loads(out.read_text())["perplexity"][str(tmp_path / "held_out.txt")]
    assert got["nll_per_token"] == pytest.approx(ref, rel=1e-4) and got["perplexity"] == pytest.approx(math.exp(ref))


def test_eval_bad_inputs_are_one_line_errors(loaded, tmp_path, capsys):
    cases = [
        (
            ["--tasks", "no_such_task", "--include-path", str(tmp_path), "--no-builtin-tasks"],
            "unknown task 'no_such_task'",
        ),
        (["--perplexity", str(tmp_path / "missing.txt")], "file not found"),
        ([], "give --tasks"),
    ]
    for extra, match in cases:
        assert main(["eval", str(loaded.path), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and re.search(re.escape(match), err[-1]), err
