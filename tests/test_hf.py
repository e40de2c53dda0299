"""Hugging Face export / import (`linear-moe convert`): an exported tiny model of every MoE family with a linear,
a hybrid and a softmax stack loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` in a
fresh process with our logits and our greedy tokens (full forwards of our model, and `linear-moe generate`'s engine);
import round-trips exactly; bad inputs are one-line errors that write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linear_moe.cli import main
from linear_moe.data import Tokenizer
from linear_moe.generate.engine import GenerationConfig, generate
from linear_moe.hf import HFError, export_hf, import_hf, load_checkpoint_model, save_hf
from linear_moe.model import LinearMoEForCausalLM, get_preset
from linear_moe.train import checkpoint as ckpt
from linear_moe.train.config import RunConfig, run_config_yaml

# (MoE family, layer pattern): a linear stack, a hybrid and a softmax stack per family, several linear mixers
CASES = {
    "mixtral-linear": ("mixtral", "gated_deltanet", None),
    "mixtral-hybrid": ("mixtral", "gla", "LN"),
    "mixtral-softmax": ("mixtral", "attention", None),
    "qwen2-moe-linear": ("qwen2-moe", "rwkv7", None),
    "qwen2-moe-hybrid": ("qwen2-moe", "mamba2", "LN"),
    "qwen2-moe-softmax": ("qwen2-moe", "attention", None),
    "deepseek-v2-linear": ("deepseek-v2", "hgrn2", None),
    "deepseek-v2-hybrid": ("deepseek-v2", "deltanet", "NL"),
    "deepseek-v2-softmax": ("deepseek-v2", "attention", None),
}
NEW_TOKENS = 6
PROMPT_LEN = 7
TEXT = "Experts route each token to a few feed forward networks, and the router learns which ones fit. " * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train([TEXT], vocab_size=300).hf.save(str(path))
    return path


def make_checkpoint(root: Path, family: str, mixer: str, pattern: str | None, tokenizer_file: Path, seed: int = 0):
    """A saved checkpoint of a tiny model (2 layers, vocab 320) and the model itself."""
    cfg = get_preset(f"debug-{family}").replace(mixer=mixer, layer_pattern=pattern, vocab_size=320, num_layers=2)
    torch.manual_seed(seed)
    model = LinearMoEForCausalLM(cfg)
    with torch.no_grad():  # non-trivial values everywhere (norms and biases start at 1 / 0)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    opt = torch.optim.AdamW(model.parameters())
    path = ckpt.save_checkpoint(
        root / "checkpoints",
        5,
        model,
        opt,
        config_yaml=run_config_yaml(RunConfig(model=cfg)),
        meta={},
        extra_files={"tokenizer.json": tokenizer_file},
    )
    return path, model.eval()


@torch.no_grad()
def is_our_greedy_continuation(model: LinearMoEForCausalLM, seq: list[int], prompt_len: int, eos: int) -> bool:
    """Whether `seq` = prompt + continuation is what greedy decoding by full forwards gives: each new token is the
    argmax of our logits over everything before it (one causal forward checks every step), until eos or the end."""
    pred = model(torch.tensor([seq])).logits[0].argmax(-1).tolist()
    new = seq[prompt_len:]
    stop = new.index(eos) + 1 if eos in new else len(new)
    return stop == len(new) and new == pred[prompt_len - 1 : len(seq) - 1]


LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = {}
    for name, d in json.load(open(sys.argv[1])).items():
        model = AutoModelForCausalLM.from_pretrained(d["dir"], trust_remote_code=True)
        ids = torch.tensor(d["ids"])
        logits = model(ids, use_cache=False).logits
        gen = model.generate(ids[:1], max_new_tokens=d["new"], do_sample=False)
        tok = AutoTokenizer.from_pretrained(d["dir"], trust_remote_code=True)
        out[name] = {
            "class": type(model).__name__,
            "max_diff": (logits - torch.tensor(d["logits"])).abs().max().item(),
            "loss": model(ids, labels=ids, use_cache=False).loss.item(),
            "greedy": gen[0].tolist(),
            "encoded": tok(d["text"]).input_ids,
        }
    print(json.dumps(out))
    """
)


def test_exports_load_with_transformers_in_a_fresh_process(tmp_path, tokenizer_file):
    pytest.importorskip("transformers")
    tok = Tokenizer.from_file(tokenizer_file)
    exports = {}
    for i, (name, (family, mixer, pattern)) in enumerate(CASES.items()):
        path, model = make_checkpoint(tmp_path / name, family, mixer, pattern, tokenizer_file, seed=i)
        exports[name] = (model, export_hf(path, tmp_path / name / "hf"))
    torch.manual_seed(0)  # and a model in memory with tied embeddings, through save_hf
    cfg = get_preset("debug-mixtral").replace(mixer="lightning_attn", vocab_size=320, tie_embeddings=True)
    tied = LinearMoEForCausalLM(cfg).eval()
    exports["tied-in-memory"] = (tied, save_hf(tied, tmp_path / "tied", tokenizer_file))
    jobs, models = {}, {}
    for i, (name, (model, out)) in enumerate(exports.items()):
        ids = torch.randint(0, 300, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            logits = model(ids).logits
            lm = model(ids, labels=F.pad(ids[:, 1:], (0, 1), value=-100))  # our labels are already shifted
            loss = lm.loss + (lm.aux_loss if lm.aux_loss is not None else 0)
        jobs[name] = {"dir": str(out), "ids": ids.tolist(), "logits": logits.tolist(), "new": NEW_TOKENS}
        jobs[name]["loss"] = loss.item()
        jobs[name]["text"] = TEXT[:60]
        models[name] = model
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for name in exports:
        assert got[name]["class"] == "LinearMoEForCausalLM"
        assert got[name]["max_diff"] < 1e-4, (name, got[name]["max_diff"])
        assert got[name]["loss"] == pytest.approx(jobs[name]["loss"], abs=1e-5), name  # transformers' label shift
        greedy = got[name]["greedy"]
        assert len(greedy) == PROMPT_LEN + NEW_TOKENS or tok.eos_id in greedy[PROMPT_LEN:], name
        assert is_our_greedy_continuation(models[name], greedy, PROMPT_LEN, tok.eos_id), (name, greedy)
        ours, _ = generate(models[name], [greedy[:PROMPT_LEN]], GenerationConfig(NEW_TOKENS), eos_id=tok.eos_id)
        assert ours[0].ids + ([tok.eos_id] if ours[0].finish_reason == "eos" else []) == greedy[PROMPT_LEN:], name
        assert got[name]["encoded"] == tok.encode(TEXT[:60]), name
    wrong = greedy[:-1] + [(greedy[-1] + 1) % 300]  # the check itself can fail
    assert not is_our_greedy_continuation(models[name], wrong, PROMPT_LEN, tok.eos_id)


def test_import_round_trips_exactly(tmp_path, tokenizer_file):
    path, model = make_checkpoint(tmp_path / "run", "qwen2-moe", "gla", "LN", tokenizer_file)
    hf_dir = export_hf(path, tmp_path / "hf")
    back = import_hf(hf_dir, tmp_path / "imported")
    again, _ = load_checkpoint_model(back)
    assert again.cfg == model.cfg
    assert again.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert (back / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    # and the imported checkpoint exports to the same weights and config
    second = export_hf(back, tmp_path / "hf2")
    assert (second / "model.safetensors").read_bytes() == (hf_dir / "model.safetensors").read_bytes()
    assert json.loads((second / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())


def test_run_directory_exports_its_newest_checkpoint(tmp_path, tokenizer_file):
    path, model = make_checkpoint(tmp_path / "run", "mixtral", "hgrn", None, tokenizer_file)
    loaded, where = load_checkpoint_model(tmp_path / "run")
    assert where == path
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_convert_cli_and_bad_inputs(tmp_path, tokenizer_file, capsys):
    path, _ = make_checkpoint(tmp_path / "run", "mixtral", "gla", None, tokenizer_file)
    code, err = run_cli(["convert", str(path), "--to-hf", str(tmp_path / "hf")], capsys)
    assert code == 0, err
    before = files_under(tmp_path)
    bad = [
        (["convert", str(path), "--to-hf", str(tmp_path / "hf")], "already exists and is not empty"),
        (["convert", str(tmp_path / "nope"), "--to-hf", str(tmp_path / "x")], "no such directory"),
        (["convert", "--from-hf", str(tmp_path / "run"), "--out", str(tmp_path / "x")], "no config.json"),
        (["convert", str(path)], "--to-hf OUT or --from-hf DIR --out CHECKPOINT_DIR"),
    ]
    for args, match in bad:
        code, err = run_cli(args, capsys)
        assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and match in err, (args, err)
    assert files_under(tmp_path) == before  # nothing written by a failed conversion
    code, err = run_cli(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")], capsys)
    assert code == 0, err and (tmp_path / "back" / "meta.json").is_file()


def test_bad_hf_directories(tmp_path, tokenizer_file):
    path, _ = make_checkpoint(tmp_path / "run", "mixtral", "gla", None, tokenizer_file)
    hf_dir = export_hf(path, tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    # a foreign architecture points at linearising instead
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mixtral"}))
    with pytest.raises(HFError, match="model.init_from"):
        import_hf(hf_dir, tmp_path / "out")
    # weights that do not fit the config
    cfg["linear_moe"]["hidden_size"] = 32
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError, match="do not fit"):
        import_hf(hf_dir, tmp_path / "out")
    # pickle files are never read
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(HFError, match="pickle files are never loaded"):
        import_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tokenizer_file):
    big = tmp_path / "big.json"
    Tokenizer.train([TEXT + " ".join(f"w{i}x" for i in range(400))], vocab_size=400).hf.save(str(big))
    path, _ = make_checkpoint(tmp_path / "run", "mixtral", "gla", None, big)
    with pytest.raises(HFError, match=r"tokenizer .* has 3[2-9][0-9] tokens but the model's vocabulary has 320"):
        export_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_transformers_generate_passes_logits_to_keep_and_keeps_our_tokens():
    """transformers' `generate` sees `logits_to_keep` in the signature and passes 1: the prompt's forward runs the
    final norm on one position only, and the greedy tokens stay those of our engine."""
    pytest.importorskip("transformers")
    from linear_moe.hf.configuration import LinearMoEConfig
    from linear_moe.hf.modeling import LinearMoEForCausalLM as HFModel

    cfg = get_preset("debug-mixtral").replace(mixer="gla", layer_pattern="LN", vocab_size=320)
    torch.manual_seed(0)
    hf = HFModel(LinearMoEConfig(linear_moe=cfg.to_dict())).eval()
    passed, norm_inputs = [], []
    hf.register_forward_pre_hook(
        lambda mod, args, kwargs: passed.append(kwargs.get("logits_to_keep")), with_kwargs=True
    )
    hf.model.norm.register_forward_hook(lambda mod, args, output: norm_inputs.append(tuple(args[0].shape)))
    prompt = torch.randint(0, 320, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    gen = hf.generate(prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert passed == [1] * NEW_TOKENS
    assert norm_inputs == [(1, 1, cfg.hidden_size)] * NEW_TOKENS  # the prompt's forward too
    ours, _ = generate(hf.model, [prompt[0].tolist()], GenerationConfig(NEW_TOKENS, stop_at_eos=False))
    assert gen[0, PROMPT_LEN:].tolist() == ours[0].ids


def test_hf_logits_to_keep_equals_full_logits_sliced():
    pytest.importorskip("transformers")
    from linear_moe.hf.configuration import LinearMoEConfig
    from linear_moe.hf.modeling import LinearMoEForCausalLM as HFModel

    cfg = get_preset("debug-dense").replace(mixer="gated_deltanet", vocab_size=320)
    torch.manual_seed(0)
    hf = HFModel(LinearMoEConfig(linear_moe=cfg.to_dict())).double().eval()
    ids = torch.randint(0, 320, (2, 6))
    with torch.no_grad():
        full = hf(ids, labels=ids, use_cache=False)
        for keep, cols in [(1, [5]), (3, [3, 4, 5]), (torch.tensor([4, 0]), [4, 0])]:
            out = hf(ids, use_cache=False, logits_to_keep=keep)
            torch.testing.assert_close(out.logits, full.logits[:, cols], rtol=1e-12, atol=1e-12)
            with_labels = hf(ids, labels=ids, use_cache=False, logits_to_keep=keep)  # the loss covers every position
            assert with_labels.loss.item() == full.loss.item()
            torch.testing.assert_close(with_labels.logits, full.logits[:, cols], rtol=0, atol=0)
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
            hf(ids, labels=ids, use_cache=False, logits_to_keep=-2)
