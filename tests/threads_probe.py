"""Print this rank's torch thread count, and the ranks per node DeepSpeed's accelerator counts, after yolods joins
the process group (for tests/test_launchers.py)."""

import importlib
import os

import torch

import yolods  # noqa: F401  (records OMP_NUM_THREADS before Ultralytics touches it, as `python -m yolods.train` does)
from yolods import dist

importlib.import_module("ultralytics")  # sets OMP_NUM_THREADS=1 when unset, as in every real run
if "PROBE_CORES" in os.environ:  # a machine with more cores than this one, as taskset or cgroups report them
    os.sched_getaffinity = lambda pid: set(range(int(os.environ["PROBE_CORES"])))
dist.init_distributed("cpu", verbose=False)
from deepspeed.accelerator import get_accelerator  # noqa: E402

print(
    f"rank {dist.get_rank()} threads {torch.get_num_threads()} devices {get_accelerator().device_count()}", flush=True
)
dist.shutdown()
