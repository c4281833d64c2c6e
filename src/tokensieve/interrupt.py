"""Ctrl-C during a long command: keep what is done, say where it is and how to continue.

A training step stopped half way (parameters updated, step counter not yet) cannot be saved
as any step, so inside :func:`stop_at_step_end` the first Ctrl-C only asks the loop to stop at
the next step boundary, where it saves and raises :class:`Interrupted`; a second Ctrl-C stops
at once (the last periodic checkpoint stays).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C after saving. ``saved``: what was kept and where; ``resume``: how to
    continue. The CLI prints ``saved; resume`` on one line and exits with 130."""

    def __init__(self, saved: str, resume: str):
        super().__init__(f"{saved}; {resume}")
        self.saved, self.resume = saved, resume


class StopRequest:
    """Set by the first Ctrl-C inside :func:`stop_at_step_end`; the loop reads ``requested``."""

    def __init__(self):
        self.requested = False
        self.pid = os.getpid()

    def _on_sigint(self, _signum, _frame) -> None:
        # A forked data worker inherits this handler; Ctrl-C reaches it too, and it should just end.
        if self.requested or os.getpid() != self.pid:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step to save it (Ctrl-C again stops at once, without saving it)",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_at_step_end() -> Iterator[StopRequest]:
    """Defer Ctrl-C (SIGINT) to the loop's step boundaries while the block runs. Outside the
    main thread, where no signal handler can be set, Ctrl-C stops at once as usual."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop._on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
