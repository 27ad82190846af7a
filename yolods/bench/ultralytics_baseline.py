"""The Ultralytics trainer baseline: `YOLO(yaml).train(...)` timed through its on_train_batch_end callback.

It trains in a child process (ultralytics_child: without the launcher's variables, with Ultralytics' global
state kept out of the bench process). Only at world size 1: Ultralytics' own multi-GPU mode spawns its own workers.

Each interval between two batch ends is one full step (data loading, forward, backward, optimizer step, EMA),
so the breakdown into phases is not available here; burn-in batches are dropped as for the other engines.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from yolods.bench.sweep import BenchConfig
from yolods.bench.ultralytics_child import ChildSpec, child_command, child_env

AMP = {"fp32": False, "bf16": "bf16", "fp16": True}  # Ultralytics' `amp` values


def _train_kwargs(cfg: BenchConfig, *, data_yaml: str, project: Path) -> dict[str, Any]:
    """YOLO.train's arguments for one epoch of `cfg`: no validation, plots or checkpoints to time."""
    # None leaves Ultralytics' own default (NHWC on CUDA), as yolods does
    layout = {} if cfg.channels_last is None else {"channels_last": cfg.channels_last}
    return {
        **layout,
        "data": data_yaml,
        "epochs": 1,
        "imgsz": cfg.imgsz,
        "batch": cfg.micro_batch,
        "device": "cpu" if cfg.device == "cpu" else "0",
        "workers": cfg.workers,
        "optimizer": cfg.optimizer,
        "lr0": cfg.lr0,
        "nbs": cfg.global_batch,  # accumulation 1, as for the other engines
        "warmup_epochs": 0,
        "close_mosaic": 0,  # keep mosaic on in this single epoch, as in yolods' loader
        "amp": AMP[cfg.precision],
        "seed": cfg.seed,
        "deterministic": False,
        "plots": False,
        "val": False,
        "save": False,
        "cache": False,
        "project": str(project),
        "name": "ultralytics",
        "exist_ok": True,
        "verbose": False,
    }


def run_baseline(cfg: BenchConfig, *, data_yaml: str, timeout_s: float = 3600) -> dict[str, Any]:
    """Train in a child process and return its step times and peak memory.

    The child gets this process's torch thread count, so it computes with the same cores as the 1-rank run.
    """
    threads = torch.get_num_threads()
    # The first batch end is the reference point of the first timed interval, so at least one burn-in batch.
    warmup = max(cfg.warmup_steps, 1)
    with tempfile.TemporaryDirectory(prefix="yolods-bench-ultralytics-") as workdir:
        result_path = Path(workdir) / "result.json"
        spec = ChildSpec(
            model=cfg.model,
            train=_train_kwargs(cfg, data_yaml=data_yaml, project=Path(workdir) / "runs"),
            keep_torch_threads=True,
            result=str(result_path),
            stop_after_batches=warmup + cfg.steps,
        )
        completed = subprocess.run(
            child_command(spec),
            env=child_env(OMP_NUM_THREADS=str(threads)),
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if completed.returncode != 0 or not result_path.exists():
            tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-30:])
            raise RuntimeError(f"Ultralytics baseline failed (exit {completed.returncode}):\n{tail}")
        record = json.loads(result_path.read_text())
    batch_ends = record["batch_end_s"]
    if len(batch_ends) < warmup + cfg.steps:
        raise RuntimeError(
            f"only {len(batch_ends)} batches ran; the data set must hold {warmup + cfg.steps} batches in one epoch"
        )
    timed = batch_ends[warmup - 1 :]
    return {
        "step_times_s": [later - earlier for earlier, later in itertools.pairwise(timed)],
        "window_s": timed[-1] - timed[0],
        "peak_mem_bytes": record["peak_mem_bytes"],
        "peak_mem_source": record["peak_mem_source"],
        "torch_threads": record["torch_threads"],
    }
