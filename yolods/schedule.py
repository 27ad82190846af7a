"""Ultralytics' learning-rate schedule, warmup and accumulation ramp, as a pure function of the iteration.

Being a function of (iteration, epoch) alone, it needs no state in checkpoints: a resumed run recomputes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepPlan:
    """What one micro-step should use: each group's lr, SGD momentum (None: leave it as the optimizer has it),
    and the accumulation in force."""

    lrs: list[float]
    momentum: float | None
    accumulate: int


@dataclass(frozen=True)
class Schedule:
    """Linear or cosine lr per epoch, with Ultralytics' warmup over the first iterations.

    During warmup (max over `warmup_epochs` of iterations, leaving the last epoch out) bias lr falls from
    `warmup_bias_lr`, other lrs rise from 0, momentum rises from `warmup_momentum`, and gradient accumulation
    ramps from 1 to its nominal value, all linearly in the iteration, as in Ultralytics' trainer.
    """

    epochs: int
    batches_per_epoch: int
    accumulate: int
    lr0_per_group: tuple[float, ...]
    bias_groups: tuple[bool, ...]
    lrf: float
    cos_lr: bool
    momentum: float
    warmup_epochs: float
    warmup_momentum: float
    warmup_bias_lr: float

    @property
    def warmup_iterations(self) -> int:
        warmup_epochs = min(self.warmup_epochs, max(self.epochs - 1, 0))
        return round(warmup_epochs * self.batches_per_epoch) if warmup_epochs > 0 else 0

    def lr_factor(self, epoch: int) -> float:
        """Ultralytics' `lf`: 1 -> lrf over the run, linearly or on a half cosine."""
        if self.cos_lr:
            return ((1 - math.cos(epoch * math.pi / self.epochs)) / 2) * (self.lrf - 1) + 1
        return max(1 - epoch / self.epochs, 0) * (1.0 - self.lrf) + self.lrf

    def at(self, iteration: int, epoch: int) -> StepPlan:
        """The plan for global micro-step `iteration` (= batch index + epoch x batches_per_epoch)."""
        targets = [lr0 * self.lr_factor(epoch) for lr0 in self.lr0_per_group]
        warmup = self.warmup_iterations
        if not warmup:  # Ultralytics then never sets momentum: it stays what the optimizer was built with
            return StepPlan(lrs=targets, momentum=None, accumulate=self.accumulate)
        if iteration > warmup:
            return StepPlan(lrs=targets, momentum=self.momentum, accumulate=self.accumulate)
        xp = [0, warmup]
        lrs = [
            float(np.interp(iteration, xp, [self.warmup_bias_lr if is_bias else 0.0, target]))
            for target, is_bias in zip(targets, self.bias_groups)
        ]
        momentum = float(np.interp(iteration, xp, [self.warmup_momentum, self.momentum]))
        accumulate = max(1, int(np.interp(iteration, xp, [1, self.accumulate]).round()))
        return StepPlan(lrs=lrs, momentum=momentum, accumulate=accumulate)
