"""Adapter for Ultralytics' DetectionValidator: per-epoch validation of the EMA weights, sharded over ranks.

Wraps `ultralytics.models.yolo.detect.DetectionValidator` in its training mode, which reads a handful of
trainer attributes; `_trainer_view` provides exactly those.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from yolods import dist


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
    ):
        from ultralytics.models.yolo.detect import DetectionValidator

        args = {**vars(hyp), "plots": False, "save_json": False}  # plots would fetch a font; yolods plots curves itself
        self.validator = DetectionValidator(val_loader, save_dir=run_dir, args=args)
        self.data = data
        self.device = device
        self.loss_names = loss_names

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
        metrics = self.validator(trainer=self._trainer_view(model, epoch=epoch, epochs=epochs))
        num_batches = max(len(self.validator.dataloader), 1)
        losses = [self.validator.loss[name].detach().float().reshape(1) / num_batches for name in self.loss_names]
        dist.all_reduce_mean_(losses)
        if not dist.is_main_process():
            return None
        metrics.update({f"val/{name}": round(float(loss), 5) for name, loss in zip(self.loss_names, losses)})
        return metrics
