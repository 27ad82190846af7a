"""The engines under test, built from yolods' own pieces: the DeepSpeed engine and the plain DDP baseline.

Both get the same Ultralytics model, optimizer groups, loss scaling, gradient clipping and EMA as
`yolods.train`, and gradient accumulation 1 (nbs = global batch), so every timed step is a full optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from yolods import dist
from yolods.bench.comm_model import CommSpec
from yolods.bench.memory import ModelStateBytes, model_state_bytes
from yolods.bench.sweep import BenchConfig
from yolods.config import GRADIENT_CLIP_NORM, RunConfig, resolve_deepspeed_config

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
        # nbs = global batch: accumulation 1; no warmup or mosaic schedule inside a few timed steps
        hyp={
            "optimizer": cfg.optimizer,
            "lr0": cfg.lr0,
            "nbs": cfg.global_batch,
            "warmup_epochs": 0.0,
            "close_mosaic": 0,
        },
    )


def bench_deepspeed_config(cfg: BenchConfig, *, world_size: int) -> dict[str, Any]:
    """yolods' resolved DeepSpeed config with the sweep's bucket, overlap and timer settings applied."""
    ds_config, _ = resolve_deepspeed_config(
        run_config(cfg, data="synthetic"), world_size=world_size, nbs=cfg.global_batch
    )
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


def comm_spec_for(model: nn.Module, *, zero_stage: int | None, ds_config: dict[str, Any] | None, ema: bool) -> CommSpec:
    """The communication model's inputs for this model and configuration (read before ZeRO-3 partitions it)."""
    num_params = sum(param.numel() for param in model.parameters() if param.requires_grad)
    if zero_stage is None or ds_config is None:
        return CommSpec(zero_stage=None, num_params=num_params)
    zero = ds_config.get("zero_optimization", {})
    # DeepSpeed's own defaults where the config is silent (deepspeed/runtime/zero/config.py)
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
    max_live = int(zero.get("stage3_max_live_parameters", 1_000_000_000))
    large = [param for param in model.parameters() if param.numel() > threshold]
    param_bytes = 2 if any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "fp16")) else 4
    comm_dtype = str(ds_config.get("communication_data_type", "")).lower()
    grad_bytes = 2 if comm_dtype in ("bf16", "bfloat16", "fp16", "float16") else param_bytes
    return CommSpec(
        zero_stage=zero_stage,
        num_params=num_params,
        grad_bytes=grad_bytes,
        param_bytes=param_bytes,
        reduce_bucket_elements=int(zero.get("reduce_bucket_size", 500_000_000)),
        allgather_bucket_elements=int(zero.get("allgather_bucket_size", 500_000_000)),
        overlap_comm=bool(zero.get("overlap_comm", zero_stage == 3)),
        multi_rank_bucket_allreduce=bool(zero.get("use_multi_rank_bucket_allreduce", True)),
        stage3_gather_calls=sum(1 for module in model.modules() if any(True for _ in module.parameters(recurse=False))),
        stage3_regather_in_backward=num_params > max_live,
        ema_gather_calls=len(large) if ema and zero_stage == 3 else 0,
        ema_gather_elements=sum(param.numel() for param in large) if ema and zero_stage == 3 else 0,
    )


class DeepSpeedStepper:
    """yolods' train step on `deepspeed.initialize`: the engine under test."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, ds_config: dict[str, Any], ema: Any):
        import deepspeed

        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        self.ema = ema
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        # DeepSpeed's wall-clock timers are printed and reset at every step; we sum its per-step snapshots.
        self.timer_totals_ms: dict[str, float] | None = {} if ds_config.get("wall_clock_breakdown") else None
        self.input_dtype = next(self.engine.module.parameters()).dtype  # bf16/fp16 only under DeepSpeed's sections
        self.world_size = dist.get_world_size()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        loss, _ = self.engine(batch)
        # As in yolods.train: a sum over the rank's images, x world size because DeepSpeed averages gradients.
        return loss.sum() * self.world_size

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()
        if self.timer_totals_ms is not None:
            for name, elapsed_ms in self.engine.get_wall_clock_timers().items():
                self.timer_totals_ms[name] = self.timer_totals_ms.get(name, 0.0) + elapsed_ms
        if self.ema is not None:
            self.ema.update(self.engine.module, zero_stage=self.zero_stage)

    def model_states(self) -> ModelStateBytes:
        return model_state_bytes(self.engine.module, self.engine.optimizer)

    def reset_wall_clock_breakdown(self) -> None:
        self.timer_totals_ms = {}

    def wall_clock_breakdown(self, *, steps: int) -> dict[str, float]:
        """DeepSpeed's own timers since the last reset, in seconds per step (forward, backward and its
        all-reduce part, step)."""
        from deepspeed.utils import timer

        names = {
            "forward": timer.FORWARD_GLOBAL_TIMER,
            "backward": timer.BACKWARD_GLOBAL_TIMER,
            "backward_inner": timer.BACKWARD_INNER_GLOBAL_TIMER,
            "backward_allreduce": timer.BACKWARD_REDUCE_GLOBAL_TIMER,
            "step": timer.STEP_GLOBAL_TIMER,
        }
        totals = self.timer_totals_ms or {}
        return {key: totals.get(name, 0.0) / 1000 / steps for key, name in names.items()}

    def close(self) -> None:
        self.engine.destroy()
        self.engine = None


class DDPStepper:
    """The baseline: the same model in torch DistributedDataParallel, stepped as Ultralytics' trainer does."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, precision: str, device: torch.device, ema: Any
    ):
        # torch's defaults (25 MiB buckets, buffer broadcast): the "plain DDP" a user would write
        self.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        self.optimizer = optimizer
        self.device = device
        self.ema = ema
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.input_dtype = torch.float32
        self.world_size = dist.get_world_size()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss, _ = self.model(batch)
        return loss.sum() * self.world_size  # Ultralytics' DDP loss scaling

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=GRADIENT_CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model.module)

    def model_states(self) -> ModelStateBytes:
        return model_state_bytes(self.model.module, self.optimizer)

    def close(self) -> None:
        self.model = None


@dataclass
class BuiltModel:
    """A fresh model with its optimizer, EMA and what the results need to know about it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any
    hyp: Any
    num_params: int
    stride: int
    data: dict[str, Any] | None  # parsed data.yaml for real input


def build_for(cfg: BenchConfig, *, device: torch.device, data_yaml: str | None) -> BuiltModel:
    """Model, optimizer groups and EMA exactly as yolods.train builds them, identical on every rank."""
    from ultralytics.utils.torch_utils import init_seeds

    from yolods.bench.inputs import shapes_num_classes
    from yolods.data import load_data_yaml
    from yolods.engine import build_hyp
    from yolods.model import build_ema, build_model, build_optimizer, model_stride, training_memory_format

    init_seeds(cfg.seed)  # same weights everywhere, as DeepSpeed and DDP would broadcast anyway
    run_cfg = run_config(cfg, data=data_yaml or "synthetic")
    hyp = build_hyp(run_cfg, data_yaml or "synthetic")
    data = load_data_yaml(data_yaml) if data_yaml else None
    num_classes, names = (data["nc"], data["names"]) if data else shapes_num_classes()
    model = build_model(cfg.model, num_classes=num_classes, class_names=names, hyp=hyp, verbose=False)
    model = model.to(device, memory_format=training_memory_format(device, hyp))  # as yolods.train runs it
    optimizer, _ = build_optimizer(
        model,
        hyp=hyp,
        num_classes=num_classes,
        iterations=cfg.steps + cfg.warmup_steps,
        weight_decay=hyp.weight_decay,  # nbs = global batch: Ultralytics' decay scaling is 1
        zero_stage=cfg.zero_stage or 0,
    )
    ema = build_ema(model) if cfg.ema else None  # before initialize: ZeRO-3 empties the parameters
    return BuiltModel(
        model=model,
        optimizer=optimizer,
        ema=ema,
        hyp=hyp,
        num_params=sum(param.numel() for param in model.parameters()),
        stride=model_stride(model),
        data=data,
    )
