"""Run directories, DeepSpeed checkpoints (every rank) and Ultralytics-format weights (rank 0).

A running job never loses a checkpoint: weights are written to a temporary file and renamed into place, and
an older DeepSpeed checkpoint is deleted only after a newer one is complete on every rank.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from yolods import dist
from yolods.config import ConfigError, RunConfig

CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2  # the newest, and the one before it in case the newest was cut off mid-write


def new_run_dir(cfg: RunConfig) -> Path:
    """project/name, or the next free name (exp, exp2, ...) unless --exist_ok; created by rank 0."""
    run_dir = None
    if dist.is_main_process():
        base = Path(cfg.project) / cfg.name
        run_dir, suffix = base, 2
        while run_dir.exists() and not cfg.exist_ok:
            run_dir, suffix = base.with_name(f"{base.name}{suffix}"), suffix + 1
        (run_dir / "weights").mkdir(parents=True, exist_ok=True)
        run_dir = str(run_dir.resolve())
    return Path(dist.broadcast_object(run_dir))


def find_resume_dir(cfg: RunConfig) -> Path:
    """The run to resume: --resume DIR, or the newest run under --project that has a checkpoint."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / CHECKPOINT_DIR / "latest").is_file():
            raise ConfigError(
                f"--resume {cfg.resume}: no DeepSpeed checkpoint there (expected {run_dir / CHECKPOINT_DIR}/latest)"
            )
        return run_dir.resolve()
    candidates = sorted(Path(cfg.project).glob(f"*/{CHECKPOINT_DIR}/latest"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"--resume: no run with a checkpoint under {cfg.project}; pass the run directory")
    return candidates[-1].parent.parent.resolve()


def save_run_config(run_dir: Path, cfg: RunConfig) -> None:
    (run_dir / "args.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))


def load_run_config(run_dir: Path) -> RunConfig:
    """The configuration a run started with; resuming continues it unchanged."""
    saved = yaml.safe_load((run_dir / "args.yaml").read_text())
    return RunConfig(**{**saved, "resume": str(run_dir)})


def save_training_state(
    engine, run_dir: Path, *, tag: str, client_state: dict[str, Any], rank_state: dict[str, Any]
) -> None:
    """DeepSpeed checkpoint of model, optimizer and ZeRO partitions, plus each rank's own state.

    A collective: every rank calls it. Each rank writes its file before DeepSpeed writes `latest`, so a tag
    that `latest` names is complete.
    """
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    (checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, checkpoint_dir / tag / f"yolods_rank{dist.get_rank()}.pt")
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state)
    dist.barrier()  # every rank's shard is on disk before anything older goes
    if dist.is_main_process():
        tags = sorted((p for p in checkpoint_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for stale in tags[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(stale, ignore_errors=True)


def load_training_state(engine, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the latest checkpoint into the engine (every rank); returns the client state and this rank's state."""
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    load_path, client_state = engine.load_checkpoint(str(checkpoint_dir))
    if load_path is None:
        raise ConfigError(f"--resume {run_dir}: DeepSpeed found no loadable checkpoint in {checkpoint_dir}")
    tag = (checkpoint_dir / "latest").read_text().strip()
    rank_file = checkpoint_dir / tag / f"yolods_rank{dist.get_rank()}.pt"
    if not rank_file.is_file():
        raise ConfigError(
            f"--resume {run_dir}: {rank_file.name} missing from {tag}; resume with as many ranks as the run had"
        )
    return client_state, torch.load(rank_file, weights_only=False)


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def export_weights(
    path: Path,
    *,
    snapshot: torch.nn.Module,
    epoch: int,
    best_fitness: float | None,
    updates: int,
    train_args: dict[str, Any],
    metrics: dict[str, float],
) -> None:
    """Write an Ultralytics checkpoint: `ultralytics.YOLO(path)` loads it, `.val()` and `.predict()` run.

    Same keys as Ultralytics' trainer writes; `model` is None because Ultralytics loads `ema` first.
    """
    from ultralytics import __version__

    buffer = io.BytesIO()
    torch.save(
        {
            "epoch": epoch,
            "best_fitness": best_fitness,
            "model": None,
            "ema": snapshot,
            "updates": updates,
            "optimizer": None,  # optimizer state lives in the DeepSpeed checkpoint (possibly ZeRO-partitioned)
            "train_args": train_args,
            "train_metrics": metrics,
            "date": datetime.now().astimezone().isoformat(),
            "version": __version__,
            "license": "AGPL-3.0 (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com",
        },
        buffer,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, buffer.getvalue())
