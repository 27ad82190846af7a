"""Ultralytics datasets (label cache, augmentation, mosaic) sharded over ranks.

The train loader is rebuilt every epoch from (seed, epoch, rank) alone: sampler order, worker seeds and the
main process's `random`/`numpy` state (Ultralytics' augmentation draws from them). A run resumed at epoch k
therefore sees exactly the batches an uninterrupted run sees at epoch k.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from copy import copy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from yolods import dist
from yolods.errors import ConfigError
from yolods.fonts import local_fonts
from yolods.preemption import ignore_stop_signals, signals_blocked

T = TypeVar("T")


def _offline_check_det_dataset(data_yaml: str) -> dict[str, Any]:
    """Ultralytics' check_det_dataset without its font download (it asks for the font plots use) or dataset one."""
    from ultralytics.data.utils import check_det_dataset

    with local_fonts():
        return check_det_dataset(data_yaml, autodownload=False)


def load_data_yaml(data_yaml: str, *, split: str = "val") -> dict[str, Any]:
    """Ultralytics' parsed data dict (absolute train/val paths, nc, names), with one-line errors.

    `split` must be in it: training validates on 'val' every epoch; `yolods.val --split test` needs 'test'.
    """
    path = Path(data_yaml)
    if not path.is_file():
        raise ConfigError(f"--data {data_yaml}: file not found; pass an Ultralytics data.yaml or 'synthetic'")
    try:
        data = _offline_check_det_dataset(str(path))
    except Exception as error:  # Ultralytics raises FileNotFoundError/SyntaxError/KeyError with long messages
        raise ConfigError(f"--data {data_yaml}: {one_line(error)}") from None
    if not data.get(split):
        raise ConfigError(f"--data {data_yaml}: no '{split}' split; add {split}: images/{split} to it")
    return data


def one_line(error: BaseException) -> str:
    """Ultralytics' message as one plain line: its colour codes, emoji and line breaks removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).replace("❌", "").replace("⚠️", "")
    lines = [re.sub(r"^(train|val|test): ", "", line.strip()) for line in text.splitlines() if line.strip()]
    # The first line says what is wrong; a second one sometimes says what is required. Further lines repeat
    # per-image warnings or point to the docs.
    kept = lines[:1] + [line for line in lines[1:2] if not line.startswith(("See ", "/"))]
    return " ".join(line.rstrip(" .") + "." for line in kept) or type(error).__name__


def _main_first(build: Callable[[], T]) -> T:
    """Run `build` on rank 0, then on the others (label caches are written once); a failure stops every rank.

    A collective. Rank 0 re-raises its own error; the others raise its first line as a ConfigError.
    """
    error = None
    if dist.is_main_process():
        try:
            result = build()
        except Exception as caught:  # re-raised below, after the other ranks hear of it
            error = caught
    message = dist.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise ConfigError(message.splitlines()[0])
    if not dist.is_main_process():
        result = build()
    dist.barrier()
    return result


def build_dataset_once(build: Callable[[], T], *, images: str) -> T:
    """An Ultralytics dataset from `build`, made on rank 0 first; its errors become one line naming `images`."""

    def build_checked() -> T:
        try:
            return build()
        except (FileNotFoundError, AssertionError, RuntimeError) as error:  # no images, no labels, a bad cache
            raise ConfigError(
                f"{images}: {one_line(error)} Check that entry of the data.yaml and that the images there are readable"
            ) from None

    return _main_first(build_checked)


def _build_dataset(hyp: SimpleNamespace, data: dict[str, Any], *, split: str, batch: int, stride: int):
    from ultralytics.data.build import build_yolo_dataset

    mode = "train" if split == "train" else "val"
    return build_dataset_once(
        lambda: build_yolo_dataset(hyp, data[split], batch, data, mode=mode, rect=mode == "val", stride=stride),
        images=f"{split} images {data[split]} (the data.yaml's '{split}:')",
    )


@dataclass
class TrainData:
    """The training dataset and how to make each epoch's loader."""

    dataset: Any
    micro_batch: int
    workers: int
    seed: int
    pin_memory: bool

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def batches_per_epoch(self) -> int:
        per_rank = -(-len(self.dataset) // dist.get_world_size())  # DistributedSampler pads to equal shards
        return -(-per_rank // self.micro_batch)

    def close_mosaic(self, hyp: SimpleNamespace) -> None:
        """Ultralytics' last-epochs switch to plain letterboxed images (its `close_mosaic`)."""
        self.dataset.mosaic = False
        self.dataset.close_mosaic(hyp=copy(hyp))

    def loader_for_epoch(self, epoch: int) -> DataLoader:
        """This rank's shard for `epoch`, with every random stream seeded from (seed, epoch, rank)."""
        rank = dist.get_rank()
        epoch_seed = self.seed + 1_000_003 * epoch + 7919 * rank  # distinct per epoch and rank
        random.seed(epoch_seed)  # augmentation in the main process (workers=0) draws from these
        np.random.seed(epoch_seed % 2**32)
        _empty_mosaic_buffer(self.dataset)
        sampler = DistributedSampler(
            self.dataset, num_replicas=dist.get_world_size(), rank=rank, shuffle=True, seed=self.seed
        )
        sampler.set_epoch(epoch)
        return _StopSafeDataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=sampler,
            num_workers=self.workers,
            collate_fn=self.dataset.collate_fn,
            worker_init_fn=_init_worker,
            generator=torch.Generator().manual_seed(epoch_seed),  # worker seeds
            pin_memory=self.pin_memory,
            persistent_workers=False,  # a fresh worker state each epoch is what makes resume exact
        )


def _init_worker(worker_id: int) -> None:
    """Ultralytics' per-worker seeding; stop signals are the training process's to handle, not the worker's."""
    from ultralytics.data.build import seed_worker

    ignore_stop_signals()
    seed_worker(worker_id)


class _StopSafeDataLoader(DataLoader):
    """A DataLoader that forks its workers with stop signals held back (see preemption.signals_blocked)."""

    def _get_iterator(self):
        with signals_blocked():
            return super()._get_iterator()


def _empty_mosaic_buffer(dataset) -> None:
    """Mosaic draws partners from recently loaded images; each epoch starts with none, as after a resume."""
    if dataset.cache != "ram":
        for index in dataset.buffer:
            dataset.ims[index], dataset.im_hw0[index], dataset.im_hw[index] = None, None, None
    dataset.buffer.clear()


def build_train_data(
    hyp: SimpleNamespace,
    data: dict[str, Any],
    *,
    micro_batch: int,
    workers: int,
    seed: int,
    stride: int,
    pin_memory: bool,
) -> TrainData:
    """Ultralytics' YOLODataset for the train split, built once per rank."""
    dataset = _build_dataset(hyp, data, split="train", batch=micro_batch, stride=stride)
    return TrainData(dataset=dataset, micro_batch=micro_batch, workers=workers, seed=seed, pin_memory=pin_memory)


def build_val_loader(
    hyp: SimpleNamespace, data: dict[str, Any], *, batch: int, workers: int, stride: int, device: torch.device
):
    """Ultralytics' validation loader: rectangular batches, a contiguous shard per rank, merged by its validator."""
    from ultralytics.data.build import build_dataloader

    dataset = _build_dataset(hyp, data, split="val", batch=batch, stride=stride)
    rank_flag = dist.get_local_rank() if dist.get_world_size() > 1 else -1  # Ultralytics shards when != -1
    # Its InfiniteDataLoader forks workers right here; with stop signals blocked they stay pending in them for good.
    with signals_blocked():
        return build_dataloader(dataset, batch=batch, workers=workers, shuffle=False, rank=rank_flag, device=device)


def preprocess_batch(
    batch: dict[str, Any],
    *,
    device: torch.device,
    input_dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, Any]:
    """Move a collated batch to the device and scale images to [0, 1], as Ultralytics' DetectionTrainer does."""
    non_blocking = device.type == "cuda"
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            batch[key] = value.to(device, non_blocking=non_blocking)
    # Images in the model's memory format: ZeRO 1-2 flatten parameters back to NCHW, the input keeps convs NHWC.
    batch["img"] = (batch["img"].float() / 255).to(input_dtype).contiguous(memory_format=memory_format)
    return batch
