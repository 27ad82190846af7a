"""Fail fast, fail together: one rank's error ends the whole job in seconds, never at a collective timeout.

How a fault travels:
- A rank that raises calls `abort_job`: it prints its error once, prefixed with its rank, writes the full
  traceback to RUN_DIR/logs/rankN.log, sets an abort key in the job's TCPStore (the rendezvous store every
  launcher provides) and leaves at once with exit code 1, without the barriers of a clean shutdown.
- Every rank runs a `JobWatchdog` thread that polls that key twice a second. A rank blocked in a collective
  (gloo, NCCL, a barrier) cannot notice a dead peer by itself, so the watchdog ends it from the side with
  `os._exit(1)`; a store that stops answering means its host (rank 0, or the launcher) is gone: the same.
- The same watchdog turns a vanished launcher into a stop request: the deepspeed runner does not pass SIGTERM
  on to its ranks on one node, so when it (or the launcher that started this rank) is gone, the ranks save a
  checkpoint at the next step and leave as if they had been sent SIGTERM.
Launchers also end the remaining ranks once one exits non-zero (torchrun and deepspeed within a second); the
watchdog makes the job end the same way where they do not (srun without --kill-on-bad-exit, hung NCCL calls).
Under `torchrun --max-restarts` that quick exit 1 of every rank is what lets the agent start the group again; the
new group's store is namespaced by restart attempt (dist.init_distributed), so no abort key or peer address of the
group before reaches it, and it continues the run from its newest complete checkpoint (checkpoint.continue_launcher_job).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import NoReturn

from yolods import dist, env
from yolods.preemption import StopRequest

ABORT_KEY = "yolods/abort"
POLL_S = 0.5
FAILURE_EXIT_CODE = 1


def _job_store():
    """The default process group's TCPStore (private in torch, but the one store every launcher sets up)."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return torch_dist.distributed_c10d._get_default_store()


def _launcher_gone() -> bool:
    """True once the process that launched this rank (or, under the deepspeed launcher, its runner) has exited."""
    if not env.LAUNCHED_BY_LAUNCHER:
        return False  # a plain `python -m yolods.train`: the shell's SIGHUP covers a closed terminal
    if os.getppid() != env.LAUNCH_PARENT_PID:
        return True  # re-parented: the launcher died without stopping this rank
    return env.LAUNCHED_BY_DEEPSPEED and env.parent_of(env.LAUNCH_PARENT_PID) != env.LAUNCH_GRANDPARENT_PID


class JobWatchdog:
    """A daemon thread that ends this rank when another has failed, and asks for a stop when the launcher is gone.

    Examples:
        >>> watchdog = JobWatchdog(stop_request).start()  # after the process group exists
        >>> ...
        >>> watchdog.stop()  # before the clean shutdown's barrier, when rank 0 may close the store
    """

    def __init__(self, stop_request: StopRequest):
        self.stop_request = stop_request
        self.store = _job_store()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="yolods-watchdog", daemon=True)

    def start(self) -> JobWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * POLL_S)

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            if _launcher_gone() and self.stop_request.received is None:
                # every rank that notices says so: rank 0 may be stopped by a peer's notice before its own poll
                print(
                    f"yolods: rank {dist.get_rank()}: the launcher is gone: saving a checkpoint at the next step",
                    flush=True,
                )
                self.stop_request.request(signal.SIGTERM, cause="the launcher's exit")
            failed_rank = _failed_rank(self.store)
            if failed_rank is not None and not self._stopped.is_set():
                _leave(f"yolods: rank {dist.get_rank()}: stopping, {failed_rank}")


def _failed_rank(store) -> str | None:
    """Who failed, as a phrase, if another rank has aborted the job or the store's host is gone; else None."""
    if store is None:
        return None
    try:
        if store.check([ABORT_KEY]):
            return f"rank {store.get(ABORT_KEY).decode()} failed"
    except Exception:  # DistNetworkError and friends: the store's host (rank 0 or the launcher) has exited
        return "the job's store stopped answering (rank 0 or the launcher exited)"
    return None


def _leave(message: str | None) -> NoReturn:
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(FAILURE_EXIT_CODE)  # no atexit, no barrier: the peers are gone or going


def abort_job(error: BaseException, *, run_dir: Path | None) -> NoReturn:
    """End this rank after an unexpected error, and with it the job. Never returns.

    Prints one line naming the rank and the error (or, when another rank failed first and this error is only
    the echo of it, one line saying so) and keeps the traceback in RUN_DIR/logs/rankN.log.
    """
    rank = dist.get_rank()
    store = _job_store()
    earlier = _failed_rank(store)
    if earlier is not None:
        _leave(f"yolods: rank {rank}: stopping, {earlier}")
    if store is not None:
        try:
            store.set(ABORT_KEY, str(rank))
        except Exception:
            pass  # the store is gone too; the launcher or the peers' failed collectives end the job
    details = "".join(traceback.format_exception(error))
    log_path = _write_log(run_dir, rank, details)
    summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
    where = f"traceback in {log_path}" if log_path else details.rstrip()
    # on a line of its own: rank 0's progress bar may hold the cursor mid-line
    _leave(f"\nyolods: rank {rank}: error: {type(error).__name__}: {summary}\n({where})")


def _write_log(run_dir: Path | None, rank: int, details: str) -> Path | None:
    if run_dir is None:
        return None
    try:
        path = run_dir / "logs" / f"rank{rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(details)
        return path
    except OSError:
        return None  # a full or read-only disk may be the fault itself: the traceback goes to stderr instead
