"""The learning-rate and weight-decay rule above Ultralytics' nominal batch `nbs`: `--large_batch_rule`.

Ultralytics' rule (8.4.190, `BaseTrainer._setup_train` and `_do_train`), which yolods follows at or below `nbs`:
accumulate = max(round(nbs / batch), 1) batches per optimizer step, weight_decay x batch x accumulate / nbs, lr
unchanged, warmup over `warmup_epochs` x batches per epoch (no floor in steps). Its loss is a sum over the
images, so the gradient grows with the images per optimizer step: under SGD the step already grows linearly
with the batch (Goyal et al.'s linear scaling rule, built in), while Adam-type optimizers divide the gradient's
scale away, so at k times the batch they take k times fewer steps of the same size and under-train.

yolods' rule (the default) changes nothing unless the images per optimizer step exceed `nbs` beyond what
Ultralytics' own rounding to `nbs` gives; then, with k = images per optimizer step / nbs:

- SGD, MuSGD: Ultralytics' rule (its summed loss is the linear rule; weight_decay x k keeps the L2 term's
  ratio to the summed gradient and the decay per epoch).
- AdamW: lr x sqrt(k), the square-root rule for Adam-type optimizers (Malladi et al. 2022, "On the SDEs and
  Scaling Rules for Adaptive Gradient Algorithms"), and weight_decay x sqrt(k) instead of x k: decoupled decay
  shrinks the weights by lr x wd per step, so lr x wd x steps per epoch stays what Ultralytics' rule gives.
- Adam, Adamax, NAdam, RAdam, RMSprop: lr x sqrt(k); weight_decay x k as Ultralytics: their L2 term is added to
  the summed gradient before the normalisation, so its ratio to that gradient, not lr x wd, sets its strength.
- Warmup: Ultralytics' `warmup_epochs` x batches per epoch, already measured in epochs (in samples), with its
  bias-lr and momentum ramps; kept as is.

`--large_batch_rule ultralytics` restores Ultralytics' rule exactly. The recipe is a pure function of the run's
settings, so a resumed run derives the same one (the flag cannot change on resume).

Examples:
    >>> recipe = large_batch_recipe(rule="yolods", optimizer_name="AdamW", images_per_step=512, nbs=64)
    >>> round(recipe.lr_scale, 3), round(recipe.weight_decay_scale, 3)
    (2.828, 0.354)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RULES = ("yolods", "ultralytics")
# Optimizers whose step is (close to) invariant to the gradient's scale, as Ultralytics builds them.
ADAPTIVE_OPTIMIZERS = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop")
# Of those, the ones whose weight decay is decoupled from the gradient (p -= lr x wd x p).
DECOUPLED_DECAY_OPTIMIZERS = ("AdamW",)


@dataclass(frozen=True)
class LargeBatchRecipe:
    """What the run's rule changes relative to Ultralytics' rule (scales of 1.0: nothing).

    `weight_decay_scale` multiplies the weight decay Ultralytics' rule gives (already x k).
    """

    rule: str  # "yolods" or "ultralytics", as asked
    optimizer_name: str  # the optimizer built (what `auto` resolved to)
    factor: float  # k = images per optimizer step / nbs; the recipe acts only when > 1
    lr_scale: float = 1.0
    weight_decay_scale: float = 1.0

    @property
    def changes_anything(self) -> bool:
        return self.lr_scale != 1.0 or self.weight_decay_scale != 1.0

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale every group's lr (what the schedule takes as its lr0) and every decayed group's weight decay."""
        for group in optimizer.param_groups:
            group["lr"] *= self.lr_scale
            if group.get("weight_decay"):
                group["weight_decay"] *= self.weight_decay_scale


def large_batch_factor(*, global_batch: int, accumulate: int, nbs: int) -> float:
    """k = images per optimizer step / nbs, or 1.0 where Ultralytics' rule itself sets the step to about nbs.

    At or below nbs Ultralytics accumulates round(nbs / batch) batches, which can give up to ~1.3 nbs images per
    step (batch 42: 2 x 42 = 84); that is Ultralytics' own behaviour, which yolods keeps. An accumulation set
    otherwise (a DeepSpeed JSON's gradient_accumulation_steps) or a batch above nbs is a large batch.
    """
    ultralytics_accumulate = max(round(nbs / global_batch), 1)
    if global_batch <= nbs and accumulate == ultralytics_accumulate:
        return 1.0
    return max(global_batch * accumulate / nbs, 1.0)


def large_batch_recipe(*, rule: str, optimizer_name: str, images_per_step: int, nbs: int) -> LargeBatchRecipe:
    """The recipe of `rule` for `optimizer_name` (a torch/Ultralytics optimizer class name) at k = images / nbs.

    `images_per_step` should come through `large_batch_factor` (see `recipe_for`), which keeps Ultralytics'
    accumulation to nbs out of the rule.
    """
    if rule not in RULES:
        raise ValueError(f"large batch rule {rule!r}: expected one of {RULES}")
    factor = max(images_per_step / nbs, 1.0)
    if rule == "ultralytics" or factor <= 1.0 or optimizer_name not in ADAPTIVE_OPTIMIZERS:
        return LargeBatchRecipe(rule=rule, optimizer_name=optimizer_name, factor=factor)
    sqrt_k = math.sqrt(factor)
    # Ultralytics' weight decay is already x k; decoupled decay wants x sqrt(k) with the sqrt(k) larger lr.
    weight_decay_scale = sqrt_k / factor if optimizer_name in DECOUPLED_DECAY_OPTIMIZERS else 1.0
    return LargeBatchRecipe(
        rule=rule,
        optimizer_name=optimizer_name,
        factor=factor,
        lr_scale=sqrt_k,
        weight_decay_scale=weight_decay_scale,
    )


def recipe_for(plan, optimizer: torch.optim.Optimizer) -> LargeBatchRecipe:
    """The recipe of a RunPlan for the optimizer built for it (`optimizer=auto` resolved)."""
    nbs = plan.hyp.nbs
    factor = large_batch_factor(global_batch=plan.batch.global_batch, accumulate=plan.batch.accumulate, nbs=nbs)
    return large_batch_recipe(
        rule=plan.cfg.large_batch_rule,
        optimizer_name=type(optimizer).__name__,
        images_per_step=round(factor * nbs),
        nbs=nbs,
    )


def describe(plan, optimizer: torch.optim.Optimizer, *, warmup_batches: int, batches_per_epoch: int) -> str:
    """The start-of-run line naming the rule applied and the lr, weight decay and warmup it gave."""
    recipe = recipe_for(plan, optimizer)
    groups = optimizer.param_groups
    lr0 = min(group["lr"] for group in groups)  # MuSGD boosts some groups' lr x 3; the others have lr0
    weight_decay = max((group.get("weight_decay", 0.0) for group in groups), default=0.0)
    images = plan.batch.images_per_optimizer_step
    nbs = plan.hyp.nbs
    if recipe.factor <= 1.0:
        applied = f"Ultralytics' (at most ~nbs {nbs} images per optimizer step)"
    elif recipe.changes_anything:
        applied = (
            f"yolods' for {recipe.optimizer_name} at k = {recipe.factor:g}: lr x {recipe.lr_scale:.3g}, "
            f"weight decay x {recipe.factor * recipe.weight_decay_scale:.3g} (Ultralytics: lr x 1, weight decay x {recipe.factor:g})"
        )
    elif recipe.rule == "yolods":
        applied = f"yolods' for {recipe.optimizer_name} at k = {recipe.factor:g}, which is Ultralytics' (summed loss: linear lr scaling)"
    else:
        applied = f"Ultralytics' (--large_batch_rule ultralytics) at k = {recipe.factor:g}"
    warmup_epochs = warmup_batches / max(batches_per_epoch, 1)
    return (
        f"large batch: {images} images per optimizer step, nbs {nbs}; rule {applied}; "
        f"{recipe.optimizer_name} lr0 {lr0:.6g}, weight_decay {weight_decay:.6g}, "
        f"warmup {warmup_batches} batches ({warmup_epochs:.3g} epochs)"
    )
