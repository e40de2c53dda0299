"""`PackedDataset`: random windows of a prepared token directory, packed end to end with `cu_seqlens`.

Batch semantics (see docs/data.md): a batch is `B` rows of `T = seq_len` inputs laid end to end as one sequence
`[1, B*T]`. Row `b` reads the `T + 1` tokens `w` at a random offset: inputs `w[:T]`, labels `w[1:]` (labels are
already shifted: `labels[t]` is the target of `input_ids[t]`). A document is stored as its tokens + EOS; the EOS
stays the target of the document's last token, but the target of the EOS itself is the first token of the next
document and is ignored (-100). `cu_seqlens` has a boundary at every row start and every document start inside
a row, so no segment attends across documents or rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

IGNORE_INDEX = -100


@dataclass
class Batch:
    """One packed micro-batch. `num_tokens` counts the targets that are not IGNORE_INDEX."""

    input_ids: torch.Tensor  # [1, B*T] int64
    labels: torch.Tensor  # [1, B*T] int64, -100 = ignored
    cu_seqlens: torch.Tensor  # [N+1] int32, segment boundaries (0 ... B*T)
    num_tokens: int

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.cu_seqlens.to(device), self.num_tokens)


def make_batch(ids_BT: np.ndarray, labels_BT: np.ndarray, starts: list[np.ndarray]) -> Batch:
    """Pack rows into a Batch; `starts[b]` are the segment starts inside row b (excluding 0, ascending)."""
    B, T = ids_BT.shape
    bounds = [np.concatenate([[0], s]) + b * T for b, s in enumerate(starts)] + [np.asarray([B * T])]
    cu_N1 = np.concatenate(bounds).astype(np.int32)
    labels = torch.from_numpy(labels_BT.astype(np.int64).reshape(1, B * T))
    return Batch(
        input_ids=torch.from_numpy(ids_BT.astype(np.int64).reshape(1, B * T)),
        labels=labels,
        cu_seqlens=torch.from_numpy(cu_N1),
        num_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise DataError(f"{path} is not a prepared dataset (no meta.json); run `linear-moe prepare` first")
    return json.loads((path / "meta.json").read_text())


class TokenStream:
    """The shards of a dataset directory read as one token stream; memmaps are opened per read (no leak)."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.dtype = np.dtype(meta["dtype"])
        self.files = [path / s["file"] for s in meta["shards"]]
        sizes = [s["n_tokens"] for s in meta["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.n_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a fresh array."""
        out = np.empty(length, dtype=self.dtype)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            lo = start + pos - int(self.starts[i])
            n = min(length - pos, int(self.starts[i + 1]) - int(self.starts[i]) - lo)
            # a fresh memmap per read: a long-lived one keeps every touched page mapped
            mm = np.memmap(self.files[i], dtype=self.dtype, mode="r")
            out[pos : pos + n] = mm[lo : lo + n]
            del mm
            pos += n
            i += 1
        return out


class PackedDataset:
    """Random packed micro-batches from a directory written by `prepare`.

    `get_batch(step, rank, world_size)` is a pure function of (seed, step, rank): the `world_size * B` rows of
    global batch `step` start at offsets drawn by `np.random.default_rng([seed, step, 0])`, and rank `r` takes
    rows `[r * B, (r + 1) * B)`. So `world_size` data-parallel ranks together read exactly the rows one process
    reads with `micro_batch_size = world_size * B` (and one process reads what it read before ranks existed).
    `val` is a PackedDataset over `dir/val` (None without one).
    """

    def __init__(self, path: str | Path, seq_len: int, micro_batch_size: int, seed: int = 0):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len and micro_batch_size must be positive; got {seq_len}, {micro_batch_size}")
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.stream = TokenStream(self.path, self.meta)
        self.doc_offsets = np.load(self.path / "doc_offsets.npy")  # [n_docs + 1] int64
        self.vocab_size: int = self.meta["vocab_size"]
        self.num_tokens: int = self.stream.n_tokens
        if seq_len + 1 > self.num_tokens:
            raise DataError(
                f"sequence length {seq_len} is longer than the data ({self.num_tokens} tokens) in {self.path}; "
                "lower data.seq_len or add data"
            )

    @property
    def val(self) -> PackedDataset | None:
        if not (self.path / "val" / "meta.json").is_file():
            return None
        return PackedDataset(self.path / "val", self.seq_len, self.micro_batch_size, self.seed)

    def get_batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        """Rank `rank`'s share of micro-batch `step`: input_ids/labels [1, B*T], cu_seqlens [N+1]."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, {world_size}); got {rank}")
        T, B = self.seq_len, self.micro_batch_size
        rng = np.random.default_rng([self.seed, step, 0])
        offsets_WB = rng.integers(0, self.num_tokens - T, size=world_size * B)  # last valid: num_tokens - T - 1
        offsets_B = offsets_WB[rank * B : (rank + 1) * B]
        ids_BT = np.empty((B, T), dtype=np.int64)
        labels_BT = np.empty((B, T), dtype=np.int64)
        starts = []
        for b, o in enumerate(offsets_B.tolist()):
            w = self.stream.read(o, T + 1).astype(np.int64)
            ids_BT[b], labels_BT[b] = w[:-1], w[1:]
            # document starts s with o < s <= o + T: a segment starts at input s - o; the target at s - o - 1
            # (the previous document's EOS predicting the new document's first token) is ignored
            lo, hi = np.searchsorted(self.doc_offsets, [o + 1, o + T + 1])
            doc_starts = self.doc_offsets[lo:hi] - o
            labels_BT[b, doc_starts - 1] = IGNORE_INDEX
            starts.append(doc_starts[doc_starts < T])
        return make_batch(ids_BT, labels_BT, starts)
