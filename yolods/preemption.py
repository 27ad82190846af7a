"""Stop requests (SIGTERM, SIGUSR1, SIGINT, a vanished launcher), honoured by every rank together.

torchrun and the deepspeed launcher pass SIGTERM/SIGINT on to the ranks and kill them 30 s later; SLURM sends
SIGTERM (or the signal `--signal` names) before preempting. The handler only sets a flag: the training loop
asks all ranks at each step whether any of them was told to stop, and at the next optimizer-step boundary
every rank saves its part of a checkpoint and leaves with 143 (SIGTERM, SIGUSR1) or 130 (Ctrl-C). A second
Ctrl-C quits at once. Dataloader workers ignore these signals (see `signals_blocked`): a stop is the training
process's to carry out, and a worker killed by it would turn the stop into a crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

from yolods import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_CODE = 128 + signal.SIGTERM  # the shell's convention for "terminated"; schedulers requeue on it


def exit_code_for(signum: int) -> int:
    """143 for SIGTERM and SIGUSR1 (requeue me), 130 for Ctrl-C, as shells report them."""
    return 128 + signal.SIGINT if signum == signal.SIGINT else EXIT_CODE


class TrainingInterrupted(Exception):  # a request to leave, not an error
    """Raised after the checkpoint of an interrupted run is safely on disk; `exit_code` is the process's."""

    def __init__(self, tag: str, *, exit_code: int = EXIT_CODE):
        super().__init__(tag)
        self.exit_code = exit_code


class StopRequest:
    """A flag set by a stop signal on this rank; `agreed()` is True on all ranks once any rank has one.

    Examples:
        >>> stop = StopRequest().install()
        >>> if stop.agreed(): ...  # a collective: every rank calls it at the same step
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.cause: str | None = None  # what this rank was stopped by, for the closing message
        self.agreed_exit_code = EXIT_CODE
        self._inferred = False  # set by `request`: a watchdog's guess, which a signal that arrives later corrects

    def install(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            print("\nyolods: second Ctrl-C: quitting without a checkpoint", file=sys.stderr, flush=True)
            kill_worker_processes()
            os._exit(exit_code_for(signal.SIGINT))
        if self.received is None or self._inferred:
            # a launcher that is killed with its ranks' group may be seen gone before Python runs this handler
            self.received, self._inferred = signal.Signals(signum), False
            self.cause = self.received.name
            if signum == signal.SIGINT and dist.is_main_process():
                print("\nyolods: Ctrl-C: saving a checkpoint at the next step (Ctrl-C again quits at once)", flush=True)

    def request(self, signum: signal.Signals, cause: str) -> None:
        """Ask for a stop as if `signum` had arrived, for `cause` (the launcher watchdog uses it)."""
        if self.received is None:
            self.received, self.cause, self._inferred = signum, cause, True

    def agreed(self) -> bool:
        """True on every rank if any rank was asked to stop; a collective (one tiny all-reduce)."""
        code = dist.max_over_ranks(exit_code_for(self.received) if self.received is not None else 0)
        if code:
            self.agreed_exit_code = code
        return bool(code)


@contextlib.contextmanager
def signals_end_the_process() -> Iterator[None]:
    """Let a stop signal end the process at once, as if no handler were installed, for the duration.

    For joining the process group: it waits for every rank (up to the collective timeout, 30 min) inside torch's
    C++ rendezvous, where Python's handlers cannot run, so a SIGTERM or Ctrl-C would go unanswered until then.
    Nothing has been trained yet, so there is nothing to save; the shell reports 143 or 130 as for a stop.
    """
    previous = {signum: signal.signal(signum, signal.SIG_DFL) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold stop signals back while dataloader workers are forked, so none reaches a worker before it ignores them.

    torch's worker loop installs a C handler that dies on SIGTERM; `ignore_stop_signals` (the workers'
    init function) replaces it, and a signal that arrives in between stays pending until then. In this process
    the signals are delivered when the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals() -> None:
    """In a dataloader worker: ignore stop signals (the training process handles them), then unblock them."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def kill_worker_processes() -> None:
    """SIGKILL this process's multiprocessing children (its dataloader workers) before it leaves with os._exit.

    os._exit skips the DataLoader's shutdown, which would tell the workers to stop. A worker still in its init
    function (the mosaic buffer reads images) when the parent dies has not yet started torch's watchdog; it then
    takes PID 1 for its parent, never sees it die, and waits on its index queue for good (found: 2 of 8 aborted
    `--workers 2` runs left one). It ignores SIGTERM (above), so only SIGKILL ends it.
    """
    import multiprocessing

    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):  # already gone, or not ours to signal
            child.kill()
