"""SIGTERM/SIGINT as a request to stop after the current step (and save), agreed by all processes.

Schedulers send SIGTERM before preempting a job; Ctrl-C sends SIGINT. The first signal asks the
loop to finish the step it is on, save a checkpoint and exit 0; a second one aborts at once.
With several processes each may see the signal at a different step, and a process that stops
while another takes one more step would leave that one waiting in a collective forever, so
`StopRequest.agreed()` makes the decision collectively (an all-gather of one flag per step).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np


class StopRequest:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (and save); a second
    signal aborts at once. Handlers are installed only in the main thread."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.signal_name = ""
        self._log = log
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name:  # second signal: stop now, with the default behaviour
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name
        self._log(f"\n{self.signal_name} received: finishing this step and saving a checkpoint "
                  "(send it again to abort without saving).")

    def agreed(self) -> str:
        """The signal's name if this or any other process received one, else "". Collective:
        every process must call it at the same step."""
        if jax.process_count() == 1:
            return self.signal_name
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([bool(self.signal_name)], np.int32))
        if not np.any(flags):
            return ""
        return self.signal_name or "a signal (to another process)"

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
