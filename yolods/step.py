"""One training step on the DeepSpeed engine: the code `yolods.train` runs and `yolods.bench` times.

forward -> backward (DeepSpeed reduces gradients in buckets during it) -> optimizer step at an accumulation
boundary, with Ultralytics' lr/momentum schedule, loss scaling and EMA, then the per-step agreement on a stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from yolods import dist
from yolods.data import preprocess_batch
from yolods.preemption import StopRequest
from yolods.schedule import Schedule

PHASES = ("preprocess", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class StepResult:
    """What one micro-step reports: this rank's detached losses, whether the optimizer stepped, whether to stop."""

    loss_items: torch.Tensor
    stepped: bool
    stop: bool


class TrainStep:
    """A micro-step of Ultralytics' detection training through DeepSpeed.

    `on_phase`, when set, is called with each name in PHASES as that phase ends (the bench times phases with
    it); training leaves it None.

    Examples:
        >>> step = TrainStep(engine, ema=ema, schedule=schedule, device=device, memory_format=fmt,
        ...                  loss_names=names, stop_request=StopRequest().install())
        >>> result = step(batch, iteration=0, epoch=0, last_in_epoch=False)
    """

    def __init__(
        self,
        engine,
        *,
        ema,
        schedule: Schedule,
        device: torch.device,
        memory_format: torch.memory_format,
        loss_names: tuple[str, ...],
        stop_request: StopRequest,
        step_at_epoch_end: bool = False,
        clip_norm: float | None = None,
    ):
        self.engine = engine
        self.ema = ema
        self.schedule = schedule
        self.device = device
        self.memory_format = memory_format
        self.loss_names = loss_names
        self.stop_request = stop_request
        self.step_at_epoch_end = step_at_epoch_end
        self.clip_norm = clip_norm  # clipped here with torch's clip_grad_norm_ (ZeRO-0), not by DeepSpeed
        self.zero_clip_norm = float(engine.gradient_clipping() or 0.0)  # clipped by DeepSpeed's ZeRO optimizer
        self.accumulating = False  # gradients summed since the last optimizer step, not applied yet
        self.zero_stage = engine.zero_optimization_stage()
        self.input_dtype = next(engine.module.parameters()).dtype  # bf16/fp16 only under DeepSpeed's own sections
        self.last_optimizer_iteration = -1
        self.stage0_grad_norm: float | None = None
        self.scale_at_last_step: float | None = None  # the fp16 loss scale of the last optimizer step (ZeRO 1-3)
        self.on_phase: Callable[[str], None] | None = None
        if self.zero_stage > 0:
            grow_scale_once_per_step(engine)

    def __call__(self, batch: dict[str, Any], *, iteration: int, epoch: int, last_in_epoch: bool) -> StepResult:
        """Train on one micro-batch; `iteration` counts micro-steps over the run (batch + epoch x batches)."""
        plan = self.schedule.at(iteration, epoch)
        for group, lr in zip(self.engine.optimizer.param_groups, plan.lrs):
            group["lr"] = lr
            if "momentum" in group and plan.momentum is not None:
                group["momentum"] = plan.momentum
        # Ultralytics steps when `accumulate` micro-batches have passed since its last step, across epoch ends;
        # accumulation ramps up during warmup, so the boundary is ours to set. `step_at_epoch_end` also steps
        # at the last batch of every epoch (not Ultralytics': off unless asked for).
        is_boundary = iteration - self.last_optimizer_iteration >= plan.accumulate or (
            last_in_epoch and self.step_at_epoch_end
        )
        self.engine.set_gradient_accumulation_boundary(is_boundary)
        batch = preprocess_batch(
            batch, device=self.device, input_dtype=self.input_dtype, memory_format=self.memory_format
        )
        self._phase_done("preprocess")
        loss, loss_items = self.engine(batch)
        self._phase_done("forward")
        # Ultralytics' loss is a sum over the rank's images; x world size because DeepSpeed, like DDP, averages
        # gradients over ranks. Never divided by accumulation: Ultralytics sums accumulated gradients.
        self.engine.backward(loss.sum() * dist.get_world_size(), scale_wrt_gas=False)
        self._phase_done("backward")
        if is_boundary and self.zero_stage == 0:
            self.stage0_grad_norm = self._clip_reduced_grads()
        elif is_boundary:
            self.scale_at_last_step = loss_scale(self.engine)  # before step() may grow it
            self._clip_where_the_gradients_are_scaled(self.scale_at_last_step)
        self.engine.step()
        if is_boundary and self.zero_stage > 0:
            back_off_after_skipped_step(self.engine)
        self.accumulating = not is_boundary
        if is_boundary:
            self.last_optimizer_iteration = iteration
            if self.ema is not None:  # the bench can time steps without it
                self.ema.update(self.engine.module)
        losses = torch.stack([loss_items[name].detach().float().cpu() for name in self.loss_names])  # .cpu() syncs
        stop = self.stop_request.agreed()  # a collective at every step, so all ranks stop at the same one
        self._phase_done("optimizer")
        return StepResult(loss_items=losses, stepped=is_boundary, stop=stop)

    def _phase_done(self, phase: str) -> None:
        if self.on_phase is not None:
            self.on_phase(phase)

    def grad_norm(self) -> float | None:
        """Global gradient norm before clipping at the last optimizer step (None before the first)."""
        if not self.zero_stage:
            return self.stage0_grad_norm
        norm = self.engine.get_global_grad_norm()
        # at ZeRO 1-3 DeepSpeed reports the norm of fp16 autocast's scaled gradients (bf16, fp32: no scale)
        scaler = grad_scaler(self.engine)
        if norm is not None and scaler is not None and scaler.is_enabled() and self.scale_at_last_step:
            return float(norm) / self.scale_at_last_step
        return norm

    def _clip_where_the_gradients_are_scaled(self, scale: float | None) -> None:
        """fp16 torch_autocast at ZeRO 1-3: clip at `gradient_clipping` of the unscaled norm, as Ultralytics does.

        DeepSpeed 0.19.8 compares the norm of the still-scaled gradients with its `clip_grad` and leaves the
        unscaling to the GradScaler's step afterwards, so a threshold of 10 clipped at 10 / 65536 and every update
        shrank to almost nothing. The threshold times the scale those gradients carry clips where Ultralytics
        does: the clip factor is the same, and the GradScaler then unscales. Set before every step because the
        scale moves. `scale` is the one `loss_scale` read for this step (a host sync on CUDA: read once).
        """
        scaler = grad_scaler(self.engine)
        if self.zero_clip_norm > 0 and scale and scaler is not None and scaler.is_enabled():
            self.engine.optimizer.clip_grad = self.zero_clip_norm * scale

    def _clip_reduced_grads(self) -> float:
        """ZeRO-0: clip at `clip_norm` (if set) as Ultralytics does; returns the norm before clipping, which
        DeepSpeed does not report at ZeRO-0.

        At the boundary DeepSpeed has already averaged the gradients over ranks, so every rank gets the global norm.
        """
        parameters = [p for p in self.engine.module.parameters() if p.grad is not None]
        if not parameters:
            return 0.0
        if self.clip_norm:
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm=self.clip_norm)  # Ultralytics' very call
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        return float(norm) / (loss_scale(self.engine) or 1.0)  # float() syncs

    def state_dict(self) -> dict[str, Any]:
        return {"last_optimizer_iteration": self.last_optimizer_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_optimizer_iteration = state["last_optimizer_iteration"]


def grad_scaler(engine):
    """The GradScaler DeepSpeed attaches for fp16 torch_autocast (ZeRO-0 on the engine, else the optimizer)."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None) or getattr(
        engine.optimizer, "torch_autocast_gradscaler", None
    )


def grow_scale_once_per_step(engine) -> None:
    """Make the fp16 GradScaler of a ZeRO 1-3 optimizer count optimizer steps, not parameter groups.

    DeepSpeed 0.19.8 calls the GradScaler's step() and update() once per parameter group (Ultralytics has 3), so
    its growth interval of 2000 updates passed every 667 steps, and a growth after the first or second group
    unscaled the later groups' gradients by twice the scale they carried: half their step. An interval of 2000 x
    the groups grows the scale every 2000 steps, after a step's last group, as torch's GradScaler does for
    Ultralytics. (yolods' back-off restarts the count at 0, so it stays in phase with the groups.)
    """
    scaler = grad_scaler(engine)
    if scaler is None or not scaler.is_enabled():
        return
    optimizer = engine.optimizer
    groups = getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bit16_groups", None)  # ZeRO-3, ZeRO-1/2
    if groups:
        scaler.set_growth_interval(scaler.get_growth_interval() * len(groups))


def back_off_after_skipped_step(engine) -> None:
    """Lower the fp16 GradScaler's scale after DeepSpeed skipped a step for non-finite gradients, as torch's
    GradScaler.update() does (x backoff_factor, growth count restarted).

    DeepSpeed 0.19.8 at ZeRO 1-3 under fp16 torch_autocast skips such a step without calling update(), so the scale
    never fell and every later step overflowed too: 16 of 16 steps skipped at scale 65536, a run that trained
    nothing and exited 0. ZeRO-0 and bf16 are not affected (no scaler here, or DeepSpeed updates it).
    """
    scaler = grad_scaler(engine)
    if scaler is None or not scaler.is_enabled() or engine.was_step_applied():
        return
    scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
    growth_tracker = getattr(scaler, "_growth_tracker", None)  # torch keeps the count of good steps here
    if growth_tracker is not None:
        growth_tracker.zero_()


def loss_scale(engine) -> float | None:
    """The fp16 loss scale in force, wherever DeepSpeed keeps it; None when there is none (fp32, bf16)."""
    scaler = grad_scaler(engine)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    if engine.fp16_enabled():
        return float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 0.0)))
    return None
