"""Adapter for Ultralytics' DetectionValidator, sharded over ranks: per-epoch validation of the EMA weights during
training (`EpochValidator`), and standalone validation of trained weights (`validate_trained`, for yolods.val).

`EpochValidator` runs the validator in its training mode, which reads a handful of trainer attributes;
`_trainer_view` provides exactly those. `validate_trained` runs it in its standalone mode, as
`YOLO(weights).val()` does; see `ShardedDetectionValidator` for what changes under a launcher.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionValidator

from yolods import dist
from yolods.data.loaders import build_dataset_once
from yolods.fonts import local_fonts
from yolods.model import TrainedDetector
from yolods.preemption import signals_blocked


class EpochValidator:
    """Runs Ultralytics' validator in its training mode: each rank scores a contiguous shard of the val set and
    rank 0 merges the statistics (mAP50, mAP50-95, precision, recall).

    The validator reads a handful of trainer attributes; `_trainer_view` provides exactly those.

    Examples:
        >>> validator = EpochValidator(val_loader, hyp=hyp, data=data, run_dir=run_dir, device=device, loss_names=names)
        >>> metrics = validator(ema_model, epoch=0, epochs=10)  # dict on rank 0, None elsewhere
    """

    def __init__(
        self,
        val_loader,
        *,
        hyp: SimpleNamespace,
        data: dict[str, Any],
        run_dir,
        device: torch.device,
        loss_names: tuple[str, ...],
        paired_data: bool = False,
    ):
        args = {**vars(hyp), "plots": False, "save_json": False}  # plots would fetch a font; yolods plots curves itself
        self.validator = DetectionValidator(val_loader, save_dir=run_dir, args=args)
        self.data = data
        self.device = device
        self.loss_names = loss_names
        self.paired_data = paired_data
        # Called once per val batch this rank scores (the fault watchdog counts them, as it counts train steps).
        self.on_progress: Callable[[str], None] | None = None
        self._batches_scored = 0
        self._most_batches: int | None = None  # the largest shard's batches, over the ranks
        self.validator.add_callback("on_val_start", self._shard_started)
        self.validator.add_callback("on_val_batch_end", self._batch_scored)

    def _trainer_view(self, model: nn.Module, *, epoch: int, epochs: int) -> SimpleNamespace:
        return SimpleNamespace(
            device=self.device,
            data=self.data,
            amp=False,  # validate the fp32 EMA in fp32
            loss_items={name: torch.zeros((), device=self.device) for name in self.loss_names},
            stopper=SimpleNamespace(possible_stop=False),
            epoch=epoch,
            epochs=epochs,
            ema=SimpleNamespace(ema=model),
            # Ultralytics averages val losses with ReduceOp.AVG, which gloo lacks; yolods averages them below.
            world_size=1,
            label_loss_items=lambda losses, prefix="val": {
                f"{prefix}/{k}": round(float(v), 5) for k, v in losses.items()
            },
        )

    def __call__(self, model: nn.Module, *, epoch: int, epochs: int) -> dict[str, float] | None:
        """Validate `model` (identical on every rank); returns metrics on rank 0, None on the others."""
        if self._most_batches is None:  # once: the shards do not change
            self._most_batches = dist.max_over_ranks(len(self.validator.dataloader))
        metrics = self.validator(trainer=self._trainer_view(model, epoch=epoch, epochs=epochs))
        # the mean over every rank's batches: a rank with an empty shard (fewer val images than ranks) adds no batch,
        # where a mean of the ranks' means counted it as a loss of 0
        loss_sums = [self.validator.loss[name].detach().float().reshape(()) for name in self.loss_names]
        batches = torch.tensor(float(len(self.validator.dataloader)), device=self.device)
        sums_and_batches = torch.stack([*loss_sums, batches])
        dist.all_reduce_sum_(sums_and_batches)
        losses = sums_and_batches[:-1] / sums_and_batches[-1].clamp(min=1)
        if self.paired_data:
            self._draw_for_other_ranks_images()
        if not dist.is_main_process():
            return None
        metrics.update({f"val/{name}": round(float(loss), 5) for name, loss in zip(self.loss_names, losses)})
        return metrics

    def _shard_started(self, validator: DetectionValidator) -> None:
        self._batches_scored = 0
        if not len(validator.dataloader):  # a rank with no val images is done at once
            self._count_up_to_the_largest_shard()

    def _batch_scored(self, validator: DetectionValidator) -> None:
        """Count each scored batch, so a rank hung in validation is told from a slower one (yolods.faults.PeerPulse).

        Shards can differ by a batch; a rank done with a shorter one then counts up to the largest, so that every
        rank leaves validation at the same count and none looks stuck while rank 0 saves a checkpoint.
        """
        self._batches_scored += 1
        self._progress()
        if self._batches_scored == len(validator.dataloader):
            self._count_up_to_the_largest_shard()

    def _count_up_to_the_largest_shard(self) -> None:
        for _ in range(self._most_batches - self._batches_scored):
            self._progress()

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress("val batch")

    def _draw_for_other_ranks_images(self) -> None:
        """--paired_data: draw from Python's random state for the val images the other ranks scored.

        Ultralytics' Format transform draws random.uniform once per image even in validation (its bgr check), from
        the process's random state, which a `--workers 0` train loader augments from next. One process scores every
        val image, a rank only its shard: drawing for the rest leaves the state of the 1-rank run, so the next
        epoch augments as it does (tests/test_world_size.py follows such a run step by step).
        """
        loader = self.validator.dataloader
        if loader.num_workers == 0:  # loader workers draw from their own states, not this process's
            for _ in range(len(loader.dataset) - len(loader.sampler)):
                random.uniform(0, 1)


class ShardedDetectionValidator(DetectionValidator):
    """Ultralytics' standalone DetectionValidator with the split sharded over ranks and merged exactly.

    Run under a launcher (RANK set), Ultralytics' standalone validator assumes its own DDP trainer pinned a CUDA
    device (it fails on CPU) and has every rank score the whole split, which its `gather_stats` then merges: every
    image counted once per rank. Here each rank runs it as a single process (`_standalone_on_every_rank`) over a
    contiguous run of whole rect batches (Ultralytics' ContiguousDistributedSampler), and Ultralytics' own
    `gather_stats` concatenates the ranks' statistics in rank order, which is the split's order. Each image is thus
    scored once, letterboxed to its batch's rect shape exactly as on one process, and the merged statistics are
    the single-process ones element for element: the same P, R, mAP50 and mAP50-95. `images_per_rank` records
    what each rank scored, and rank 0 checks that they add up to the split.
    """

    images_per_rank: list[int] | None = None

    def get_dataloader(self, dataset_path: str, batch_size: int):
        """Ultralytics' get_dataloader, with the dataset built on rank 0 first and the loader sharded by rank."""
        from ultralytics.data import build_dataloader
        from ultralytics.utils import LOGGER

        dataset = build_dataset_once(
            lambda: self.build_dataset(dataset_path, batch=batch_size, mode="val"), images=f"{self.args.split} images"
        )
        if self.names and len(self.names) < self.data["nc"]:  # standalone val of a model with fewer classes
            LOGGER.warning(f"Skipping labels of classes the model (nc={len(self.names)}) cannot predict.")
            dataset.update_labels(list(range(len(self.names))))
        rank_flag = dist.get_rank() if dist.get_world_size() > 1 else -1  # Ultralytics shards when != -1
        with signals_blocked():  # its loader forks workers here (CUDA only; validation on CPU loads in-process)
            return build_dataloader(
                dataset,
                batch_size,
                self.args.workers,
                shuffle=False,
                rank=rank_flag,
                pin_memory=False,
                device=self.device,
            )

    def gather_stats(self) -> None:
        self.images_per_rank = dist.gather_objects(self.seen)
        super().gather_stats()  # Ultralytics' merge, in rank order (no-op on one process)
        if dist.is_main_process() and sum(self.images_per_rank) != len(self.dataloader.dataset):
            raise RuntimeError(f"ranks scored {self.images_per_rank} images of {len(self.dataloader.dataset)}")

    # After the merge only rank 0 holds statistics: the others skip computing, printing and plotting them.
    def get_stats(self) -> dict[str, Any]:
        return super().get_stats() if dist.is_main_process() else {}

    def finalize_metrics(self) -> None:
        if dist.is_main_process():
            super().finalize_metrics()

    def print_results(self) -> None:
        if dist.is_main_process():
            super().print_results()

    def plot_val_samples(self, batch: dict[str, Any], ni: int) -> None:
        if dist.is_main_process():
            super().plot_val_samples(batch, ni)

    def plot_predictions(self, batch: dict[str, Any], preds, ni: int, max_det: int | None = None) -> None:
        if dist.is_main_process():
            super().plot_predictions(batch, preds, ni, max_det)


@contextlib.contextmanager
def _standalone_on_every_rank() -> Iterator[None]:
    """Within the block, Ultralytics' BaseValidator.__call__ takes each rank for a single process.

    It reads its module's RANK for two things only: the device (a CUDA device a DDP trainer pinned, else the
    `device` setting) and which ranks compute the final statistics (ShardedDetectionValidator does the latter
    itself). The RANK that DetectionValidator.gather_stats reads, in its own module, stays the real one.
    """
    import ultralytics.engine.validator as base_validator

    real_rank = base_validator.RANK
    base_validator.RANK = -1
    try:
        yield
    finally:
        base_validator.RANK = real_rank


def validate_trained(
    detector: TrainedDetector, *, settings: dict[str, Any], save_dir: Path, on_batch_end: Callable[[], None]
) -> dict[str, Any] | None:
    """What `YOLO(weights).val(**settings)` computes, with the split sharded over ranks; rank 0 prints as it does.

    Returns on rank 0 the metrics (Ultralytics' names), per-class results, image counts and speed; None elsewhere.
    `on_batch_end` is called after every batch (yolods.inference.Job.check_stop).

    Examples:
        >>> summary = validate_trained(detector, settings={"data": "data.yaml", "batch": 16}, save_dir=run_dir,
        ...                            on_batch_end=job.check_stop)
    """
    args = {**detector.defaults, "rect": True, **settings, "mode": "val"}  # as YOLO.val composes them
    validator = ShardedDetectionValidator(args=args, save_dir=save_dir)
    validator.add_callback("on_val_batch_end", lambda _: on_batch_end())
    with _standalone_on_every_rank(), local_fonts():  # plots draw text with PIL: Ultralytics would fetch Arial
        validator(model=detector.module)
    if not dist.is_main_process():
        return None
    metrics = validator.metrics
    return {
        "images": int(validator.seen),
        "images_per_rank": validator.images_per_rank,
        "instances": int(metrics.nt_per_class.sum()),
        "metrics": {key: float(value) for key, value in metrics.results_dict.items()},
        "per_class": [{key: _plain(value) for key, value in row.items()} for row in metrics.summary(decimals=6)],
        "speed_ms_per_image": {key: float(value) for key, value in metrics.speed.items()},
    }


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python number JSON can hold."""
    return value.item() if hasattr(value, "item") else value
