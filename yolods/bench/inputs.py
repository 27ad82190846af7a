"""Batches for the timed steps: `synthetic` tensors made on the device, or `real` ones from yolods' dataloader.

Synthetic input is the ceiling (compute and communication only); real input runs Ultralytics' augmentation and
collation through the loader yolods trains with, so the gap between the two is the data-loading cost.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from yolods import dist
from yolods.data import build_train_data, preprocess_batch
from yolods.data.synthetic import CLASS_NAMES, make_synthetic_dataset

BOXES_PER_IMAGE = 3  # the shapes set draws 1-3 per image


def synthetic_batch(
    *,
    micro_batch: int,
    imgsz: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype,
    memory_format: torch.memory_format,
    seed: int,
) -> dict[str, torch.Tensor]:
    """One preprocessed batch in Ultralytics' format (img in [0, 1], cls, normalised xywh bboxes, batch_idx)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device) * (high - low) + low

    num_boxes = micro_batch * BOXES_PER_IMAGE
    centers = uniform(num_boxes, 2, low=0.25, high=0.75)
    sizes = uniform(num_boxes, 2, low=0.05, high=0.4)
    return {
        "img": uniform(micro_batch, 3, imgsz, imgsz).to(dtype).contiguous(memory_format=memory_format),
        "cls": torch.randint(0, num_classes, (num_boxes, 1), generator=generator, device=device).float(),
        "bboxes": torch.cat([centers, sizes], dim=1),
        "batch_idx": torch.arange(micro_batch, device=device).repeat_interleave(BOXES_PER_IMAGE).float(),
    }


def repeat_batch(batch: dict[str, torch.Tensor]) -> Iterator[dict[str, Any]]:
    """The same on-device batch forever (a shallow copy each step: the model may add keys to it)."""
    while True:
        yield dict(batch)


def shapes_dataset(*, num_images: int, imgsz: int, seed: int) -> str:
    """The drawn-shapes set in a node-local cache, made by each node's first rank; returns its data.yaml.

    Every rank reads it (multi-node jobs have no shared temp dir), so each node writes its own copy.
    """
    root = Path(tempfile.gettempdir()) / "yolods-bench" / f"shapes-{imgsz}px-{num_images}-seed{seed}"
    if dist.get_local_rank() == 0:
        make_synthetic_dataset(root, num_train=num_images, num_val=8, imgsz=imgsz, seed=seed)
    dist.barrier()
    return str(root / "data.yaml")


def real_batches(
    hyp: SimpleNamespace,
    data: dict[str, Any],
    *,
    micro_batch: int,
    workers: int,
    seed: int,
    stride: int,
    device: torch.device,
    input_dtype: torch.dtype,
    memory_format: torch.memory_format,
) -> Iterator[dict[str, Any]]:
    """Batches from yolods' train loader (augmentation on), moved to the device; epochs repeat as needed."""
    train_data = build_train_data(
        hyp, data, micro_batch=micro_batch, workers=workers, seed=seed, stride=stride, pin_memory=device.type == "cuda"
    )
    epoch = 0
    while True:
        for batch in train_data.loader_for_epoch(epoch):
            yield preprocess_batch(batch, device=device, input_dtype=input_dtype, memory_format=memory_format)
        epoch += 1


def shapes_num_classes() -> tuple[int, dict[int, str]]:
    """Classes of the drawn-shapes set, which synthetic input also uses."""
    return len(CLASS_NAMES), dict(enumerate(CLASS_NAMES))
