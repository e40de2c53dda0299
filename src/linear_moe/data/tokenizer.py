"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers` byte-level BPE.

Load any `tokenizer.json` or train a byte-level BPE on a corpus. Special tokens: ``<|endoftext|>`` (EOS and
document separator), ``<|system|>``, ``<|user|>``, ``<|assistant|>`` (SFT chat template, see `sft.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import DataError

EOS = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (EOS, SYSTEM, USER, ASSISTANT)
_EOS_FALLBACKS = (EOS, "</s>", "<eos>", "<|end_of_text|>")
MAX_VOCAB = 1 << 24  # the BPE trainer allocates per requested token (and aborts the process near 2**32)


class Tokenizer:
    """`encode(text) -> list[int]`, `decode(ids) -> str`, `eos_id`, `vocab_size`, `token_id(special)`."""

    def __init__(self, hf: _HFTokenizer):
        self.hf = hf
        eos = next((t for t in _EOS_FALLBACKS if hf.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer has no end-of-text token; expected one of {', '.join(_EOS_FALLBACKS)}")
        self.eos_id: int = hf.token_to_id(eos)
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json` (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON / unknown models
            lines = str(e).strip().splitlines()
            raise DataError(
                f"{path}: not a Hugging Face tokenizer.json ({lines[0] if lines else type(e).__name__})"
            ) from None
        try:
            return cls(hf)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) with `SPECIAL_TOKENS` first.

        Every byte is in the initial alphabet, so any text round-trips: `decode(encode(s)) == s`.
        """
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        low = len(alphabet) + len(SPECIAL_TOKENS)
        if not low <= vocab_size <= MAX_VOCAB:
            raise DataError(f"vocab_size must be between {low} and {MAX_VOCAB:,}; got {vocab_size:,}")
        hf = _HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (no EOS added; special-token strings inside `text` map to their ids)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text (special tokens are kept as their strings)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        """Id of a special token; one-line error when the tokenizer lacks it."""
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise DataError(f"tokenizer has no token {token!r} (needed for chat data; retrain with `prepare`)")
        return tid
