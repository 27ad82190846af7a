"""Raw collated batches for the timed steps: `synthetic` ones made on the device, or `real` ones from yolods' loader.

Both are what yolods' train loader yields (uint8 images, 0-255), so the step under test preprocesses them as in
training (to the device, / 255, the model's dtype and memory format). Synthetic input is the ceiling (no loading
or augmentation); real input runs Ultralytics' augmentation and collation through the loader yolods trains with,
so the gap between the two is the data-loading cost.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from yolods import dist
from yolods.data import TrainData
from yolods.data.synthetic import CLASS_NAMES, make_synthetic_dataset

BOXES_PER_IMAGE = 3  # the shapes set draws 1-3 per image


def synthetic_batch(
    *, micro_batch: int, imgsz: int, num_classes: int, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """One raw collated batch as the train loader yields it, made on the device: img uint8 NCHW with values
    0-255, cls, normalised xywh bboxes, batch_idx (Ultralytics' format)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device) * (high - low) + low

    num_boxes = micro_batch * BOXES_PER_IMAGE
    centers = uniform(num_boxes, 2, low=0.25, high=0.75)
    sizes = uniform(num_boxes, 2, low=0.05, high=0.4)
    return {
        "img": torch.randint(
            0, 256, (micro_batch, 3, imgsz, imgsz), generator=generator, device=device, dtype=torch.uint8
        ),
        "cls": torch.randint(0, num_classes, (num_boxes, 1), generator=generator, device=device).float(),
        "bboxes": torch.cat([centers, sizes], dim=1),
        "batch_idx": torch.arange(micro_batch, device=device).repeat_interleave(BOXES_PER_IMAGE).float(),
    }


def repeat_batch(batch: dict[str, torch.Tensor]) -> Iterator[dict[str, Any]]:
    """The same raw on-device batch forever (a shallow copy each step: preprocessing replaces its tensors)."""
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


def real_batches(train_data: TrainData) -> Iterator[dict[str, Any]]:
    """Raw batches from yolods' train loader (augmentation on), not preprocessed; epochs repeat as needed."""
    epoch = 0
    while True:
        yield from train_data.loader_for_epoch(epoch)
        epoch += 1


def shapes_num_classes() -> tuple[int, dict[int, str]]:
    """Classes of the drawn-shapes set, which synthetic input also uses."""
    return len(CLASS_NAMES), dict(enumerate(CLASS_NAMES))
