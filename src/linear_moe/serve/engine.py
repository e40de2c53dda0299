"""Continuous batching for the server: requests join and leave the running batch between decode steps.

One thread owns the model. Between two decode steps it prefills the requests that arrived (packed, as one batch)
and appends their rows to the batch's states; rows that finished or whose client went away are dropped. Since every
row carries its own state (recurrent state, short-conv state, KV cache slots), joining and dropping rows is a
gather along the batch dimension, and a row's tokens do not depend on the other rows.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..generate.engine import TextStream, check_fits, decode_step, prefill
from ..generate.sampling import SamplingParams, sample_next
from ..generate.states import States, join_rows, select_rows

Event = tuple[str, object]  # ("text", str) | ("done", finish_reason) | ("error", message)


@dataclass
class Request:
    """One completion: prompt ids, how to sample, when to stop; events go to `emit` (thread-safe)."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    new_tokens: int = 0

    def cancel(self) -> None:
        """The client went away: the row leaves the batch before the next step."""
        self.cancelled.set()


def asyncio_emitter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> Callable[[Event], None]:
    """`emit` for a request served by an asyncio handler: events are put on `q` from the engine thread."""
    return lambda event: loop.call_soon_threadsafe(q.put_nowait, event)


class BatchEngine:
    """Serves `Request`s with one model on a background thread; at most `max_batch` rows decode together, each with
    a KV cache of `max_seq_len` slots in softmax layers. `stats` counts steps, the largest batch and cancellations."""

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 16, max_seq_len: int = 2048, seed: int = 0):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.pending: queue.Queue[Request | None] = queue.Queue()
        self.stats = {"steps": 0, "max_batch": 0, "cancelled": 0, "finished": 0}
        self.active = 0
        self._thread = threading.Thread(target=self._run, name="linear-moe-engine", daemon=True)
        self._thread.start()

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """ValueError (a 400 for the client) when the request cannot be served."""
        if max_new_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_new_tokens}")
        check_fits(self.model, [prompt_len], max_new_tokens, self.max_seq_len)

    def submit(self, request: Request) -> None:
        self.check(len(request.prompt_ids), request.max_new_tokens)
        self.pending.put(request)

    def close(self) -> None:
        self.pending.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        rows: list[tuple[Request, TextStream]] = []
        states: States | None = None
        logits_BV: torch.Tensor | None = None
        with torch.no_grad():
            while True:
                new = self._take(block=not rows)
                if new is None:
                    return
                if new:
                    try:
                        new_logits, new_states = prefill(self.model, [r.prompt_ids for r in new], self.max_seq_len)
                    except Exception as e:  # noqa: BLE001 - reported to the clients, the engine goes on
                        for r in new:
                            r.emit(("error", f"{type(e).__name__}: {e}"))
                        new = []
                    else:
                        rows += [(r, TextStream(self.tokenizer, r.stop)) for r in new]
                        states = new_states if states is None else join_rows(states, new_states)
                        logits_BV = new_logits if logits_BV is None else torch.cat([logits_BV, new_logits])
                if not rows:
                    continue
                self.active = len(rows)
                self.stats["max_batch"] = max(self.stats["max_batch"], len(rows))
                tokens_B = sample_next(logits_BV, [r.sampling for r, _ in rows], None, self.generator)
                keep = [
                    i for i, (row, tok) in enumerate(zip(rows, tokens_B.tolist(), strict=True)) if self._push(row, tok)
                ]
                if len(keep) < len(rows):
                    idx = torch.tensor(keep, dtype=torch.long, device=tokens_B.device)
                    rows = [rows[i] for i in keep]
                    states, tokens_B = select_rows(states, idx), tokens_B[idx]
                self.active = len(rows)
                if not rows:
                    states, logits_BV = None, None
                    continue
                logits_BV, states = decode_step(self.model, tokens_B, states)
                self.stats["steps"] += 1

    def _take(self, block: bool) -> list[Request] | None:
        """Requests that arrived (waiting for one when the batch is empty); None when the engine is closed."""
        taken: list[Request] = []
        try:
            item = self.pending.get(block=block)
            while True:
                if item is None:
                    return None
                if not item.cancelled.is_set():
                    taken.append(item)
                if len(taken) + self.active >= self.max_batch:
                    break
                item = self.pending.get_nowait()
        except queue.Empty:
            pass
        return taken

    def _push(self, row: tuple[Request, TextStream], token: int) -> bool:
        """Hand one new token to its request; False when the row is done (finished or cancelled)."""
        request, stream = row
        if request.cancelled.is_set():
            self.stats["cancelled"] += 1
            return False
        reason = None
        if request.stop_at_eos and token == self.tokenizer.eos_id:
            reason = "eos"
        else:
            request.new_tokens += 1
            if text := stream.push(token):
                request.emit(("text", text))
            if stream.stopped:
                reason = "stop"
            elif request.new_tokens >= request.max_new_tokens:
                reason = "length"
        if reason is None:
            return True
        if (rest := stream.flush()) and reason != "stop":
            request.emit(("text", rest))
        request.emit(("done", reason))
        self.stats["finished"] += 1
        return False


_ids = itertools.count()


def next_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"
