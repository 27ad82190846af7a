"""`yolods.train` with a fault injected on one rank, for the fault tests (real processes, real engine).

    python -m torch.distributed.run --nproc_per_node 2 tests/fault_probe.py KIND RANK AT -- TRAIN_ARGS...

KIND `raise`: RuntimeError in the train step at micro-step AT on RANK (what a CUDA OOM looks like to the loop).
KIND `write`: OSError(ENOSPC) when RANK writes weights (a full disk while saving).
KIND `hang`: the train step at micro-step AT on RANK never returns (a deadlock; the process lives on).
KIND `val-hang`: RANK never returns from its val batch AT of the first validation (a hung data read, say).
KIND `write-hang`: RANK's write of its part of checkpoint AT never returns (a file system that stopped answering).
"""

from __future__ import annotations

import errno
import sys
import time

import yolods  # noqa: F401  (offline environment first)
from yolods import checkpoint, dist
from yolods.checkpoint import Checkpointer
from yolods.step import TrainStep
from yolods.train import main
from yolods.validation import EpochValidator


def failing_step() -> None:
    raise RuntimeError("injected fault: out of memory")


def hanging_step() -> None:
    time.sleep(3600)  # injected hang


def hanging_validation() -> None:
    time.sleep(3600)  # injected hang


def hanging_write() -> None:
    time.sleep(3600)  # injected hang: a write call blocked with no bytes moving


def at_step(fault, rank: int, at: int) -> None:
    """Run `fault` on `rank` at its micro-step `at`, before the train step itself."""
    original_step = TrainStep.__call__
    calls = {"n": 0}

    def step_with_fault(self, batch, **kwargs):
        calls["n"] += 1
        if dist.get_rank() == rank and calls["n"] == at:
            fault()
        return original_step(self, batch, **kwargs)

    TrainStep.__call__ = step_with_fault


def inject(kind: str, rank: int, at: int) -> None:
    if kind == "raise":
        at_step(failing_step, rank, at)
    elif kind == "hang":
        at_step(hanging_step, rank, at)
    elif kind == "val-hang":
        original_batch_scored = EpochValidator._batch_scored

        def batch_scored_with_hang(self, validator):
            if dist.get_rank() == rank and self._batches_scored + 1 == at:
                hanging_validation()
            return original_batch_scored(self, validator)

        EpochValidator._batch_scored = batch_scored_with_hang
    elif kind == "write-hang":
        original_write, writes = checkpoint._atomic_write, {"n": 0}

        def write_with_hang(path, payload):
            if dist.get_rank() == rank and path.name.startswith("yolods_rank"):  # once per checkpoint
                writes["n"] += 1
                if writes["n"] == at:
                    hanging_write()
            return original_write(path, payload)

        checkpoint._atomic_write = write_with_hang
    elif kind == "write":
        original_export = Checkpointer.export_weights

        def failing_export(self, weights, **kwargs):
            if dist.get_rank() == rank:
                raise OSError(errno.ENOSPC, "No space left on device (injected)", "weights/last.pt")
            return original_export(self, weights, **kwargs)

        Checkpointer.export_weights = failing_export
    else:
        raise SystemExit(f"unknown fault kind {kind}")


if __name__ == "__main__":
    kind, rank, at, separator, *train_args = sys.argv[1:]
    assert separator == "--"
    inject(kind, int(rank), int(at))
    sys.exit(main(train_args))
