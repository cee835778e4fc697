"""Ctrl-C during training: the first one asks the loop to save a checkpoint after the current step and stop
(an interrupt in the middle of ``optimizer.step`` would leave half-updated weights); a second one stops at once."""

from __future__ import annotations

import signal
import threading

from ..progress import log


class StopOnInterrupt:
    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("[yellow]distill: Ctrl-C — saving a checkpoint after this step (press again to stop now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
