"""The engines under test, built through yolods.build exactly as `yolods.train` builds them.

Both engines: RunConfig (`run_config`) -> `resolve_run` -> `seed_run`, `build_model`, Ultralytics' optimizer
groups and schedule (`build_optimizer_and_schedule`), `build_ema`. Gradient accumulation is 1 and there is no
warmup (nbs = global batch, warmup_epochs 0), so every timed step is a full optimizer step.

- `deepspeed`: the sweep's bucket, overlap and timer settings applied to the plan's resolved DeepSpeed config,
  then `build_train_step` (`build_engine`, then `yolods.step.TrainStep`, the code `yolods.train` runs), timed as
  it is: preprocessing of the raw batch, forward, backward, the optimizer step with the lr schedule, clipping and
  EMA, then the loss `.cpu()` sync and the per-step stop all-reduce every training step pays (its StopRequest
  has no signal handler).
- `ddp`: `DDPStepper`, the baseline as a user of torch DistributedDataParallel and Ultralytics' trainer would
  write it, called like TrainStep so the same loop times both.

`--activation-checkpointing on` wraps the trained model's blocks as `yolods.train --activation_checkpointing` does
(after the EMA copy), in both engines; `--communication-dtype` reaches DeepSpeed's config through RunConfig, as the
train flag does.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from yolods import dist
from yolods.bench.comm_model import CommSpec
from yolods.bench.inputs import shapes_num_classes
from yolods.bench.measure import synchronizer
from yolods.bench.memory import ModelStateBytes, model_state_bytes
from yolods.bench.sweep import BenchConfig
from yolods.build import build_optimizer_and_schedule, build_train_loader, build_train_step, seed_run
from yolods.config import GRADIENT_CLIP_NORM, SYNTHETIC, RunConfig, RunPlan, resolve_run
from yolods.data import TrainData, preprocess_batch
from yolods.ema import build_ema
from yolods.model import (
    build_model,
    enable_activation_checkpointing,
    model_stride,
    place_model,
    training_memory_format,
)
from yolods.preemption import StopRequest
from yolods.step import TrainStep
from yolods.zero3_layers import zero3_fetch_units

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_config(cfg: BenchConfig, *, data: str) -> RunConfig:
    """The yolods.train configuration this bench configuration corresponds to."""
    return RunConfig(
        model=cfg.model,
        data=data,
        epochs=1,
        imgsz=cfg.imgsz,
        batch=cfg.global_batch,
        batch_from_flag=True,
        workers=cfg.workers,
        seed=cfg.seed,
        zero=cfg.zero_stage,
        precision=cfg.precision,
        deepspeed_config=cfg.deepspeed_config,
        device=cfg.device,
        activation_checkpointing=cfg.activation_checkpointing,
        communication_dtype=cfg.communication_dtype if cfg.engine == "deepspeed" else None,
        # nbs = global batch: accumulation 1; no warmup or mosaic schedule inside a few timed steps
        hyp={
            "optimizer": cfg.optimizer,
            "lr0": cfg.lr0,
            "nbs": cfg.global_batch,
            "warmup_epochs": 0.0,
            "close_mosaic": 0,
            # Ultralytics' setting, which yolods.model.training_memory_format reads (None: NHWC on CUDA)
            **({} if cfg.channels_last is None else {"channels_last": cfg.channels_last}),
        },
    )


def bench_plan(cfg: BenchConfig, *, world_size: int, data_yaml: str | None = None) -> RunPlan:
    """`resolve_run` on `run_config`, as yolods.train resolves a run; for DeepSpeed with the sweep's settings.

    `data_yaml` is the data real input reads (None: the synthetic set, which needs no file).

    Raises:
        ConfigError: what yolods.train would reject in this configuration.
    """
    plan = resolve_run(run_config(cfg, data=data_yaml or SYNTHETIC), world_size=world_size)
    if cfg.engine != "deepspeed":
        return plan
    return replace(plan, ds_config=_with_sweep_settings(plan.ds_config, cfg))


def _with_sweep_settings(ds_config: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    """A copy of the resolved DeepSpeed config with the sweep's bucket, overlap and timer settings applied."""
    ds_config = copy.deepcopy(ds_config)
    zero = ds_config.setdefault("zero_optimization", {})
    if cfg.reduce_bucket_size is not None:
        zero["reduce_bucket_size"] = cfg.reduce_bucket_size
    if cfg.allgather_bucket_size is not None:
        # ZeRO-3 has no allgather bucket; its prefetch bucket plays that part.
        key = "stage3_prefetch_bucket_size" if zero.get("stage") == 3 else "allgather_bucket_size"
        zero[key] = cfg.allgather_bucket_size
    if cfg.overlap_comm is not None:
        zero["overlap_comm"] = cfg.overlap_comm
    if cfg.wall_clock_breakdown:
        ds_config["wall_clock_breakdown"] = True
    return ds_config


def comm_spec_for(model: nn.Module, *, zero_stage: int | None, ds_config: dict[str, Any] | None) -> CommSpec:
    """The communication model's inputs for this model and configuration (read before ZeRO-3 partitions it)."""
    num_params = sum(param.numel() for param in model.parameters() if param.requires_grad)
    if zero_stage is None or ds_config is None:
        return CommSpec(zero_stage=None, num_params=num_params)
    zero = ds_config.get("zero_optimization", {})
    # DeepSpeed's own defaults where the config is silent (deepspeed/runtime/zero/config.py)
    max_live = int(zero.get("stage3_max_live_parameters", 1_000_000_000))
    param_bytes = 2 if any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16")) else 4
    comm_dtype = str(ds_config.get("communication_data_type", "")).lower()
    grad_bytes = 2 if comm_dtype in ("bf16", "bfloat16", "fp16", "float16") else param_bytes
    return CommSpec(
        zero_stage=zero_stage,
        num_params=num_params,
        grad_bytes=grad_bytes,
        param_bytes=param_bytes,
        reduce_bucket_elements=int(zero.get("reduce_bucket_size", 500_000_000)),
        overlap_comm=bool(zero.get("overlap_comm", zero_stage == 3)),
        # without contiguous gradients DeepSpeed all-reduces every bucket (buffered_reduce_fallback) either way
        multi_rank_bucket_allreduce=bool(zero.get("use_multi_rank_bucket_allreduce", True))
        or not zero.get("contiguous_gradients", True),
        stage3_gather_calls=zero3_fetch_units(model, stride=model_stride(model)) if zero_stage == 3 else 1,
        stage3_regather_in_backward=num_params > max_live,
        stop_agreement=True,  # TrainStep's StopRequest.agreed(), which the DDP baseline does not issue
    )


class WallClockTimers:
    """DeepSpeed's own wall-clock timers (`wall_clock_breakdown`), summed over steps.

    DeepSpeed prints and resets them at every step; `add_step` after each step sums its per-step snapshots.
    """

    def __init__(self, engine):
        self.engine = engine
        self.totals_ms: dict[str, float] = {}

    def reset(self) -> None:
        self.totals_ms = {}

    def add_step(self) -> None:
        for name, elapsed_ms in self.engine.get_wall_clock_timers().items():
            self.totals_ms[name] = self.totals_ms.get(name, 0.0) + elapsed_ms

    def per_step(self, *, steps: int) -> dict[str, float]:
        """Seconds per step since the last reset: forward, backward and its all-reduce part, step."""
        from deepspeed.utils import timer

        names = {
            "forward": timer.FORWARD_GLOBAL_TIMER,
            "backward": timer.BACKWARD_GLOBAL_TIMER,
            "backward_inner": timer.BACKWARD_INNER_GLOBAL_TIMER,
            "backward_allreduce": timer.BACKWARD_REDUCE_GLOBAL_TIMER,
            "step": timer.STEP_GLOBAL_TIMER,
        }
        return {key: self.totals_ms.get(name, 0.0) / 1000 / steps for key, name in names.items()}


class DDPStepper:
    """The baseline: the same model in torch DistributedDataParallel, stepped as Ultralytics' trainer does.

    Called like TrainStep: a raw collated batch in (it preprocesses it, as Ultralytics' trainer does), and
    `on_phase`, when set, is called at the end of each of yolods.step.PHASES. Accumulation is 1 and there is no
    warmup, so the lr stays lr0 and every call steps the optimizer; it issues no per-step collective of its own.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        precision: str,
        device: torch.device,
        memory_format: torch.memory_format,
        ema: Any,
    ):
        # torch's defaults (25 MiB buckets, buffer broadcast): the "plain DDP" a user would write
        self.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        self.optimizer = optimizer
        self.device = device
        self.memory_format = memory_format
        self.ema = ema
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.world_size = dist.get_world_size()
        self.on_phase: Callable[[str], None] | None = None

    def __call__(self, batch: dict[str, Any], *, iteration: int, epoch: int, last_in_epoch: bool) -> None:
        batch = preprocess_batch(batch, device=self.device, input_dtype=torch.float32, memory_format=self.memory_format)
        self._phase_done("preprocess")
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss, _ = self.model(batch)
        loss = loss.sum() * self.world_size  # Ultralytics' DDP loss scaling
        self._phase_done("forward")
        self.scaler.scale(loss).backward()
        self._phase_done("backward")
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=GRADIENT_CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model.module)
        self._phase_done("optimizer")

    def _phase_done(self, phase: str) -> None:
        if self.on_phase is not None:
            self.on_phase(phase)


@dataclass
class BenchEngine:
    """One configuration, built and ready to time: `step` is a TrainStep (deepspeed) or a DDPStepper (ddp)."""

    plan: RunPlan
    step: TrainStep | DDPStepper
    device: torch.device
    train_hyp: Any  # the hyperparameters as Ultralytics' optimizer choice left them
    optimizer_name: str
    num_params: int
    spec: CommSpec
    train_data: TrainData | None  # the train split real input reads; None for synthetic input
    timers: WallClockTimers | None  # DeepSpeed's own timers, with --wall-clock-breakdown

    def model_states(self) -> ModelStateBytes:
        """Model-state bytes this rank holds now (call it between backward and the optimizer step)."""
        ema_tensors = self.step.ema.held_tensors() if self.step.ema is not None else ()
        if isinstance(self.step, TrainStep):
            return model_state_bytes(self.step.engine.module, self.step.engine.optimizer, ema_tensors=ema_tensors)
        return model_state_bytes(self.step.model.module, self.step.optimizer, ema_tensors=ema_tensors)

    def ema_update_s(self, repeats: int = 5) -> float | None:
        """Median seconds of one EMA update as the step runs it (at ZeRO-3: this rank's slices); None without EMA."""
        if self.step.ema is None:
            return None
        module = self.step.engine.module if isinstance(self.step, TrainStep) else self.step.model.module
        sync = synchronizer(self.device)
        seconds = []
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            self.step.ema.update(module)
            sync()
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds)

    def close(self) -> None:
        if isinstance(self.step, TrainStep):
            self.step.engine.destroy()
        self.step = None  # type: ignore[assignment]
        self.timers = None


def build_bench_engine(cfg: BenchConfig, *, data_yaml: str | None, synthetic_images: int) -> BenchEngine:
    """Build `cfg` on this rank through yolods.build, as `build_trainer` builds a run.

    `data_yaml`: the data real input reads (None for synthetic input). The optimizer's `auto` choice and the
    schedule see that split's images and batches, or, for synthetic input, `synthetic_images` images.
    """
    plan = bench_plan(cfg, world_size=dist.get_world_size(), data_yaml=data_yaml)
    hyp = plan.hyp
    device = dist.local_device(plan.cfg.device)
    seed_run(cfg.seed)
    num_classes, names = (plan.data["nc"], plan.data["names"]) if plan.data else shapes_num_classes()
    channels = plan.data.get("channels", 3) if plan.data else 3  # synthetic input is RGB
    model = build_model(
        cfg.model, num_classes=num_classes, class_names=names, hyp=hyp, verbose=False, channels=channels
    )
    stride = model_stride(model)
    train_data = build_train_loader(plan, hyp, plan.data, stride=stride, device=device) if plan.data else None
    num_images = train_data.num_images if train_data else synthetic_images
    batches_per_epoch = (
        train_data.batches_per_epoch() if train_data else math.ceil(num_images / plan.batch.global_batch)
    )
    memory_format = training_memory_format(device, hyp)
    model = place_model(model, device)
    optimizer, train_hyp, schedule = build_optimizer_and_schedule(
        plan, hyp, model, num_classes=num_classes, num_train_images=num_images, batches_per_epoch=batches_per_epoch
    )
    ema = build_ema(model) if cfg.ema else None  # before initialize: ZeRO-3 empties the parameters
    if cfg.activation_checkpointing:  # after the EMA copy, as build_trainer: only the trained model recomputes
        enable_activation_checkpointing(model)
    is_deepspeed = cfg.engine == "deepspeed"
    ds_config = plan.ds_config if is_deepspeed else None
    spec = comm_spec_for(model, zero_stage=plan.zero_stage if is_deepspeed else None, ds_config=ds_config)
    num_params = sum(param.numel() for param in model.parameters())
    step: TrainStep | DDPStepper
    timers = None
    if is_deepspeed:
        step = build_train_step(
            model,
            optimizer,
            plan.ds_config,
            ema=ema,
            schedule=schedule,
            device=device,
            memory_format=memory_format,
            stop_request=StopRequest(),  # not installed: no signal handler, but the per-step all-reduce users pay
        )
        timers = WallClockTimers(step.engine) if plan.ds_config.get("wall_clock_breakdown") else None
    else:
        step = DDPStepper(
            model, optimizer, precision=plan.precision, device=device, memory_format=memory_format, ema=ema
        )
    return BenchEngine(
        plan=plan,
        step=step,
        device=device,
        train_hyp=train_hyp,
        optimizer_name=type(optimizer).__name__,
        num_params=num_params,
        spec=spec,
        train_data=train_data,
        timers=timers,
    )
