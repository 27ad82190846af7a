"""The Ultralytics trainer baseline: `YOLO(yaml).train(...)` timed through its on_train_batch_end callback.

It runs in a child process with the launcher's variables removed: Ultralytics reads RANK/WORLD_SIZE at import
and would otherwise believe it is a DDP worker, and its global state (seeds, deterministic mode, callbacks)
stays out of the bench process. Only at world size 1: Ultralytics' own multi-GPU mode spawns its own workers.

Each interval between two batch ends is one full step (data loading, forward, backward, optimizer step, EMA),
so the breakdown into phases is not available here; burn-in batches are dropped as for the other engines.

    python -m yolods.bench.ultralytics_baseline CONFIG.json DATA.yaml RESULT.json   # what `yolods.bench` runs
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from yolods.bench.sweep import BenchConfig
from yolods.dist import LAUNCHER_VARIABLES

AMP = {"fp32": False, "bf16": "bf16", "fp16": True}  # Ultralytics' `amp` values


class _MeasurementDone(Exception):
    """Raised from the callback once enough batches are timed: no validation, no final checkpoint."""


def run_baseline(cfg: BenchConfig, *, data_yaml: str, timeout_s: float = 3600) -> dict[str, Any]:
    """Train in a child process and return its step times and peak memory.

    The child gets this process's torch thread count, so it computes with the same cores as the 1-rank run.
    """
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="yolods-bench-ultralytics-") as workdir:
        config_path, result_path = Path(workdir) / "config.json", Path(workdir) / "result.json"
        config_path.write_text(json.dumps(cfg.as_dict()))
        completed = subprocess.run(
            [sys.executable, "-m", "yolods.bench.ultralytics_baseline", str(config_path), data_yaml, str(result_path)],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if completed.returncode != 0 or not result_path.exists():
            tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-30:])
            raise RuntimeError(f"Ultralytics baseline failed (exit {completed.returncode}):\n{tail}")
        return json.loads(result_path.read_text())


def _prepare_ultralytics() -> None:
    """Keep Ultralytics off the network and on this process's threads.

    Its dataset check fetches a font and its AMP check fetches weights; on CPU its select_device sets torch to
    cpu_count - 1 threads, which would compare thread counts instead of trainers.
    """
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer_module
    import ultralytics.utils.torch_utils as torch_utils

    data_utils.check_font = lambda *args, **kwargs: None  # fonts only matter for plots, which are off
    trainer_module.check_amp = lambda *args, **kwargs: True  # the check downloads a model to compare outputs
    torch_utils.NUM_THREADS = torch.get_num_threads()  # OMP_NUM_THREADS from the bench process


def _train_and_time(cfg: BenchConfig, data_yaml: str) -> dict[str, Any]:
    from ultralytics import YOLO

    from yolods.bench.memory import PeakMemory

    _prepare_ultralytics()
    device = torch.device(cfg.device, 0 if cfg.device == "cuda" else None)
    # The first batch end is the reference point of the first timed interval, so at least one burn-in batch.
    warmup = max(cfg.warmup_steps, 1)
    batch_ends: list[float] = []

    def on_train_batch_end(trainer: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        batch_ends.append(time.perf_counter())
        if len(batch_ends) >= warmup + cfg.steps:
            raise _MeasurementDone

    model = YOLO(cfg.model)  # a yaml name: built, never downloaded
    model.add_callback("on_train_batch_end", on_train_batch_end)
    peak = PeakMemory(device)
    peak.reset()
    try:
        model.train(
            data=data_yaml,
            epochs=1,
            imgsz=cfg.imgsz,
            batch=cfg.micro_batch,
            device="cpu" if device.type == "cpu" else "0",
            workers=cfg.workers,
            optimizer=cfg.optimizer,
            lr0=cfg.lr0,
            nbs=cfg.global_batch,  # accumulation 1, as for the other engines
            warmup_epochs=0,
            close_mosaic=0,  # keep mosaic on in this single epoch, as in yolods' loader
            amp=AMP[cfg.precision],
            seed=cfg.seed,
            deterministic=False,
            plots=False,
            val=False,
            save=False,
            cache=False,
            project=str(Path.cwd() / "runs"),
            name="ultralytics",
            exist_ok=True,
            verbose=False,
        )
    except _MeasurementDone:
        pass
    if len(batch_ends) < warmup + cfg.steps:
        raise RuntimeError(
            f"only {len(batch_ends)} batches ran; the data set must hold {warmup + cfg.steps} batches in one epoch"
        )
    timed = batch_ends[warmup - 1 :]
    return {
        "step_times_s": [later - earlier for earlier, later in itertools.pairwise(timed)],
        "window_s": timed[-1] - timed[0],
        "peak_mem_bytes": peak.peak_bytes(),
        "peak_mem_source": peak.source,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    config_path, data_yaml, result_path = argv if argv is not None else sys.argv[1:]
    cfg = BenchConfig(**json.loads(Path(config_path).read_text()))
    result = _train_and_time(cfg, data_yaml)
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
