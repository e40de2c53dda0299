"""Supervised finetuning data: chat-formatted JSONL -> packed batches with prompt tokens masked.

Records are `{"prompt": str, "response": str}` (keys configurable) or `{"messages": [{"role": "system" | "user" |
"assistant", "content": str}, ...]}` with at least one assistant message. Chat template, per message::

    <|system|>\\n{content}\\n        (system, user: no targets)
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}<|endoftext|>    (targets: the content tokens and the EOS)

The role tokens and "\\n" pieces are encoded separately, so the prompt/response boundary is exact. Examples are
packed greedily (whole examples, in an order shuffled by (seed, epoch)) into rows of `seq_len` tokens, padded
with EOS inputs and ignored targets; `cu_seqlens` starts a segment at every example and at the padding.
Examples longer than `seq_len` are truncated (counted in `num_truncated`, reported in one line on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .errors import DataError
from .packed import IGNORE_INDEX, Batch, make_batch
from .tokenizer import ASSISTANT, SYSTEM, USER, Tokenizer

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def _parse_record(rec: object, prompt_key: str, response_key: str, where: str) -> list[dict]:
    """One JSONL record -> a list of messages; one-line DataError naming `where` on bad input."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: every message needs a 'role' ({', '.join(ROLES)}) and a string 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message (nothing to train on)")
        return msgs
    if isinstance(rec.get(prompt_key), str) and isinstance(rec.get(response_key), str):
        return [{"role": "user", "content": rec[prompt_key]}, {"role": "assistant", "content": rec[response_key]}]
    raise DataError(f"{where}: expected string fields '{prompt_key}' and '{response_key}', or a 'messages' list")


def encode_chat(tok: Tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Messages -> (tokens [L] int64, is_target [L] bool): True on assistant content tokens and their EOS."""
    newline = tok.encode("\n")
    ids: list[int] = []
    target: list[bool] = []
    for m in messages:
        head = [tok.token_id(ROLES[m["role"]])] + newline
        if m["role"] == "assistant":
            body = tok.encode(m["content"]) + [tok.eos_id]
        else:
            body = tok.encode(m["content"]) + newline
        ids += head + body
        target += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    return np.asarray(ids, dtype=np.int64), np.asarray(target, dtype=bool)


def chat_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a generation prompt: the rendered messages, then `<|assistant|>\\n` (the model continues)."""
    ids = encode_chat(tok, messages)[0].tolist() if messages else []
    return ids + [tok.token_id(ASSISTANT)] + tok.encode("\n")


def load_sft_examples(
    path: str | Path, tok: Tokenizer, prompt_key: str = "prompt", response_key: str = "response"
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read and tokenize a chat JSONL file into (tokens, is_target) pairs, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SFT file not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            examples.append(encode_chat(tok, _parse_record(rec, prompt_key, response_key, where)))
    if not examples:
        raise DataError(f"no SFT records in {path}")
    return examples


class SFTDataset:
    """Packed SFT micro-batches; `get_batch(step, rank, world_size)` is a pure function of (seed, step, rank).

    Epoch `e` shuffles the examples with `np.random.default_rng([seed, e])` and packs them greedily into rows;
    global batch `i` of the epoch is rows `[i*W*B, (i+1)*W*B)`, rank `r` takes its `r`-th block of `B` rows,
    and the rows that do not fill a whole global batch are dropped. `val` holds the last `val_fraction` of
    the examples (unshuffled order is kept for the split).
    """

    def __init__(
        self,
        path: str | Path | None,
        tokenizer: Tokenizer | str | Path,
        seq_len: int,
        micro_batch_size: int,
        seed: int = 0,
        prompt_key: str = "prompt",
        response_key: str = "response",
        val_fraction: float = 0.0,
        examples: list[tuple[np.ndarray, np.ndarray]] | None = None,
        split: str = "training",
    ):
        self.tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
        if seq_len < 2 or micro_batch_size < 1:
            raise DataError(f"seq_len must be >= 2 and micro_batch_size >= 1; got {seq_len}, {micro_batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1); got {val_fraction}")
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        if examples is None:
            examples = load_sft_examples(path, self.tok, prompt_key, response_key)
        n_val = int(np.ceil(val_fraction * len(examples))) if val_fraction > 0 else 0
        if n_val >= len(examples):
            raise DataError(f"val_fraction={val_fraction} leaves no training examples ({len(examples)} in total)")
        kept = examples[: len(examples) - n_val]
        self.examples = [(ids[:seq_len], tgt[:seq_len]) for ids, tgt in kept]
        self.num_truncated = sum(len(ids) > seq_len for ids, _ in kept)
        if self.num_truncated:
            print(
                f"note: {self.num_truncated} of {len(kept)} SFT examples ({split}) are longer than seq_len={seq_len} "
                "tokens and were truncated",
                file=sys.stderr,
            )
        self.vocab_size = self.tok.vocab_size
        self.num_tokens = sum(len(ids) for ids, _ in self.examples)
        self._epoch_rows: list[int] = []  # rows of each epoch packed so far
        self._cached: tuple[int, list[list[int]]] | None = None  # (epoch, rows of example indices)
        val_examples = examples[len(examples) - n_val :] if n_val else []
        self.val: SFTDataset | None = None  # the held-out examples, built once
        if val_examples:
            self.val = SFTDataset(
                None, self.tok, seq_len, micro_batch_size, seed, examples=val_examples, split="validation"
            )

    def _pack(self, epoch: int) -> list[list[int]]:
        """Rows (lists of example indices) of `epoch`: greedy packing in the epoch's shuffled order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        rows: list[list[int]] = []
        used = self.seq_len  # forces a new row for the first example
        for i in order.tolist():
            n = len(self.examples[i][0])
            if used + n > self.seq_len:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        self._cached = (epoch, rows)
        return rows

    def _locate(self, step: int, world_size: int) -> tuple[int, int]:
        """Global batch index `step` -> (epoch, batch index inside the epoch)."""
        per_batch = world_size * self.micro_batch_size
        epoch = 0
        while True:
            if epoch == len(self._epoch_rows):
                self._epoch_rows.append(len(self._pack(epoch)))
            n_batches = self._epoch_rows[epoch] // per_batch
            if n_batches == 0:
                raise DataError(
                    f"the SFT data packs into {self._epoch_rows[epoch]} rows of {self.seq_len} tokens, fewer than "
                    f"one global batch ({per_batch} rows); lower the micro-batch size or add data"
                )
            if step < n_batches:
                return epoch, step
            step -= n_batches
            epoch += 1

    def epoch_of(self, step: int, world_size: int = 1) -> int:
        """The epoch that micro-batch `step` falls in."""
        return self._locate(step, world_size)[0]

    def get_batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        """Micro-batch `step` for `rank`: input_ids/labels [1, B*T], cu_seqlens at example starts (+ padding)."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, {world_size}); got {rank}")
        T, B = self.seq_len, self.micro_batch_size
        epoch, i = self._locate(step, world_size)
        first = (i * world_size + rank) * B
        rows = self._pack(epoch)[first : first + B]
        ids_BT = np.full((B, T), self.tok.eos_id, dtype=np.int64)
        labels_BT = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        starts = []
        for b, row in enumerate(rows):
            pos, row_starts = 0, []
            for j in row:
                ids_L, tgt_L = self.examples[j]
                L = len(ids_L)
                ids_BT[b, pos : pos + L] = ids_L
                # aligned labels: input t predicts token t+1 when that token is a target; the last token has none
                labels_BT[b, pos : pos + L - 1] = np.where(tgt_L[1:], ids_L[1:], IGNORE_INDEX)
                if pos:
                    row_starts.append(pos)
                pos += L
            if pos < T:
                row_starts.append(pos)  # padding is its own segment
            starts.append(np.asarray(row_starts, dtype=np.int64))
        return make_batch(ids_BT, labels_BT, starts)
