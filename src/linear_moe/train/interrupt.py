"""Graceful stops: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before killing a job) end a run after
the current step, with a checkpoint.

    with StopSignals() as stop:       # or: stop = StopSignals().install() ... stop.restore()
        while ...:
            train_step()
            if stop.signum is not None:
                save(); raise Interrupted(stop.signum, step, path)

The first signal only sets `signum`; a second one restores the default handlers and re-sends itself, so a
second Ctrl-C still stops at once. Handlers are installed only in the main thread (elsewhere nothing changes).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal after saving a checkpoint; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = f"; checkpoint {checkpoint}, continue with train.resume=auto" if checkpoint else ""
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}{where}")


class StopSignals:
    """Context manager recording the first SIGINT/SIGTERM in `signum` instead of stopping the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now, the default way
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
