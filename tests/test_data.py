"""linear_moe.data: tokenizer, prepare (all formats, sharding, safety), PackedDataset and SFT batches."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from linear_moe.data import (
    EOS,
    IGNORE_INDEX,
    DataError,
    PackedDataset,
    SFTDataset,
    Tokenizer,
    iter_documents,
    prepare,
)

prepare_mod = importlib.import_module("linear_moe.data.prepare")  # the package attribute is the function

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Linear attention keeps a state of size d x d.\nIt is updated once per token.",
    "Mixture of experts: a router picks top-k experts for every token — déjà vu ✓.",
    "short",
    "Another document about recurrent state spaces, gates and deltas.",
    "The last document of the tiny corpus, held out for validation.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(DOCS * 4, vocab_size=300)


def read_dir(path) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = json.loads((path / "meta.json").read_text())
    tokens = np.concatenate([np.fromfile(path / s["file"], dtype=meta["dtype"]) for s in meta["shards"]])
    return tokens, np.load(path / "doc_offsets.npy"), meta


def decoded_docs(path, tok: Tokenizer) -> list[str]:
    """Independent walk of the files: every document is its tokens followed by exactly one EOS."""
    tokens, offsets, meta = read_dir(path)
    assert meta["n_tokens"] == len(tokens) == offsets[-1] and meta["n_docs"] == len(offsets) - 1
    docs = []
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        assert tokens[b - 1] == tok.eos_id and tok.eos_id not in tokens[a : b - 1]
        docs.append(tok.decode(tokens[a : b - 1]))
    return docs


def test_tokenizer_round_trip_and_specials(tok, tmp_path):
    text = "Ünïcode ✓ and\ttabs\n\n  spaces  " + "<|user|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == tok.hf.token_to_id(EOS) and tok.vocab_size == 300
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.encode(text) == tok.encode(text) and loaded.eos_id == tok.eos_id
    with pytest.raises(DataError, match="vocab_size must be between 260 and"):
        Tokenizer.train(DOCS, vocab_size=100)


def test_tokenizer_without_eos_is_rejected(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    HF(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(DataError, match="no end-of-text token"):
        Tokenizer.from_file(tmp_path / "t.json")


def write_arrow_dataset(path, docs: list[str], split: str | None = None) -> None:
    """The `datasets.save_to_disk` layout: state.json + dataset_info.json + Arrow IPC stream files."""
    d = path / split if split else path
    d.mkdir(parents=True)
    halves = [docs[: len(docs) // 2], docs[len(docs) // 2 :]]
    files = []
    for i, part in enumerate(halves):
        name = f"data-{i:05d}-of-00002.arrow"
        table = pa.table({"id": list(range(len(part))), "text": part})
        with pa.ipc.new_stream(str(d / name), table.schema) as w:
            w.write_table(table)
        files.append({"filename": name})
    (d / "state.json").write_text(json.dumps({"_data_files": files, "_split": split}))
    (d / "dataset_info.json").write_text("{}")
    if split:
        (path / "dataset_dict.json").write_text(json.dumps({"splits": [split]}))


def test_prepare_round_trip_all_formats(tok, tmp_path):
    src = tmp_path / "src"
    (src / "txt").mkdir(parents=True)
    for i, d in enumerate(DOCS[:2]):
        (src / "txt" / f"{i}.txt").write_text(d)
    (src / "blocks.txt").write_text("first block\nline two\n\n\nsecond block\n  \nthird")
    (src / "d.jsonl").write_text("\n".join(json.dumps({"text": d, "n": 1}) for d in DOCS) + "\n\n")
    pq.write_table(pa.table({"text": DOCS[::-1]}), src / "d.parquet")
    write_arrow_dataset(src / "hf", DOCS)
    write_arrow_dataset(src / "hfdict", DOCS[:3], split="train")

    cases = {
        "txt": ([str(src / "txt")], {}, DOCS[:2]),
        "txt-split": (
            [str(src / "blocks.txt")],
            {"split_docs": True},
            ["first block\nline two", "second block", "third"],
        ),
        "jsonl": ([str(src / "d.jsonl")], {}, DOCS),
        "parquet": ([str(src / "d.parquet")], {}, DOCS[::-1]),
        "hf": ([str(src / "hf")], {}, DOCS),
        "hfdict": ([str(src / "hfdict")], {}, DOCS[:3]),
        "mixed": ([str(src / "d.jsonl"), str(src / "txt")], {}, DOCS + DOCS[:2]),
    }
    for name, (inputs, kw, expected) in cases.items():
        meta = prepare(inputs, tmp_path / name, tokenizer=tok, progress=False, **kw)
        assert decoded_docs(tmp_path / name, tok) == expected, name
        assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16" and meta["sources"] == inputs
        assert Tokenizer.from_file(tmp_path / name).encode(DOCS[2]) == tok.encode(DOCS[2])


def test_prepare_trains_tokenizer_shards_and_val(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS * 3))
    kw = dict(vocab_size=280, text_field="body", progress=False)
    prepare([str(tmp_path / "d.jsonl")], tmp_path / "one", **kw)
    meta = prepare([str(tmp_path / "d.jsonl")], tmp_path / "sh", shard_tokens=37, val_fraction=0.3, **kw)
    tok = Tokenizer.from_file(tmp_path / "sh")
    assert tok.vocab_size == 280
    n_val = 6  # ceil(0.3 * 18)
    assert meta["n_val_docs"] == n_val and [s["file"] for s in meta["shards"]][:2] == [
        "tokens-00000.bin",
        "tokens-00001.bin",
    ]
    assert all(s["n_tokens"] == 37 for s in meta["shards"][:-1]) and 0 < meta["shards"][-1]["n_tokens"] <= 37
    assert decoded_docs(tmp_path / "sh", tok) == (DOCS * 3)[:-n_val]
    assert decoded_docs(tmp_path / "sh" / "val", tok) == (DOCS * 3)[-n_val:]
    # the same tokens as the unsharded directory (same corpus -> same trained tokenizer)
    assert np.array_equal(read_dir(tmp_path / "one")[0][: meta["n_tokens"]], read_dir(tmp_path / "sh")[0])
    ds = PackedDataset(tmp_path / "sh", seq_len=16, micro_batch_size=3)
    assert ds.vocab_size == 280 and ds.num_tokens == meta["n_tokens"]
    assert ds.val.num_tokens == read_dir(tmp_path / "sh" / "val")[2]["n_tokens"]


def test_prepare_errors(tok, tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n ")
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "p.parquet")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    cases = [
        ([str(tmp_path / "latin1.txt")], "latin1.txt: not UTF-8 text"),
        ([str(tmp_path / "broken.parquet")], "broken.parquet: unreadable"),
        ([str(tmp_path / "nope.txt")], "input not found"),
        ([str(tmp_path / "blank.txt")], "no text found"),
        ([str(tmp_path / "x.csv")], "unknown input format '.csv'"),
        ([str(tmp_path / "bad.jsonl")], "bad.jsonl:2: expected an object with a string field 'text'"),
        ([str(tmp_path / "p.parquet")], "no column 'text'; columns: body"),
        (["builtin:nope"], "unknown builtin corpus 'builtin:nope'; valid: builtin:python-docs"),
    ]
    for inputs, message in cases:
        with pytest.raises(DataError, match=message):
            prepare(inputs, tmp_path / "out", tokenizer=tok, progress=False)
        assert not (tmp_path / "out").exists()


def test_overwrite_refusal_and_atomicity(tok, tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="exists and is not empty; pass overwrite=True"):
        prepare([str(tmp_path / "d.jsonl")], out, tokenizer=tok, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    def boom(self, meta):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod._TokenWriter, "close", boom)
    for target, overwrite in [(tmp_path / "fresh", False), (out, True)]:
        with pytest.raises(RuntimeError, match="disk full"):
            prepare([str(tmp_path / "d.jsonl")], target, tokenizer=tok, overwrite=overwrite, progress=False)
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]  # no temp dirs left behind
    monkeypatch.undo()
    prepare([str(tmp_path / "d.jsonl")], out, tokenizer=tok, overwrite=True, progress=False)
    assert decoded_docs(out, tok) == DOCS and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]


def write_synthetic(path, n_tokens: int, doc_starts: list[int], shard: int | None = None) -> None:
    """A hand-made dataset dir: token i has id i (so a row reveals its offset), documents start at doc_starts."""
    path.mkdir()
    tokens = np.arange(n_tokens, dtype=np.uint16)
    bounds = list(range(0, n_tokens, shard)) + [n_tokens] if shard else [0, n_tokens]
    shards = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        tokens[a:b].tofile(path / f"tokens-{i:05d}.bin")
        shards.append({"file": f"tokens-{i:05d}.bin", "n_tokens": b - a})
    np.save(path / "doc_offsets.npy", np.asarray(doc_starts + [n_tokens], dtype=np.int64))
    meta = {"vocab_size": 65535, "dtype": "uint16", "n_tokens": n_tokens, "n_docs": len(doc_starts), "shards": shards}
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("shard", [None, 7], ids=["one-file", "shards"])
def test_packed_batch_against_hand_walk(tmp_path, shard):
    n, T, B = 120, 10, 6
    doc_starts = [0, 3, 4, 17, 30, 31, 55, 90, 100, 101, 102]
    write_synthetic(tmp_path / "d", n, doc_starts, shard)
    ds = PackedDataset(tmp_path / "d", seq_len=T, micro_batch_size=B, seed=5)
    starts = set(doc_starts)
    for step in range(8):
        batch = ds.get_batch(step)
        ids, labels, cu = batch.input_ids[0].numpy(), batch.labels[0].numpy(), batch.cu_seqlens.tolist()
        assert batch.input_ids.shape == batch.labels.shape == (1, B * T)
        assert batch.input_ids.dtype == batch.labels.dtype == torch.int64 and batch.cu_seqlens.dtype == torch.int32
        exp_cu = []
        for b in range(B):
            o = int(ids[b * T])  # token id == stream position
            assert 0 <= o <= n - T - 1
            for j in range(T):
                pos = o + j
                assert ids[b * T + j] == pos
                assert labels[b * T + j] == (IGNORE_INDEX if pos + 1 in starts else pos + 1)
                if j == 0 or pos in starts:
                    exp_cu.append(b * T + j)
        assert cu == exp_cu + [B * T]
        assert batch.num_tokens == int((labels != IGNORE_INDEX).sum())
    a, b = ds.get_batch(3), PackedDataset(tmp_path / "d", T, B, seed=5).get_batch(3)
    assert all(
        np.array_equal(x, y)
        for x, y in [(a.input_ids, b.input_ids), (a.labels, b.labels), (a.cu_seqlens, b.cu_seqlens)]
    )
    assert not np.array_equal(a.input_ids, ds.get_batch(4).input_ids)
    assert not np.array_equal(a.input_ids, ds.get_batch(3, rank=1, world_size=2).input_ids)
    assert not np.array_equal(a.input_ids, PackedDataset(tmp_path / "d", T, B, seed=6).get_batch(3).input_ids)


def test_packed_errors(tmp_path):
    write_synthetic(tmp_path / "d", 50, [0, 20])
    with pytest.raises(DataError, match=r"sequence length 50 is longer than the data \(50 tokens\)"):
        PackedDataset(tmp_path / "d", seq_len=50, micro_batch_size=1)
    assert PackedDataset(tmp_path / "d", seq_len=49, micro_batch_size=1).get_batch(0).input_ids[0, 0] == 0
    with pytest.raises(DataError, match="not a prepared dataset"):
        PackedDataset(tmp_path, seq_len=4, micro_batch_size=1)
    with pytest.raises(DataError, match="rank must be in"):
        PackedDataset(tmp_path / "d", 4, 1).get_batch(0, rank=2, world_size=2)
    assert PackedDataset(tmp_path / "d", 4, 1).val is None


def test_builtin_corpus_size():
    docs = list(iter_documents(["builtin:python-docs"]))
    assert sum(len(d) for d in docs) >= 1_000_000 and len(docs) > 100
    assert any("for_stmt" in d or 'The "for" statement' in d for d in docs)


# ----------------------------------------------------------------------------- SFT


def write_jsonl(path, records) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def test_sft_masking_and_template(tok, tmp_path):
    write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"prompt": "What is 2+2?", "response": "It is 4."},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "See you."},
                ]
            },
        ],
    )
    ds = SFTDataset(tmp_path / "s.jsonl", tok, seq_len=128, micro_batch_size=1, val_fraction=0.5)
    batch = ds.get_batch(0)
    ids, labels = batch.input_ids[0].numpy(), batch.labels[0].numpy()
    n = len(tok.encode("<|user|>\nWhat is 2+2?\n<|assistant|>\nIt is 4.<|endoftext|>"))
    assert tok.decode(ids[:n]) == "<|user|>\nWhat is 2+2?\n<|assistant|>\nIt is 4.<|endoftext|>"
    assert (ids[n:] == tok.eos_id).all() and (labels[n - 1 :] == IGNORE_INDEX).all()  # padding
    targeted = labels[labels != IGNORE_INDEX]
    assert tok.decode(targeted) == "It is 4.<|endoftext|>" and batch.num_tokens == len(targeted)
    k = n - len(tok.encode("It is 4.")) - 1  # position of the last prompt token ("\n" after <|assistant|>)
    assert (labels[: k - 1] == IGNORE_INDEX).all() and labels[k - 1] == ids[k]
    assert (labels[k - 1 : n - 1] == ids[k:n]).all()
    assert batch.cu_seqlens.tolist() == [0, n, 128]

    val = ds.val.get_batch(0)
    v_ids, v_labels = val.input_ids[0].numpy(), val.labels[0].numpy()
    text = (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|><|user|>\nBye\n<|assistant|>\nSee you."
    )
    assert tok.decode(v_ids).startswith(text + "<|endoftext|>")
    assert tok.decode(v_labels[v_labels != IGNORE_INDEX]) == "Hello!<|endoftext|>See you.<|endoftext|>"


def test_sft_packing_epochs_and_truncation(tok, tmp_path, capsys):
    records = [{"prompt": f"question {i}", "response": "answer " * (i % 4 + 1)} for i in range(10)]
    records.append({"prompt": "long " * 40, "response": "x"})
    write_jsonl(tmp_path / "s.jsonl", records)
    ds = SFTDataset(tmp_path / "s.jsonl", tok, seq_len=40, micro_batch_size=2, seed=1)
    assert ds.num_truncated == 1
    assert "1 of 11 SFT examples (training) are longer than seq_len=40" in capsys.readouterr().err
    user = tok.token_id("<|user|>")
    seen: dict[int, list[str]] = {0: [], 1: []}
    step = 0
    while (epoch := ds.epoch_of(step, world_size=2)) < 2:
        for rank in range(2):
            b = ds.get_batch(step, rank=rank, world_size=2)
            cu, ids = b.cu_seqlens.tolist(), b.input_ids[0].numpy()
            assert cu[0] == 0 and cu[-1] == 80 and 40 in cu  # row start is a boundary
            for a, e in zip(cu[:-1], cu[1:], strict=True):
                seg = ids[a:e]
                assert seg[0] == user or (seg == tok.eos_id).all()  # an example or padding
                if seg[0] == user:
                    seen[epoch].append(tok.decode(seg).split("\n")[1])
        step += 1
    for prompts in seen.values():
        assert len(prompts) == len(set(prompts)) >= 6  # each example at most once per epoch (partial batch dropped)
    assert seen[0] != seen[1]  # reshuffled
    again = SFTDataset(tmp_path / "s.jsonl", tok, 40, 2, seed=1).get_batch(step - 1, rank=1, world_size=2)
    assert np.array_equal(again.labels, ds.get_batch(step - 1, rank=1, world_size=2).labels)


def test_sft_bad_records(tok, tmp_path):
    cases = [
        (['{"prompt": "a", "response": "b"}', "{oops"], "s.jsonl:2: invalid JSON"),
        (['{"prompt": "a"}'], "s.jsonl:1: expected string fields 'prompt' and 'response', or a 'messages' list"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "s.jsonl:1: every message needs a 'role'"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "s.jsonl:1: no assistant message"),
        (["[1, 2]"], "s.jsonl:1: expected a JSON object"),
    ]
    for records, message in cases:
        write_jsonl(tmp_path / "s.jsonl", records)
        with pytest.raises(DataError, match=message):
            SFTDataset(tmp_path / "s.jsonl", tok, seq_len=32, micro_batch_size=1)
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="fewer than one global batch"):
        SFTDataset(tmp_path / "s.jsonl", tok, seq_len=32, micro_batch_size=2).get_batch(0)


def test_sft_truncation_notes_are_one_clean_line_each(tok, tmp_path, capfd):
    import warnings

    records = [{"prompt": "long " * 40, "response": "x"}] * 3 + [{"prompt": "q", "response": "a"}] * 3
    write_jsonl(tmp_path / "s.jsonl", records + records[:2])  # the last 2 (both long) are held out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = SFTDataset(tmp_path / "s.jsonl", tok, seq_len=40, micro_batch_size=1, val_fraction=0.25)
        assert ds.val is ds.val and ds.val.num_truncated == 2
    assert caught == []
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == [
        "note: 3 of 6 SFT examples (training) are longer than seq_len=40 tokens and were truncated",
        "note: 2 of 2 SFT examples (validation) are longer than seq_len=40 tokens and were truncated",
    ]


def test_prepare_txt_and_jsonl_without_pyarrow(tok, tmp_path, monkeypatch):
    import sys

    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` now raises ImportError
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[1:]))
    prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tmp_path / "out", tokenizer=tok, progress=False)
    assert decoded_docs(tmp_path / "out", tok) == DOCS
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"c.parquet: reading Parquet/Arrow inputs needs pyarrow: pip install pyarrow"):
        prepare([str(tmp_path / "c.parquet")], tmp_path / "out2", tokenizer=tok, progress=False)


def test_bad_inputs_are_one_line_errors(tok, tmp_path, capsys):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "bad.json").write_text("{not json")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "state.json").write_text("{broken")
    (tmp_path / "a.txt").write_text("some text to train on, some text to train on")
    cases = [
        (dict(inputs=[str(tmp_path / "ints.parquet")], tokenizer=tok), "ints.parquet: column 'text' holds int64"),
        (dict(inputs=[str(tmp_path / "a.txt")], tokenizer=str(tmp_path / "bad.json")), "bad.json: not a Hugging Face"),
        (dict(inputs=[str(hf)], tokenizer=tok), "hf/state.json: not a Hugging Face dataset file"),
        (dict(inputs=[str(tmp_path / "a.txt")], vocab_size=10**12), "vocab_size must be between 260 and 16,777,216"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataError, match=message) as e:
            prepare(out_dir=tmp_path / "out", progress=False, **kwargs)
        assert "\n" not in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out=.*file/ds is under .*file, which is a file"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "file" / "ds", tokenizer=tok, progress=False)
    capsys.readouterr()
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "small", vocab_size=100_000, progress=False)
    assert meta["vocab_size"] < 300
    assert f"the tokenizer has {meta['vocab_size']} tokens, not the 100,000 asked for" in capsys.readouterr().err


def test_long_documents_are_cut_where_tokens_do_not_change(tok, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = ["state", "gate", "expert", "token", "déjà", "✓", "x" * 150, "  ", "\n", "\n\n", "12345", "!?"]
    doc = "".join(rng.choice(words, size=3000) + " ")
    cut = prepare_mod.pieces(doc, max_chars=300)
    assert "".join(cut) == doc and len(cut) > 20 and all(len(p) <= 300 for p in cut)
    for a, b in zip(cut[:-1], cut[1:], strict=True):
        assert not a[-1].isspace() and b[0].isspace()  # cut before whitespace that follows a non-space
    assert prepare_mod.pieces("y" * 700, max_chars=300) == ["y" * 300, "y" * 300, "y" * 100]  # no whitespace
    monkeypatch.setattr(prepare_mod, "PIECE_CHARS", 300)
    monkeypatch.setattr(prepare_mod, "ENCODE_CHARS", 1000)
    (tmp_path / "long.txt").write_text(doc)
    prepare([str(tmp_path / "long.txt")], tmp_path / "out", tokenizer=tok, progress=False)
    tokens, offsets, _ = read_dir(tmp_path / "out")
    assert tokens[:-1].tolist() == tok.encode(doc)  # the whole document's tokens, then EOS
