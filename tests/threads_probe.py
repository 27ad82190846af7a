"""Print this rank's torch thread count after yolods joins the process group (for tests/test_launchers.py)."""

import importlib

import torch

import yolods  # noqa: F401  (records OMP_NUM_THREADS before Ultralytics touches it, as `python -m yolods.train` does)
from yolods import dist

importlib.import_module("ultralytics")  # sets OMP_NUM_THREADS=1 when unset, as in every real run
dist.init_distributed("cpu", verbose=False)
print(f"rank {dist.get_rank()} threads {torch.get_num_threads()}", flush=True)
dist.shutdown()
