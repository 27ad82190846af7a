"""Python's cyclic garbage collector in a process that holds torch, DeepSpeed and Ultralytics; and how that
process ends.

Their imports, the model, the data set and the engine make hundreds of thousands of objects that live as long as
the process, and each full collection walks all of them: during the start (imports with the collector off took
3.2-3.5 s here against 4.0-4.2 s with it on), and again as the interpreter exits (1.1 s after a run's last line).
Off during the start, and with the exit's teardown skipped (`finish_process`), a job started and ended about 1 s
sooner on the 2-core CPU machine (3 epochs of the tests' small job, 3 interleaved pairs, with the collector frozen
at exit: 1 rank 7.6-8.2 -> 6.5-6.8 s, 2 ranks under torchrun 11.5-12.2 -> 10.6-11.1 s). Between the two the
collector runs as usual.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


@contextmanager
def collector_paused() -> Iterator[None]:
    """No collections while the block builds what the process keeps (its garbage is collected after it)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def finish_process(exit_code: int) -> NoReturn:
    """End a job's process once its work is done and its process group is down, without the interpreter's teardown.

    The teardown collects over every object (above) and runs the C++ destructors of torch's distributed objects,
    where a 2-rank CPU job now and then aborted after writing all its results: `terminate called without an active
    exception` (a C++ thread destroyed while joinable), exit 250, so the launcher reported a finished job as failed
    (yolods.predict in the suite at 7a05ee1; yolods.bench's fit probes about 1 in 10, which leave the same way). What
    Python's exit does for the program runs first: non-daemon threads are joined, atexit handlers run (logging's
    flush among them), stdout and stderr are flushed.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
