"""Data pipeline: tokenizer, `prepare` (corpora -> token directory), packed pretraining batches, SFT batches."""

from .errors import DataError
from .packed import IGNORE_INDEX, Batch, PackedDataset
from .prepare import iter_documents, prepare
from .sft import SFTDataset, chat_prompt, encode_chat
from .tokenizer import ASSISTANT, EOS, SPECIAL_TOKENS, SYSTEM, USER, Tokenizer

__all__ = [
    "ASSISTANT",
    "EOS",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "USER",
    "Batch",
    "DataError",
    "PackedDataset",
    "SFTDataset",
    "Tokenizer",
    "chat_prompt",
    "encode_chat",
    "iter_documents",
    "prepare",
]
