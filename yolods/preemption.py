"""Stop requests from the scheduler or the launcher (SIGTERM, SIGUSR1), honoured by every rank together.

torchrun and the deepspeed launcher pass SIGTERM on to the workers and kill them 30 s later; SLURM sends
SIGTERM (or the signal `--signal` names) before preempting. The handler only sets a flag: the training loop
asks all ranks at each step whether any of them was told to stop, and at the next optimizer-step boundary
every rank saves its part of a checkpoint and leaves.
"""

from __future__ import annotations

import signal

from yolods import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODE = 128 + signal.SIGTERM  # the shell's convention for "terminated"; schedulers requeue on it


class TrainingInterrupted(Exception):  # a request to leave, not an error
    """Raised after the checkpoint of an interrupted run is safely on disk."""


class StopRequest:
    """A flag set by a stop signal on this rank; `agreed()` is True on all ranks once any rank has one.

    Examples:
        >>> stop = StopRequest().install()
        >>> if stop.agreed(): ...  # a collective: every rank calls it at the same step
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def install(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def agreed(self) -> bool:
        return dist.any_rank(self.received is not None)
