"""Stop signals: SIGTERM (a preempted job, SLURM's scancel, a container stop) and SIGINT (Ctrl-C)
ask the run to stop at the next step boundary, save a checkpoint, and exit with EXIT_STOPPED."""

from __future__ import annotations

import signal

# `sftkit train` stopped by SIGTERM/SIGINT after saving a checkpoint exits with this code (sysexits'
# EX_TEMPFAIL, "try again later"): not 0, which means finished, and not 2, a mistake to fix.
EXIT_STOPPED = 75


class StoppedWaiting(Exception):
    """A stop signal arrived while the loop waited for the next step's data."""


class StopRequest:
    """SIGTERM/SIGINT (a preempted job, Ctrl-C): finish the step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        self.signal: str | None = None
        self.waiting = False  # blocked on the data workers: a signal then ends the wait at once
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.signal = signal.Signals(signum).name
        if self.waiting:  # a step boundary: nothing is half done, and a hung worker must not hold the run
            raise StoppedWaiting()

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
