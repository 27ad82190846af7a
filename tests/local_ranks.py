"""Start N ranks of a job on this host as a launcher does, without torchrun's own start and exit (1.8 s a job).

    python tests/local_ranks.py NPROC PORT -m MODULE ARGS...    # or a script path instead of -m MODULE

Each rank gets what torchrun gives a rank of a one-node job (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) and this process's stdout and stderr. As torchrun does, the first rank to fail ends the
others (SIGTERM, then SIGKILL after a grace) and the job exits with that rank's code; a SIGTERM or SIGINT to this
process is passed on to every rank. The tests that are about torchrun itself (restarts, its signals, its exit
report) start torchrun (conftest.torchrun_command); this is for the jobs that only need 2 real ranks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time

GRACE_S = 30  # torchrun's own before its SIGKILL
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def main() -> int:
    nproc, port, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    ranks = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc))
        env.update(LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        ranks.append(subprocess.Popen([sys.executable, *command], env=env, preexec_fn=stop_when_launcher_dies))

    signalled = []

    def pass_on(signum, frame):  # once, as torchrun does; the ranks then stop together on their own
        signalled.append(signum)
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    while True:
        codes = [process.poll() for process in ranks]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            end(ranks, terminate=not signalled)
            return failed[0]
        if None not in codes:
            return 0
        time.sleep(0.05)


def stop_when_launcher_dies() -> None:
    """In each rank, before it starts: SIGTERM when this process dies (a test's timeout SIGKILLs it), as a rank
    whose torchrun is gone stops, instead of training on unwatched through the tests after it."""
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def end(ranks: list[subprocess.Popen], *, terminate: bool) -> None:
    """The ranks still running get SIGTERM (unless a signal was passed on already) and a grace, then SIGKILL."""
    for process in ranks:
        if terminate and process.poll() is None:
            process.terminate()
    deadline = time.time() + GRACE_S
    for process in ranks:
        try:
            process.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    sys.exit(main())
