"""Evaluation: lm-evaluation-harness tasks (`linear-moe eval --tasks`) and perplexity on held-out text
(docs/evaluation.md). The harness is an optional extra (`pip install 'linear-moe[eval]'`), imported only by
`run_tasks` and `linear_moe.eval.harness`."""

from .run import run_perplexity, run_tasks
from .scoring import Perplexity, perplexity, score_continuations, sequence_logprob

__all__ = ["Perplexity", "perplexity", "run_perplexity", "run_tasks", "score_continuations", "sequence_logprob"]
