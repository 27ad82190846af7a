"""The learning-rate and weight-decay rule above Ultralytics' nominal batch `nbs`: `--large_batch_rule`.

Ultralytics' rule (8.4.190, `BaseTrainer._setup_train` and `_do_train`), which yolods follows at or below `nbs`:
accumulate = max(round(nbs / batch), 1) batches per optimizer step, weight_decay x batch x accumulate / nbs, lr
unchanged, warmup over `warmup_epochs` x batches per epoch (no floor in steps). Its loss is a sum over the
images, so the gradient grows with the images per optimizer step, and unclipped SGD would grow its step with the
batch (the linear scaling rule, built in). But the gradient is clipped to norm 10 (Ultralytics' max_norm, yolods'
default `gradient_clipping`), and the summed gradient's norm is 10^2-10^4 (measured here, yolov8n from scratch on
the drawn shapes at imgsz 64: ~1500 at the start and ~180 after 10 epochs at 16 images per step, 1900-12000 at
128): every step is clipped, so SGD's step has a fixed size, as Adam-type optimizers' have by normalisation. At k
times the batch every optimizer then takes k times fewer steps of the same size, and the model under-trains.

yolods' rule (the default) changes nothing unless the images per optimizer step exceed `nbs` beyond what
Ultralytics' own rounding to `nbs` gives; then, with k = images per optimizer step / nbs:

- Adam-type (AdamW, which `auto` picks for up to 10,000 iterations; Adam, Adamax, NAdam, RAdam, RMSprop): lr x k,
  the linear scaling rule (DeiT's and MAE's for AdamW; Goyal et al. 2017 and YOLOX's lr = 0.01 x batch / 64 for
  SGD), which gives a fixed-size-step optimizer back the distance per epoch it has at nbs. The square-root rule
  usual for Adam (Malladi et al. 2022) reached a third of its mAP below.
- SGD, MuSGD with a clipped gradient (the default): lr x sqrt(k), the square-root rule (Hoffer et al. 2017).
  Ultralytics' SGD lr0 0.01 is already large: x k made the run unstable for 4 of its 10 epochs below.
- Without clipping (`gradient_clipping: 0` in a DeepSpeed JSON) SGD and MuSGD keep
  Ultralytics' lr and weight decay: their summed loss is the linear rule.
- Weight decay x k / lr scale instead of Ultralytics' x k: decay shrinks the weights by about lr x wd per step
  (SGD adds it after the clip, AdamW decouples it, Adam's L2 joins a clipped gradient of fixed size), so this
  keeps lr x wd x steps per epoch, the decay per epoch, as at nbs (AdamW: the base value; SGD: x sqrt(k)). Adam-type
  with coupled L2 and no clipping keeps Ultralytics' x k, which keeps the L2 term's ratio to the summed gradient.
- BatchNorm momentum m -> 1 - (1 - m)^(global batch / nbs): the running statistics move once per forward, so at a
  k times larger forward they would average over k times more images (epochs) and lag behind weights that move
  further per step; the EMA copy and the saved weights keep Ultralytics' m.
- Warmup: Ultralytics' `warmup_epochs` x batches per epoch, already measured in epochs (in samples), with its
  bias-lr and momentum ramps; kept as is.

Measured here (yolov8n from scratch, 1024 drawn-shapes images at imgsz 64, nbs 16, batch 128 = 8 x nbs, 10 epochs
= 80 optimizer steps, one seed, final mAP50-95): AdamW 0.000 with Ultralytics' rule, 0.062 with lr and decay
x sqrt(k), 0.181 with lr and decay x k, 0.353 with this recipe (lr x k, base decay, BatchNorm momentum); SGD 0.166
with lr and decay x sqrt(k), 0.141 with lr and decay x k. benchmarks/large_batch.py measures it at nbs 64 with
seeds (README: Large global batch); its ablation at batch 512 (AdamW, 2 seeds, benchmarks/results/
large_batch_ablation): the whole recipe 0.393, without BatchNorm momentum 0.260, without the lr rule 0.279, without
the decay rule 0.390 (neutral over 20 epochs; kept for the decay per epoch), Ultralytics' rule 0.004.

`--large_batch_rule ultralytics` restores Ultralytics' rule exactly. For ablations the flag also takes the parts of
yolods' rule to apply, joined by '+': `lr` (the lr rule), `decay` (weight decay x k / the lr part's scale instead of
x k; alone it changes nothing), `batchnorm` (the momentum rule); `yolods` is `lr+decay+batchnorm`. The recipe is a
pure function of the run's settings, so a resumed run derives the same one (the flag cannot change on resume).

Examples:
    >>> recipe = large_batch_recipe(rule="yolods", optimizer_name="AdamW", images_per_step=512, nbs=64)
    >>> recipe.lr_scale, recipe.weight_decay_scale, recipe.batchnorm_steps
    (8.0, 0.125, 8.0)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

RULES = ("yolods", "ultralytics")
PARTS = ("lr", "decay", "batchnorm")  # what yolods' rule changes; a '+'-joined subset is an ablation of it
# Optimizers whose step is (close to) invariant to the gradient's scale, as Ultralytics builds them.
ADAPTIVE_OPTIMIZERS = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop")
# Of those, the ones whose weight decay is decoupled from the gradient (p -= lr x wd x p).
DECOUPLED_DECAY_OPTIMIZERS = ("AdamW",)


@dataclass(frozen=True)
class LargeBatchRecipe:
    """What the run's rule changes relative to Ultralytics' rule (scales of 1.0: nothing).

    `weight_decay_scale` multiplies the weight decay Ultralytics' rule gives (already x k); BatchNorm momentum m
    becomes 1 - (1 - m) ** `batchnorm_steps` (the running statistics forget per image as at nbs).
    """

    rule: str  # "yolods" or "ultralytics", as asked
    optimizer_name: str  # the optimizer built (what `auto` resolved to)
    factor: float  # k = images per optimizer step / nbs; the recipe acts only when > 1
    lr_scale: float = 1.0
    weight_decay_scale: float = 1.0
    batchnorm_steps: float = 1.0
    reason: str = ""  # why this optimizer gets these scales, for the start line

    @property
    def changes_anything(self) -> bool:
        return self.lr_scale != 1.0 or self.weight_decay_scale != 1.0 or self.batchnorm_steps != 1.0

    def scale_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale every group's lr (what the schedule takes as its lr0) and every decayed group's weight decay."""
        for group in optimizer.param_groups:
            group["lr"] *= self.lr_scale
            if group.get("weight_decay"):
                group["weight_decay"] *= self.weight_decay_scale

    def scale_batchnorm(self, model: nn.Module) -> None:
        """Set the momentum of the trained model's BatchNorm layers (an attribute, not state: a resumed run sets it
        again). Apply it after the EMA copy, so the saved weights keep Ultralytics' momentum for fine-tuning."""
        if self.batchnorm_steps == 1.0:
            return
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.momentum is not None:
                norm.momentum = 1 - (1 - norm.momentum) ** self.batchnorm_steps


def rule_parts(rule: str) -> frozenset[str]:
    """The parts of yolods' rule that a `--large_batch_rule` value applies: 'yolods' all, 'ultralytics' none.

    Examples:
        >>> sorted(rule_parts("lr+batchnorm"))
        ['batchnorm', 'lr']
    """
    if rule == "yolods":
        return frozenset(PARTS)
    if rule == "ultralytics":
        return frozenset()
    parts = rule.split("+")
    unknown = [part for part in parts if part not in PARTS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(
            f"large batch rule {rule!r}: expected {' or '.join(RULES)}, or parts of yolods' rule joined by '+' "
            f"({'+'.join(PARTS)})"
        )
    return frozenset(parts)


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


def large_batch_recipe(
    *, rule: str, optimizer_name: str, images_per_step: int, nbs: int, clipped: bool = True, forwards_per_step: int = 1
) -> LargeBatchRecipe:
    """The recipe of `rule` for `optimizer_name` (a torch/Ultralytics optimizer class name) at k = images / nbs.

    `clipped`: the gradient is clipped to a norm (yolods' default, Ultralytics' max_norm 10). `images_per_step`
    should come through `large_batch_factor` (see `recipe_for`), which keeps Ultralytics' accumulation to nbs out.
    `forwards_per_step`: accumulated micro-batches per optimizer step; each forward updates BatchNorm's statistics.
    """
    parts = rule_parts(rule)
    factor = max(images_per_step / nbs, 1.0)
    recipe = LargeBatchRecipe(rule=rule, optimizer_name=optimizer_name, factor=factor)
    if not parts or factor <= 1.0:
        return recipe
    if "batchnorm" in parts:
        # BatchNorm's running statistics move once per forward: k / forwards times fewer per epoch than at nbs.
        recipe = dataclasses.replace(recipe, batchnorm_steps=factor / forwards_per_step)
    if "lr" not in parts:
        return dataclasses.replace(recipe, reason="without its lr part")  # decay follows the lr part's scale
    if optimizer_name in ADAPTIVE_OPTIMIZERS:
        lr_scale, reason = factor, "Adam-type: linear rule"
    elif clipped:  # SGD, MuSGD: the clip fixes the step's size
        lr_scale, reason = math.sqrt(factor), "clipped SGD: square-root rule"
    else:
        return dataclasses.replace(recipe, reason="unclipped SGD: its summed loss is the linear rule")
    # Ultralytics' weight decay is x k. Decay shrinks the weights by about lr x wd per step (SGD adds it after the
    # clip, AdamW decouples it; Adam's L2 joins a clipped gradient of fixed size), so x k / lr_scale keeps
    # lr x wd x steps per epoch, the decay per epoch, as at nbs.
    weight_decay_scale = 1 / lr_scale if "decay" in parts else 1.0
    if not clipped and optimizer_name not in DECOUPLED_DECAY_OPTIMIZERS:
        # L2 joins the summed gradient (x k) before the normalisation: Ultralytics' x k keeps its ratio to it
        weight_decay_scale, reason = 1.0, f"{reason}, L2 in the unclipped gradient"
    return dataclasses.replace(recipe, lr_scale=lr_scale, weight_decay_scale=weight_decay_scale, reason=reason)


def recipe_for(plan, optimizer: torch.optim.Optimizer) -> LargeBatchRecipe:
    """The recipe of a RunPlan for the optimizer built for it (`optimizer=auto` resolved)."""
    nbs = plan.hyp.nbs
    factor = large_batch_factor(global_batch=plan.batch.global_batch, accumulate=plan.batch.accumulate, nbs=nbs)
    return large_batch_recipe(
        rule=plan.cfg.large_batch_rule,
        optimizer_name=type(optimizer).__name__,
        images_per_step=round(factor * nbs),
        nbs=nbs,
        clipped=float(plan.ds_config.get("gradient_clipping", 0.0)) > 0,
        forwards_per_step=plan.batch.accumulate,
    )


def describe(
    plan,
    optimizer: torch.optim.Optimizer,
    *,
    lr0_per_group: tuple[float, ...],
    warmup_batches: int,
    batches_per_epoch: int,
    accumulate: int,
) -> str:
    """The start-of-run line naming the rule applied and the lr, weight decay and warmup it gave.

    `lr0_per_group` is the schedule's: a resumed optimizer's groups hold the lr of the step it stopped at.
    `accumulate` too: capped at the run's batches, as Ultralytics caps it (a short run steps more often than nbs).
    """
    recipe = recipe_for(plan, optimizer)
    groups = optimizer.param_groups
    lr0 = min(lr0_per_group)  # MuSGD boosts some groups' lr x 3; the others have lr0
    weight_decay = max((group.get("weight_decay", 0.0) for group in groups), default=0.0)
    images = plan.batch.global_batch * accumulate
    nbs = plan.hyp.nbs
    if recipe.factor <= 1.0:
        applied = f"Ultralytics' (at most ~nbs {nbs} images per optimizer step)"
    elif recipe.changes_anything:
        steps = recipe.batchnorm_steps
        momentum = f"1 - (1 - m)^{steps:.3g}" if steps != 1.0 else "m (nbs images per forward)"
        which = "" if recipe.rule == "yolods" else f" ({recipe.rule} only)"
        applied = (
            f"yolods'{which} at k = {recipe.factor:g} ({recipe.reason}): lr x {recipe.lr_scale:.3g}, weight decay x "
            f"{recipe.factor * recipe.weight_decay_scale:.3g}, BatchNorm momentum {momentum} "
            f"(Ultralytics' rule: lr x 1, weight decay x {recipe.factor:g}, m)"
        )
    elif recipe.rule == "yolods":
        applied = f"yolods' at k = {recipe.factor:g} ({recipe.reason}), which is Ultralytics'"
    else:
        applied = f"Ultralytics' (--large_batch_rule ultralytics) at k = {recipe.factor:g}"
    warmup_epochs = warmup_batches / max(batches_per_epoch, 1)
    return (
        f"large batch: {images} images per optimizer step, nbs {nbs}; rule {applied}; "
        f"{recipe.optimizer_name} lr0 {lr0:.6g}, weight_decay {weight_decay:.6g}, "
        f"warmup {warmup_batches} batches ({warmup_epochs:.3g} epoch{'s' * (warmup_epochs != 1)})"
    )
