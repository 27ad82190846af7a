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
- A rank whose whole process stops (SIGSTOP, a paused host, a host cut off the network), or whose main thread
  hangs in a live process (a deadlock, a call that never returns), neither raises nor exits, and no launcher
  notices: its peers would wait in their collective for the 30-minute timeout. So each watchdog also beats a
  counter in the store every HEARTBEAT_S, publishes how many train-step phases its main thread has finished, and
  watches the next rank's (a ring: every rank is watched by one other, a few store requests per rank per beat at
  any scale; see PeerPulse). A peer silent for HEARTBEAT_TIMEOUT_S, or stuck behind this rank's step for 1.5x
  that, ends the job naming it. A silent peer on the same host is killed, so that its launcher ends the job at
  once instead of after its 30 s grace for a process that cannot take SIGTERM; a stuck one prints its main
  thread's stack as it leaves. A store host that froze (rank 0 under deepspeed and srun) blocks the watchdog's
  store calls with no timeout at all (TCPStore's own does not bound them), so a second thread ends the rank
  when the watchdog stays stuck as long.
- A rank whose checkpoint write hangs (a file system that stopped answering) counts no progress, and neither do
  its peers, waiting for it in the checkpoint's barrier. So each rank watches its own writes (WriteWatch): a write
  that moves no bytes for 4x HEARTBEAT_TIMEOUT_S ends the job, naming the rank. The newest complete checkpoint
  is kept: the unfinished one is never marked complete.
Launchers also end the remaining ranks once one exits non-zero (torchrun and deepspeed within a second); the
watchdog makes the job end the same way where they do not (srun without --kill-on-bad-exit, hung NCCL calls).
Under `torchrun --max-restarts` that quick exit 1 of every rank is what lets the agent start the group again; the
new group's store is namespaced by restart attempt (dist.init_distributed), so no abort key or peer address of the
group before reaches it, and it continues the run from its newest complete checkpoint (checkpoint.continue_launcher_job).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from yolods import dist, env
from yolods.preemption import StopRequest, kill_worker_processes

ABORT_KEY = "yolods/abort"  # holds the phrase that names who failed: "rank 3 failed"
# Set by abort_job before it sets ABORT_KEY: this rank's own watchdog then leaves the report to the main thread
# (seen once in CI: it polled the key before the main thread had printed, and said "rank 1: stopping, rank 1 failed")
_ABORTING = threading.Event()
HEARTBEAT_KEY = "yolods/heartbeat/{rank}"
FINISHED_KEY = "yolods/finished/{rank}"  # set when a rank leaves cleanly: its silence from then on is no fault
PROCESS_KEY = "yolods/process/{rank}"  # 'host pid start-time' of each rank
PROGRESS_KEY = "yolods/progress/{rank}"  # train-step phases and val batches each rank's main thread has finished
POLL_S = 0.5
HEARTBEAT_S = 2.0  # or a quarter of the timeout, if shorter
# Long enough for the longest legitimate stall of a live process's threads (a big pickle load holding the GIL
# for a few seconds, a ZeRO checkpoint write), short enough that a frozen rank ends the job within a minute.
# At least 4 s: below that the watchdog's own 0.5 s polling could not tell a silent peer from jitter.
HEARTBEAT_TIMEOUT_S = max(4.0, float(os.environ.get("YOLODS_HEARTBEAT_TIMEOUT_S", 30)))
# A rank that stays behind the others in its train step for 1.5 x that (45 s) is stuck. Ranks in step skew by
# well under a second, but a false alarm ends a healthy job: the extra margin costs a rare fault 15 s.
STUCK_TIMEOUT_FACTOR = 1.5
# A checkpoint write that moves no bytes for 4 x that (2 minutes) hangs. Longer than the stuck timeout because a
# write can rightly move none for a while: one call carrying a whole tensor counts its bytes only when it returns,
# and closing a large file on a slow network file system waits for the server to take all of it.
WRITE_STALL_FACTOR = 4.0
FAILURE_EXIT_CODE = 1


def _job_store():
    """A client of the default process group's store (the one store every launcher sets up; private in torch).

    Its own connection: a watchdog call blocked on it never holds up the process group's client.
    """
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    store = torch_dist.distributed_c10d._get_default_store()
    try:
        return store.clone() if hasattr(store, "clone") else store  # older torch: share the group's client
    except Exception:  # DistNetworkError: the store's host has exited
        return None


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
        self.pulse = None
        if self.store is not None:
            self.pulse = PeerPulse(self.store, rank=dist.get_rank(), world_size=dist.get_world_size())
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="yolods-watchdog", daemon=True)
        self._watched_at = time.monotonic()  # when the watchdog last came round its loop
        self.progress = 0  # train-step phases and val batches this rank's main thread has finished (see progressed)
        self.writes = WriteWatch(timeout_s=WRITE_STALL_FACTOR * HEARTBEAT_TIMEOUT_S)
        self._stuck_check = threading.Thread(target=self._end_if_stuck, name="yolods-watchdog-check", daemon=True)

    def start(self) -> JobWatchdog:
        self._thread.start()
        if self.store is not None:
            self._stuck_check.start()
        return self

    def progressed(self, phase: str | None = None) -> None:
        """Count one more finished phase of a train step (TrainStep.on_phase) or val batch (EpochValidator's
        on_progress); called by the main thread only."""
        self.progress += 1

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Around one checkpoint file write of the main thread (the Checkpointer's): watched for a hang."""
        return self.writes.writing()

    def stop(self) -> None:
        """Stop watching and tell the peers this rank's silence from now on is a clean exit."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * POLL_S)
        if self.pulse is not None:
            self.pulse.finish()

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            self._watched_at = time.monotonic()
            if self.pulse is not None and self.pulse.due():
                failure = self.pulse.beat_and_check(self.progress)
                if failure is not None and not self._stopped.is_set():
                    if failure.frozen:
                        self.pulse.kill_silent_peer()
                    _announce_and_leave(self.store, failure.phrase)
            stalled_s = self.writes.stalled_s() if self.pulse is not None else None  # alone, a rank may wait it out
            if stalled_s is not None and not self._stopped.is_set():
                _print_main_thread_stack()
                _announce_and_leave(
                    self.store,
                    f"rank {dist.get_rank()}'s checkpoint write moved no bytes for {stalled_s:.0f} s (its file "
                    "system stopped answering; the newest complete checkpoint is kept)",
                )
            if _launcher_gone() and self.stop_request.received is None:
                # every rank that notices says so: rank 0 may be stopped by a peer's notice before its own poll
                print(
                    f"yolods: rank {dist.get_rank()}: the launcher is gone: saving a checkpoint at the next step",
                    flush=True,
                )
                self.stop_request.request(signal.SIGTERM, cause="the launcher's exit")
            failed_rank = _failed_rank(self.store)
            if failed_rank is not None and not self._stopped.is_set() and not _ABORTING.is_set():
                rank = dist.get_rank()
                # on a line of its own: rank 0's progress bar may hold the cursor mid-line
                print(f"\nyolods: rank {rank}: stopping, {failed_rank}", file=sys.stderr, flush=True)
                if failed_rank.startswith(f"rank {rank} is stuck"):
                    _print_main_thread_stack()
                _leave(None)

    def _end_if_stuck(self) -> None:
        """End this rank when the watchdog has been stuck in a store call for HEARTBEAT_TIMEOUT_S: its host froze."""
        last_check = time.monotonic()
        while not self._stopped.wait(POLL_S):
            now = time.monotonic()
            if now - last_check > HEARTBEAT_TIMEOUT_S / 2:
                self._watched_at = now  # this thread was not running either (a paused job): not the store's doing
            last_check = now
            if now - self._watched_at > HEARTBEAT_TIMEOUT_S and not self._stopped.is_set():
                if self.pulse.rank0_process is not None:  # rank 0 holds the store under deepspeed and srun
                    _kill_if_here(self.pulse.rank0_process, only_if_stopped=True)
                _leave(f"yolods: rank {dist.get_rank()}: stopping, {_STORE_GONE}")


def _print_main_thread_stack() -> None:
    """Say where this rank's main thread hangs (the watchdog thread calls it before ending a stuck rank)."""
    traceback.print_stack(sys._current_frames().get(threading.main_thread().ident), file=sys.stderr)


def _bytes_written() -> int | None:
    """Bytes this process has passed to write calls so far (Linux's /proc/self/io `wchar`); None where unknown."""
    try:
        with open("/proc/self/io") as counters:
            for line in counters:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class WriteWatch:
    """Whether the main thread's file writes still move bytes; `stalled_s` is read by the watchdog thread.

    Only the writes are watched, not the barriers between them, where a rank rightly waits for a slower writer.
    A slow file system keeps moving bytes; one that stopped answering leaves the write call blocked with none.

    Examples:
        >>> with watch.writing():
        ...     torch.save(state, path)
        >>> watch.stalled_s()  # from another thread: seconds without a byte, once past the timeout, else None
    """

    def __init__(self, *, timeout_s: float, bytes_written: Callable[[], int | None] = _bytes_written):
        self.timeout_s = timeout_s
        self._bytes_written = bytes_written
        self._open_writes = 0
        self._last_bytes: int | None = None
        self._moved_at = self._checked_at = time.monotonic()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        self._last_bytes, self._moved_at = self._bytes_written(), time.monotonic()  # before the count goes up
        self._open_writes += 1
        try:
            yield
        finally:
            self._open_writes -= 1

    def stalled_s(self) -> float | None:
        """Seconds the current write has moved no bytes, once that reaches the timeout; else None."""
        now = time.monotonic()
        if now - self._checked_at > self.timeout_s / 2:
            self._moved_at = now  # the watching thread was not running either (a paused job): a fresh timeout
        self._checked_at = now
        if not self._open_writes:
            return None
        written = self._bytes_written()
        if written is None:
            return None  # no counter here: never judged
        if written != self._last_bytes:
            self._last_bytes, self._moved_at = written, now
            return None
        stalled_s = now - self._moved_at
        return stalled_s if stalled_s >= self.timeout_s else None


@dataclass(frozen=True)
class PeerFailure:
    phrase: str  # who failed and how: "rank 3 stopped responding: ..."
    frozen: bool = False  # its whole process is silent: nothing of it will leave by itself


class PeerPulse:
    """This rank's heartbeat and progress in the store, and the watch on the next rank's.

    Two faults no launcher sees:
    - a frozen process: its heartbeat (beaten by its watchdog thread) stops for `timeout_s`;
    - a stuck main thread in a live process (a deadlock, a call that never returns): its heartbeat goes on, but its
      progress (the train step's phases, the batches replayed after a resume and the val batches scored, counted
      by the main thread) stays behind this rank's for 1.5 x `timeout_s`.
      Only "behind" counts: where the ranks wait for each other without counting (a checkpoint, rank 0 building the
      label cache while the others wait at a barrier) their counts are equal, and a rank that is merely slower
      keeps counting. A hang there still waits for the collective timeout, except in a checkpoint's file writes,
      which each rank watches itself (WriteWatch).
    Both are timed on this rank's own clock (hosts' clocks need not agree), and only while this rank's watchdog
    runs: after a gap in its own polling (a Ctrl-Z of the whole job, a paused host) the peer gets a fresh timeout,
    since it was probably paused too.
    """

    def __init__(self, store, *, rank: int, world_size: int, timeout_s: float = HEARTBEAT_TIMEOUT_S):
        self.store = store
        self.rank = rank
        self.timeout_s = timeout_s
        self.interval_s = min(HEARTBEAT_S, timeout_s / 4)  # a few beats per timeout, so one late beat is no alarm
        self.peer = (rank + 1) % world_size
        self._last_poll = self._peer_beat_at = time.monotonic()
        self._peer_beats = 0  # 0: the peer has not beaten yet (still starting); it is not judged until it has
        self._published_progress = self._peer_progress = 0
        self._ahead_since: float | None = None  # since when this rank has been past the peer's last progress point
        store.set(PROCESS_KEY.format(rank=rank), _this_process())
        self.rank0_process: str | None = None  # read once rank 0 has published it

    def due(self) -> bool:
        return time.monotonic() - self._last_poll >= self.interval_s

    def beat_and_check(self, progress: int = 0) -> PeerFailure | None:
        """Beat once and publish this rank's `progress` count; the watched peer's failure, if it has failed."""
        now = time.monotonic()
        if now - self._last_poll > self.timeout_s / 2:  # this thread was not running either: not the peer's doing
            self._peer_beat_at = now
            self._ahead_since = None
        self._last_poll = now
        try:
            self.store.add(HEARTBEAT_KEY.format(rank=self.rank), 1)
            if progress != self._published_progress:  # nothing to send while it waits (or runs inference)
                self.store.add(PROGRESS_KEY.format(rank=self.rank), progress - self._published_progress)
                self._published_progress = progress
            # add(key, 0) reads a count without blocking (it creates the key at 0)
            peer_beats = self.store.add(HEARTBEAT_KEY.format(rank=self.peer), 0)
            peer_progress = self.store.add(PROGRESS_KEY.format(rank=self.peer), 0)
            rank0_key = PROCESS_KEY.format(rank=0)
            if self.rank0_process is None and self.store.check([rank0_key]):
                self.rank0_process = self.store.get(rank0_key).decode()
            failure = self._judge(now, peer_beats=peer_beats, peer_progress=peer_progress, progress=progress)
            if failure is not None and self.store.check([FINISHED_KEY.format(rank=self.peer)]):
                self._peer_beat_at, self._ahead_since = now, None  # it left cleanly and this rank is about to
                return None
            return failure
        except Exception:  # DistNetworkError: the store's host has exited
            return PeerFailure(_STORE_GONE)

    def _judge(self, now: float, *, peer_beats: int, peer_progress: int, progress: int) -> PeerFailure | None:
        if peer_beats != self._peer_beats:
            self._peer_beats, self._peer_beat_at = peer_beats, now
        silent_s = now - self._peer_beat_at
        if self._peer_beats and silent_s >= self.timeout_s:
            return PeerFailure(
                f"rank {self.peer} stopped responding: no heartbeat for {silent_s:.0f} s "
                "(its process is frozen or its host unreachable)",
                frozen=True,
            )
        if peer_progress != self._peer_progress or progress <= peer_progress:
            self._peer_progress, self._ahead_since = peer_progress, None
            return None
        if self._ahead_since is None:
            self._ahead_since = now
        behind_s = now - self._ahead_since
        if behind_s < STUCK_TIMEOUT_FACTOR * self.timeout_s:
            return None
        return PeerFailure(
            f"rank {self.peer} is stuck: its training step or validation made no progress for {behind_s:.0f} s "
            f"while rank {self.rank} waited for it (its main thread hangs; its stack follows from rank {self.peer})"
        )

    def kill_silent_peer(self) -> None:
        """End the watched peer's process if it runs on this host (see _kill_if_here)."""
        try:
            _kill_if_here(self.store.get(PROCESS_KEY.format(rank=self.peer)).decode())
        except Exception:
            pass  # the store went meanwhile; the peer's launcher ends it after its grace

    def finish(self) -> None:
        try:
            self.store.set(FINISHED_KEY.format(rank=self.rank), "1")
        except Exception:
            pass  # the store has gone with rank 0's clean exit: nobody is left to watch this rank


_STORE_GONE = "the job's store stopped answering (rank 0 or the launcher exited or froze)"


def _this_process() -> str:
    """'host pid start-time': names this process so that a peer on the same host can end it, and no other."""
    import psutil

    return f"{socket.gethostname()} {os.getpid()} {psutil.Process().create_time()}"


def _kill_if_here(process: str, *, only_if_stopped: bool = False) -> None:
    """SIGKILL the frozen process `process` (from _this_process) if it runs on this host and still exists.

    A stopped process keeps the launcher's SIGTERM pending: torchrun and deepspeed then wait 30 s before their
    SIGKILL. The start time guards against a pid reused by another process since.
    """
    import psutil

    host, pid, started = process.split()
    if host != socket.gethostname() or int(pid) == os.getpid():
        return  # its own launcher ends it
    try:
        frozen = psutil.Process(int(pid))
        if frozen.create_time() == float(started) and (frozen.status() == "stopped" or not only_if_stopped):
            frozen.kill()
    except psutil.Error:
        pass  # gone already


def _announce_and_leave(store, failure: str) -> NoReturn:
    """End the job for `failure` (a phrase naming who failed): tell every rank through the store, then leave."""
    if failure != _STORE_GONE:
        try:
            store.set(ABORT_KEY, failure)
        except Exception:
            pass  # the store went meanwhile: the peers' watchdogs find that out themselves
    _leave(f"\nyolods: rank {dist.get_rank()}: stopping, {failure}")  # rank 0's progress bar may hold the line


def _failed_rank(store) -> str | None:
    """Who failed, as a phrase, if another rank has aborted the job or the store's host is gone; else None."""
    if store is None:
        return None
    try:
        if store.check([ABORT_KEY]):
            return store.get(ABORT_KEY).decode()
    except Exception:  # DistNetworkError and friends: the store's host (rank 0 or the launcher) has exited
        return _STORE_GONE
    return None


def _leave(message: str | None) -> NoReturn:
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    kill_worker_processes()
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
    _ABORTING.set()
    if store is not None:
        try:
            store.set(ABORT_KEY, f"rank {rank} failed")
        except Exception:
            pass  # the store is gone too; the launcher or the peers' failed collectives end the job
    details = "".join(traceback.format_exception(error))
    log_path, log_error = _write_log(run_dir, rank, details)
    summary = _summary(error)
    if log_path is not None:
        where = f"traceback in {log_path}"
    elif log_error is not None and log_error.errno == errno.ENOSPC:
        # torch.save reports a full disk as "unexpected pos ...": say what the log write found
        summary += f"; the disk holding {run_dir} is full: free space there, then --resume"
        where = "traceback not saved: no space left on device"
    else:
        where = details.rstrip()  # no run directory yet, or an unwritable one: the traceback goes to stderr
    # on a line of its own: rank 0's progress bar may hold the cursor mid-line
    _leave(f"\nyolods: rank {rank}: error: {type(error).__name__}: {summary}\n({where})")


# What a collective raises here when another rank's process vanished: gloo's pair errors, NCCL's remote abort
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "remote process exited or there was a network")


def _summary(error: BaseException) -> str:
    """The error's first line; for an error a DataLoader worker re-raised ("Caught X in DataLoader worker process
    0." and the worker's traceback), the worker's own last line, which names the file."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        last = lines[-1].removeprefix(f"{type(error).__name__}: ")
        return f"{last} (in {lines[0].removeprefix('Caught ').split(' in ', 1)[-1].rstrip('.')})"
    if any(sign in lines[0] for sign in _PEER_GONE):  # gloo's "[.../pair.cc:545] Read error [...]: Connection reset"
        return (
            f"a peer rank's process is gone ({lines[0][-120:]}): it ended without reporting an error (killed, out "
            "of memory, or its node went down); --resume continues from the last complete checkpoint"
        )
    return lines[0]


def _write_log(run_dir: Path | None, rank: int, details: str) -> tuple[Path | None, OSError | None]:
    """RUN_DIR/logs/rankN.log holding `details`, or (None, why not): a full or read-only disk may be the fault."""
    if run_dir is None:
        return None, None
    path = run_dir / "logs" / f"rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(details)
        return path, None
    except OSError as error:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)  # not an empty log that looks like the record
        return None, error
