"""`yolods.predict` with an error injected on one rank mid-run, for the fault test (real processes).

    python -m torch.distributed.run --nproc_per_node 2 tests/predict_fault_probe.py RANK AT -- PREDICT_ARGS...

RANK raises a RuntimeError in its AT-th batch (what a CUDA OOM or a bug looks like to the loop).
"""

from __future__ import annotations

import sys

import yolods  # noqa: F401  (offline environment first)
from yolods import dist
from yolods.predict import main
from yolods.prediction import BatchPredictor


def inject(rank: int, at: int) -> None:
    original_call = BatchPredictor.__call__
    calls = {"n": 0}

    def failing_call(self, paths, images):
        calls["n"] += 1
        if dist.get_rank() == rank and calls["n"] == at:
            raise RuntimeError("injected fault: out of memory")
        return original_call(self, paths, images)

    BatchPredictor.__call__ = failing_call


if __name__ == "__main__":
    rank, at, separator, *predict_args = sys.argv[1:]
    assert separator == "--"
    inject(int(rank), int(at))
    sys.exit(main(predict_args))
