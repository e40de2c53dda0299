"""`prepare`: text / JSONL / Parquet / Hugging Face `save_to_disk` datasets / builtin corpora -> a token directory.

Output directory (see docs/data.md)::

    tokens.bin | tokens-00000.bin ...   token ids, np.uint16 (vocab < 65536) or np.uint32, read as one stream
    doc_offsets.npy                     int64 [n_docs + 1]: start offset of every document, then the total length
    tokenizer.json                      the Hugging Face tokenizer used
    meta.json                           vocab_size, dtype, n_tokens, n_docs, shards, eos_id, sources
    val/                                (val_fraction > 0) the last documents, same layout without tokenizer.json

Every document is stored as its tokens followed by EOS. The directory is built in a temporary sibling and
renamed into place at the end, so a failure never leaves a partial dataset.

Long documents are cut into pieces of at most `PIECE_CHARS` characters before the tokenizer is trained and
before encoding (a document's tokens are its pieces' tokens, concatenated), so memory stays bounded whatever
the document length. Cuts fall just before a whitespace character that follows a non-whitespace one
(preferring line breaks); no pre-token of a byte-level BPE spans such a point, so the tokens are exactly
those of the whole document.

pyarrow is imported only to read Parquet, Arrow and Hugging Face `save_to_disk` inputs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import check_directory_path
from .corpus import BUILTIN_PREFIX, builtin_documents
from .errors import DataError
from .tokenizer import Tokenizer

TEXT_EXTS = (".txt", ".md")
FORMATS = ".txt/.md, .jsonl, .parquet, a Hugging Face save_to_disk directory, builtin:python-docs"
_BLANK_LINES = re.compile(r"\n[ \t]*\n+")
PIECE_CHARS = 1 << 16  # longest piece of a document handed to the tokenizer at once
ENCODE_CHARS = 1 << 19  # characters encoded per tokenizer call
_CUT_AT_LINE = re.compile(r"\S(?=\n)")  # a non-whitespace character followed by a line break
_CUT_AT_SPACE = re.compile(r"\S(?=\s)")


# ----------------------------------------------------------------------------- readers


def _read_txt(path: Path, split_docs: bool) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    yield from (_BLANK_LINES.split(text) if split_docs else [text])


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field '{text_field}'")
            yield rec[text_field]


def _pyarrow(path: Path):
    """pyarrow, imported for a Parquet / Arrow input only; a one-line DataError when it is not installed."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 (the submodule is used as pyarrow.parquet)
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet/Arrow inputs needs pyarrow: pip install pyarrow (or linear-moe[data])"
        ) from None
    return pyarrow


def _text_column(table, text_field: str, where: str) -> Iterator[str]:
    pa = _pyarrow(Path(where))
    if text_field not in table.column_names:
        raise DataError(f"{where}: no column '{text_field}'; columns: {', '.join(table.column_names)}")
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{where}: column '{text_field}' holds {column.type}, not strings; choose a text column")
    for text in column.to_pylist():
        if text is not None:
            yield text


def _arrow_errors(path: Path, read: Iterator[str]) -> Iterator[str]:
    """`read`'s documents, with pyarrow's errors as one-line DataErrors naming `path`."""
    pa = _pyarrow(path)
    try:
        yield from read
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    pq = _pyarrow(path).parquet

    def read() -> Iterator[str]:
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column '{text_field}'; columns: {', '.join(pf.schema_arrow.names)}")
        for batch in pf.iter_batches(columns=[text_field]):
            yield from _text_column(batch, text_field, str(path))

    return _arrow_errors(path, read())


def _read_arrow(path: Path, text_field: str) -> Iterator[str]:
    """One `.arrow` file of a `save_to_disk` dataset (Arrow IPC stream; IPC file format accepted too)."""
    pa = _pyarrow(path)

    def read() -> Iterator[str]:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            yield from _text_column(batch, text_field, str(path))

    return _arrow_errors(path, read())


def _is_hf_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_json_object(path: Path, key: str) -> list:
    """`key` of the JSON object in `path` (a list); one-line DataError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key, [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{path}: not a Hugging Face dataset file ({_first_line(e)})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: '{key}' should be a list")
    return value


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read_hf_dataset(path: Path, text_field: str, split: str) -> Iterator[str]:
    """A `Dataset.save_to_disk` dir (state.json lists the .arrow files) or a `DatasetDict` dir (one split)."""
    if (path / "dataset_dict.json").is_file():
        splits = _read_json_object(path / "dataset_dict.json", "splits")
        if split not in splits:
            raise DataError(f"{path}: no split '{split}'; splits: {', '.join(map(str, splits))}")
        path = path / split
    for entry in _read_json_object(path / "state.json", "_data_files"):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DataError(f"{path / 'state.json'}: every _data_files entry needs a 'filename'")
        yield from _read_arrow(path / entry["filename"], text_field)


def _source_files(path: Path) -> list[Path]:
    """Files of a plain directory with a known extension, recursively, in sorted order."""
    exts = TEXT_EXTS + (".jsonl", ".parquet")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in exts and not p.name.startswith("."))


def _documents(source: str, text_field: str, split_docs: bool, hf_split: str) -> Iterator[str]:
    """All documents of one input (file, directory, HF dataset dir or builtin corpus), unfiltered."""
    if source.startswith(BUILTIN_PREFIX):
        yield from builtin_documents(source[len(BUILTIN_PREFIX) :])
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"input not found: {source}")
    if path.is_dir():
        if _is_hf_dataset(path):
            yield from _read_hf_dataset(path, text_field, hf_split)
            return
        for f in _source_files(path):
            yield from _documents(str(f), text_field, split_docs, hf_split)
        return
    readers = {
        ".jsonl": lambda: _read_jsonl(path, text_field),
        ".parquet": lambda: _read_parquet(path, text_field),
        ".arrow": lambda: _read_arrow(path, text_field),
        **{ext: lambda: _read_txt(path, split_docs) for ext in TEXT_EXTS},
    }
    if path.suffix not in readers:
        raise DataError(f"unknown input format '{path.suffix or path.name}' ({source}); valid: {FORMATS}, .arrow")
    try:
        yield from readers[path.suffix]()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def iter_documents(
    inputs: list[str], text_field: str = "text", split_docs: bool = False, hf_split: str = "train"
) -> Iterator[str]:
    """Non-blank documents of all `inputs`, in order. See `prepare` for the formats."""
    for source in inputs:
        for doc in _documents(source, text_field, split_docs, hf_split):
            if doc.strip():
                yield doc


def pieces(doc: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`doc` cut into pieces of at most `max_chars` characters (see the module docstring): just before a line
    break that follows a non-whitespace character, else before any such whitespace, else (no whitespace at all)
    at `max_chars`. `"".join(pieces(doc)) == doc`."""
    if len(doc) <= max_chars:
        return [doc]
    out, start = [], 0
    while len(doc) - start > max_chars:
        window = doc[start : start + max_chars]
        ends = [m.end() for m in _CUT_AT_LINE.finditer(window, max_chars // 2)]
        ends = ends or [m.end() for m in _CUT_AT_SPACE.finditer(window, max_chars // 2)] or [max_chars]
        out.append(window[: ends[-1]])
        start += ends[-1]
    out.append(doc[start:])
    return out


def _texts(docs: Iterator[str]) -> Iterator[str]:
    """The pieces of every document, in order (what the tokenizer trains on)."""
    for doc in docs:
        yield from pieces(doc)


# ----------------------------------------------------------------------------- writer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


class _TokenWriter:
    """Appends documents (ids + EOS) to `tokens.bin`, or to `tokens-XXXXX.bin` shards of `shard_tokens` tokens."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int | None):
        out.mkdir(parents=True)
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.offsets = [0]
        self.shards: list[dict] = []
        self._file = None

    def _open_shard(self) -> None:
        name = "tokens.bin" if self.shard_tokens is None else f"tokens-{len(self.shards):05d}.bin"
        self._file = open(self.out / name, "wb")  # noqa: SIM115 - closed in _close_shard / close
        self.shards.append({"file": name, "n_tokens": 0})

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None

    def add(self, ids_L: np.ndarray) -> None:
        pos = 0
        while pos < len(ids_L):
            if self._file is None:
                self._open_shard()
            room = len(ids_L) - pos
            if self.shard_tokens is not None:
                room = min(room, self.shard_tokens - self.shards[-1]["n_tokens"])
            self._file.write(ids_L[pos : pos + room].tobytes())
            self.shards[-1]["n_tokens"] += room
            pos += room
            if self.shard_tokens is not None and self.shards[-1]["n_tokens"] == self.shard_tokens:
                self._close_shard()
        self.offsets.append(self.offsets[-1] + len(ids_L))

    def close(self, meta: dict) -> dict:
        if self._file is not None:
            self._close_shard()
        np.save(self.out / "doc_offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        meta = {**meta, "n_tokens": self.offsets[-1], "n_docs": len(self.offsets) - 1, "shards": self.shards}
        (self.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return meta


# ----------------------------------------------------------------------------- prepare


def _check_out_dir(out: Path, overwrite: bool) -> None:
    check_directory_path(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output directory {out} exists and is not empty; pass overwrite=True (--overwrite)")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is moved aside first and deleted afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def prepare(
    inputs: list[str],
    out_dir: str | Path,
    tokenizer: str | Path | Tokenizer | None = None,
    vocab_size: int = 8192,
    text_field: str = "text",
    split_docs: bool = False,
    hf_split: str = "train",
    val_fraction: float = 0.0,
    shard_tokens: int | None = None,
    overwrite: bool = False,
    batch_docs: int = 256,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into the dataset directory `out_dir`; returns its meta.json contents.

    inputs: files or directories; `.txt`/`.md` (one document per file, or with `split_docs` one per block of
        text separated by blank lines), `.jsonl` (one document per line, string field `text_field`), `.parquet`
        (column `text_field`), a `datasets` `save_to_disk` directory (state.json + .arrow files; a DatasetDict
        directory uses split `hf_split`), a plain directory (all known files in it, recursively, sorted) or
        `builtin:python-docs`. Blank documents are skipped.
    tokenizer: a `tokenizer.json` path, a `Tokenizer`, or None to train a byte-level BPE of `vocab_size` on the
        inputs (an extra pass over the text).
    val_fraction: the last ceil(fraction * n_docs) documents go to `out_dir/val/` (at least 1 stays in train).
    shard_tokens: write `tokens-XXXXX.bin` shards of this many tokens instead of one `tokens.bin`.
    """
    out = Path(out_dir).resolve()
    _check_out_dir(out, overwrite)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1); got {val_fraction}")
    if shard_tokens is not None and shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive; got {shard_tokens}")

    def docs() -> Iterator[str]:
        return iter_documents(inputs, text_field, split_docs, hf_split)

    n_docs = sum(1 for _ in tqdm(docs(), desc="reading", unit="doc", disable=not progress))
    if n_docs == 0:
        raise DataError(f"no text found in {', '.join(inputs)}")
    n_val = math.ceil(val_fraction * n_docs) if val_fraction > 0 else 0
    if n_val >= n_docs:
        raise DataError(f"val_fraction={val_fraction} leaves no training documents (only {n_docs} documents)")

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = Tokenizer.from_file(tokenizer)
    else:
        tok = Tokenizer.train(_texts(docs()), vocab_size=vocab_size)
        if tok.vocab_size < vocab_size:
            tqdm.write(
                f"note: the tokenizer has {tok.vocab_size:,} tokens, not the {vocab_size:,} asked for: the text has "
                "no more pairs of tokens that occur at least twice (more text gives a larger vocabulary)",
                file=sys.stderr,
            )
    dtype = token_dtype(tok.vocab_size)
    meta = {"vocab_size": tok.vocab_size, "dtype": dtype.name, "eos_id": tok.eos_id, "sources": list(inputs)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        train_w = _TokenWriter(tmp, dtype, shard_tokens)
        val_w = _TokenWriter(tmp / "val", dtype, shard_tokens) if n_val else None
        tok.save(tmp / "tokenizer.json")
        eos_1 = np.asarray([tok.eos_id], dtype=dtype)
        bar = tqdm(total=n_docs, desc="tokenizing", unit="doc", disable=not progress)
        i = 0
        for chunk in _chunks(docs(), batch_docs):
            for ids_L in _encode_docs(tok, chunk, dtype):
                writer = train_w if i < n_docs - n_val else val_w
                writer.add(np.concatenate([ids_L, eos_1]))
                i += 1
            bar.update(len(chunk))
        bar.close()
        if i != n_docs:
            raise DataError(f"inputs changed while preparing ({n_docs} documents, then {i})")
        if val_w is not None:
            val_w.close(meta)
        result = train_w.close({**meta, "n_val_docs": n_val})
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _encode_docs(tok: Tokenizer, docs: list[str], dtype: np.dtype) -> Iterator[np.ndarray]:
    """The token ids of each document, encoded piece by piece in batches of about `ENCODE_CHARS` characters:
    the tokenizer's working memory (~150 bytes per character) never holds a whole long document."""
    split = [pieces(doc) for doc in docs]
    flat = [p for ps in split for p in ps]
    ids: list[np.ndarray] = []
    batch: list[str] = []
    size = 0
    for k, piece in enumerate(flat):
        batch.append(piece)
        size += len(piece)
        if size >= ENCODE_CHARS or k == len(flat) - 1:
            ids += [np.asarray(x, dtype=dtype) for x in tok.encode_batch(batch)]
            batch, size = [], 0
    pos = 0
    for ps in split:
        yield np.concatenate(ids[pos : pos + len(ps)]) if len(ps) > 1 else ids[pos]
        pos += len(ps)


def _chunks(it: Iterator[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
