"""Run directories, and the Checkpointer: DeepSpeed checkpoints (every rank) and Ultralytics-format weights (rank 0).

A running job never loses a checkpoint. Weights are written to a temporary file and renamed into place. A
DeepSpeed tag counts as complete only once every rank's shard and per-rank state are on disk and rank 0 has
written the tag's marker file last; `latest` is updated after the marker, and an older tag is deleted only
after a newer one is complete. On resume the newest complete tag whose files open is taken; a damaged or
unfinished one is skipped with a warning naming it and why.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from yolods import dist
from yolods.config import RunConfig, write_json
from yolods.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "yolods_complete.json"  # written by rank 0 once every rank's files of a tag are on disk
KEEP_CHECKPOINTS = 2  # the newest complete tag, and the one before it in case the newest is damaged later


def new_run_dir(cfg: RunConfig) -> Path:
    """project/name, or the next free name (exp, exp2, ...) unless --exist_ok, with weights/ in it."""
    return make_run_dir(project=cfg.project, name=cfg.name, exist_ok=cfg.exist_ok, subdir="weights")


def make_run_dir(*, project: str, name: str, exist_ok: bool, subdir: str = "") -> Path:
    """project/name, or the next free name (exp, exp2, ...) unless `exist_ok`; created by rank 0, named on all ranks.

    A collective. Raises ConfigError on every rank when the directory cannot be created.
    """
    run_dir, error = None, None
    if dist.is_main_process():
        base = Path(project) / name
        run_dir, suffix = base, 2
        while run_dir.exists() and not exist_ok:
            run_dir, suffix = base.with_name(f"{base.name}{suffix}"), suffix + 1
        try:
            (run_dir / subdir).mkdir(parents=True, exist_ok=True)
        except OSError as caught:  # a file where a directory should be, no permission, read-only file system
            error = f"--project {project} --name {name}: cannot create {run_dir} ({caught.strerror}); choose another --project"
        run_dir = str(run_dir.resolve())
    run_dir, error = dist.broadcast_object((run_dir, error))
    if error:
        raise ConfigError(error)
    return Path(run_dir)


def remove_unfinished_run_dir(run_dir: Path) -> None:
    """Delete a run directory whose start failed before it held any checkpoint or weights (rank 0)."""
    if dist.is_main_process() and not complete_tags(run_dir) and not any((run_dir / "weights").glob("*.pt")):
        shutil.rmtree(run_dir, ignore_errors=True)


def complete_tags(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint tags, newest first."""
    markers = (run_dir / CHECKPOINT_DIR).glob(f"*/{COMPLETE_MARKER}")
    return [marker.parent for marker in sorted(markers, key=lambda m: m.stat().st_mtime, reverse=True)]


def find_resume_dir(cfg: RunConfig) -> Path:
    """The run to resume: --resume DIR, or the newest run under --project that has a complete checkpoint."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "args.yaml").is_file():
            raise ConfigError(f"--resume {cfg.resume}: not a yolods run directory (no args.yaml there)")
        if not complete_tags(run_dir):
            raise ConfigError(
                f"--resume {cfg.resume}: no complete checkpoint in {run_dir / CHECKPOINT_DIR}; the run stopped before its first one, start it again"
            )
        return run_dir.resolve()
    candidates = [run for run in Path(cfg.project).glob("*") if (run / "args.yaml").is_file() and complete_tags(run)]
    if not candidates:
        raise ConfigError(f"--resume: no run with a complete checkpoint under {cfg.project}; pass the run directory")
    return max(candidates, key=lambda run: complete_tags(run)[0].stat().st_mtime).resolve()


def check_resume_world_size(run_dir: Path, *, world_size: int) -> None:
    """A run resumes on as many ranks as saved it: each rank's BatchNorm statistics and ZeRO partition are its own."""
    newest = complete_tags(run_dir)[0]
    saved = json.loads((newest / COMPLETE_MARKER).read_text())["world_size"]
    if saved != world_size:
        raise ConfigError(
            f"--resume {run_dir}: checkpoint {newest.name} was saved by {saved} ranks, this job has {world_size}; "
            f"resume with {saved} ranks (e.g. torchrun --nproc_per_node {saved})"
        )


def save_run_config(run_dir: Path, cfg: RunConfig) -> None:
    if dist.is_main_process():
        (run_dir / "args.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))


def load_run_config(run_dir: Path) -> RunConfig:
    """The configuration a run started with; resuming continues it unchanged."""
    saved = yaml.safe_load((run_dir / "args.yaml").read_text())
    return RunConfig(**{**saved, "resume": str(run_dir)})


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def damaged_file(tag_dir: Path) -> str | None:
    """The first file of a tag that does not open as a torch checkpoint, with the reason; None if all open.

    torch.save writes zip archives whose directory sits at the end, so a file cut off mid-write fails here
    (reading only the directory, not the tensors: cheap enough for every rank to check every file).
    """
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            return f"{path.name}: {error}"
    return None


class Checkpointer:
    """Saves, prunes, finds and restores a run's state; every rank calls save/load, rank 0 alone writes shared files.

    Examples:
        >>> checkpointer = Checkpointer(run_dir, engine, train_args=vars(train_hyp))
        >>> checkpointer.save("epoch3", client_state=trainer.state_dict(), rank_state=trainer.rank_state_dict())
        >>> client_state, rank_state = checkpointer.load()
    """

    def __init__(self, run_dir: Path, engine, *, train_args: dict[str, Any]):
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / CHECKPOINT_DIR
        self.engine = engine
        self.train_args = {**train_args, "save_dir": str(run_dir)}

    def save_run_files(self, cfg: RunConfig, ds_config: dict[str, Any]) -> None:
        """args.yaml (what --resume continues; kept from the first start) and the resolved DeepSpeed config."""
        if dist.is_main_process():
            if not (self.run_dir / "args.yaml").exists():
                save_run_config(self.run_dir, cfg)
            write_json(self.run_dir / "ds_config.json", ds_config)

    def save(self, tag: str, *, client_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """DeepSpeed checkpoint of model, optimizer and ZeRO partitions, plus this rank's own state. A collective."""
        tag_dir = self.checkpoint_dir / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(tag_dir / f"yolods_rank{dist.get_rank()}.pt", _torch_bytes(rank_state))
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()  # every rank's files are on disk
        if dist.is_main_process():
            marker = {"tag": tag, "world_size": dist.get_world_size(), "saved_at": time.time()}
            write_json(tag_dir / COMPLETE_MARKER, marker)
            _atomic_write(self.checkpoint_dir / "latest", tag.encode())  # for DeepSpeed's tools (zero_to_fp32)
            self._prune()

    def _prune(self) -> None:
        """Keep the newest complete tags; drop older ones and any unfinished tag a killed save left behind."""
        keep = complete_tags(self.run_dir)[:KEEP_CHECKPOINTS]
        for tag_dir in self.checkpoint_dir.iterdir():
            if tag_dir.is_dir() and tag_dir not in keep:
                shutil.rmtree(tag_dir, ignore_errors=True)

    def load(self) -> tuple[dict[str, Any], dict[str, Any], str]:
        """Load the newest complete, readable tag into the engine (every rank).

        Returns the client state, this rank's own state and the tag.
        """
        for tag_dir in complete_tags(self.run_dir):
            damage = damaged_file(tag_dir)
            if dist.any_rank(damage is not None):  # all ranks move on together
                dist.print_main(f"WARNING: skipping checkpoint {tag_dir.name}: {damage or 'damaged on another rank'}")
                continue
            load_path, client_state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag_dir.name)
            if load_path is None:
                raise ConfigError(f"--resume {self.run_dir}: DeepSpeed could not load checkpoint {tag_dir.name}")
            rank_state = torch.load(tag_dir / f"yolods_rank{dist.get_rank()}.pt", weights_only=False)
            return client_state, rank_state, tag_dir.name
        raise ConfigError(f"--resume {self.run_dir}: no complete, readable checkpoint in {self.checkpoint_dir}")

    def export_weights(self, weights: dict[str, Any], *, is_best: bool) -> None:
        """weights/last.pt (and best.pt when `is_best`) from an Ultralytics checkpoint dict (rank 0 writes)."""
        if not dist.is_main_process():
            return
        payload = _torch_bytes({**weights, "train_args": self.train_args})
        weights_dir = self.run_dir / "weights"
        weights_dir.mkdir(parents=True, exist_ok=True)
        for name in ["last.pt"] + (["best.pt"] if is_best else []):
            _atomic_write(weights_dir / name, payload)
