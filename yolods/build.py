"""Build a run's parts from its RunPlan: data, validator, model, optimizer, schedule, EMA, DeepSpeed engine.

`yolods.train` builds a Trainer through `build_trainer`; `yolods.bench` builds through the same functions and
times the same TrainStep, so the benchmark measures the code users run. Seeds are set here, and only here.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from yolods import dist
from yolods.checkpoint import Checkpointer, SavePeriod
from yolods.config import RunPlan, check_imgsz, place_monitor_outputs, resolved_precision
from yolods.data import TrainData, build_train_data, build_val_loader, load_data_yaml
from yolods.ema import build_ema
from yolods.engine import Trainer
from yolods.errors import ConfigError
from yolods.gloo_collectives import use_broadcast_all_gathers_on_gloo, use_reduces_for_reduce_scatters_on_gloo
from yolods.hyp import with_data
from yolods.large_batch import describe as describe_large_batch
from yolods.large_batch import recipe_for
from yolods.metrics import RunLogger
from yolods.model import (
    build_model,
    build_optimizer,
    enable_activation_checkpointing,
    loss_names,
    model_stride,
    optimizer_iterations,
    place_model,
    training_memory_format,
    weight_decay_for,
)
from yolods.preemption import StopRequest
from yolods.profiling import StepProfiler
from yolods.schedule import Schedule
from yolods.step import TrainStep
from yolods.sync_bn import convert_sync_batchnorm, describe_sync_bn
from yolods.validation import EpochValidator
from yolods.zero3_layers import mark_layers_as_zero3_leaves
from yolods.zero_grad_norm import reduce_grad_norm_once


def seed_run(seed: int, *, deterministic: bool = False, paired_data: bool = False) -> None:
    """Seed torch, NumPy and Python as Ultralytics' trainer does in one process: `init_seeds(seed)`.

    Torch gets the same seed on every rank, so every rank builds the same initial weights and the EMA copy taken
    before `deepspeed.initialize` (which broadcasts rank 0's weights to the model, not to the EMA) agrees on every
    rank. Python's and NumPy's states, which Ultralytics' augmentation draws from, get `seed + 1 + rank` at N
    ranks (Ultralytics' DDP seeding), so ranks augment differently, unless `paired_data` (--paired_data: every
    rank augments as the 1-rank run does). `deterministic`: Ultralytics' setting of that name (torch's
    deterministic algorithms).
    """
    import random

    import numpy as np
    from ultralytics.utils.torch_utils import init_seeds

    init_seeds(seed, deterministic=deterministic)
    if dist.get_world_size() > 1 and not paired_data:
        random.seed(seed + 1 + dist.get_rank())
        np.random.seed(seed + 1 + dist.get_rank())


def resolve_data(plan: RunPlan, run_dir: Path) -> tuple[dict[str, Any], SimpleNamespace]:
    """The parsed data.yaml and the hyperparameters naming it; the synthetic set is drawn by rank 0 into the run dir.

    With Ultralytics' `single_cls` the data has one class, 'item', as Ultralytics' trainer makes it (its datasets
    already label every box 0): the head is built for one class and the saved weights name it.
    """
    data, hyp = _data_and_hyp(plan, run_dir)
    if hyp.single_cls:
        data = {**data, "nc": 1, "names": {0: "item"}}
    return data, hyp


def _data_and_hyp(plan: RunPlan, run_dir: Path) -> tuple[dict[str, Any], SimpleNamespace]:
    if plan.data is not None:
        return plan.data, plan.hyp
    from yolods.data.synthetic import make_synthetic_dataset, val_images

    cfg, root = plan.cfg, run_dir / "synthetic"
    if dist.is_main_process():
        make_synthetic_dataset(
            root,
            num_train=cfg.synthetic_images,
            num_val=val_images(cfg.synthetic_images),
            imgsz=cfg.imgsz,
            seed=cfg.seed,
        )
    dist.barrier()
    data_yaml = str(root / "data.yaml")
    return load_data_yaml(data_yaml), with_data(plan.hyp, data_yaml)


def build_train_loader(
    plan: RunPlan, hyp: SimpleNamespace, data: dict[str, Any], *, stride: int, device: torch.device
) -> TrainData:
    """The train split sharded over ranks; its loader is rebuilt every epoch."""
    return build_train_data(
        hyp,
        data,
        micro_batch=plan.batch.micro_batch,
        workers=plan.cfg.workers,
        seed=plan.cfg.seed,
        stride=stride,
        pin_memory=device.type == "cuda",
        accelerators_per_node=torch.cuda.device_count() if device.type == "cuda" else 0,
        paired=plan.cfg.paired_data,
    )


def build_validator(
    plan: RunPlan,
    hyp: SimpleNamespace,
    data: dict[str, Any],
    *,
    stride: int,
    device: torch.device,
    run_dir: Path,
    names: tuple[str, ...],
) -> EpochValidator:
    """Ultralytics' validator over a val loader sharded across ranks."""
    on_gpu = device.type == "cuda"
    # Validation on CPU is compute-bound: worker processes would only compete with it (Ultralytics does the same).
    val_loader = build_val_loader(
        hyp,
        data,
        batch=plan.batch.micro_batch * 2,
        workers=plan.cfg.workers if on_gpu else 0,
        stride=stride,
        device=device,
    )
    return EpochValidator(
        val_loader,
        hyp=hyp,
        data=data,
        run_dir=run_dir,
        device=device,
        loss_names=names,
        paired_data=plan.cfg.paired_data,  # at 1 rank the shard is the whole split: nothing to draw
    )


def build_optimizer_and_schedule(
    plan: RunPlan,
    hyp: SimpleNamespace,
    model: torch.nn.Module,
    *,
    num_classes: int,
    num_train_images: int,
    batches_per_epoch: int,
) -> tuple[torch.optim.Optimizer, SimpleNamespace, Schedule]:
    """Ultralytics' optimizer groups and `auto` choice, with its lr/momentum/accumulation schedule.

    Returns the optimizer, the hyperparameters as the `auto` choice changed them, and the schedule.
    """
    epochs, batch = plan.cfg.epochs, plan.batch
    if batch.global_batch > max(num_train_images, hyp.nbs):
        # Ultralytics caps a batch at the data set (min(batch, len(dataset))), so a step would see fewer images than
        # the large-batch rule scales the lr for (QA: --batch 128 on 48 images scaled it x 8 for 48 images a step)
        ranks = dist.get_world_size()
        largest = max(num_train_images // ranks, 1) * ranks  # the largest batch that fits and splits over the ranks
        raise ConfigError(
            f"--batch {batch.global_batch} is more than the {num_train_images} train images, and above nbs "
            f"{hyp.nbs} yolods' large-batch rule would scale the lr for {batch.global_batch} images a step that "
            f"each see {num_train_images}: use --batch {largest} or less"
        )
    optimizer, train_hyp = build_optimizer(
        model,
        hyp=hyp,
        num_classes=num_classes,
        iterations=optimizer_iterations(
            num_train_images=num_train_images, global_batch=batch.global_batch, nbs=hyp.nbs, epochs=epochs
        ),
        # from the uncapped accumulation, as Ultralytics scales it
        weight_decay=weight_decay_for(hyp=hyp, global_batch=batch.global_batch, accumulate=batch.accumulate),
        zero_stage=plan.zero_stage,
    )
    recipe_for(plan, optimizer).scale_optimizer(optimizer)  # above nbs: yolods' large-batch rule (large_batch.py)
    schedule = Schedule(
        epochs=epochs,
        batches_per_epoch=batches_per_epoch,
        accumulate=min(batch.accumulate, batches_per_epoch * epochs),  # as Ultralytics caps it
        lr0_per_group=tuple(group["lr"] for group in optimizer.param_groups),
        bias_groups=tuple(group.get("param_group") == "bias" for group in optimizer.param_groups),
        lrf=hyp.lrf,
        cos_lr=bool(hyp.cos_lr),
        momentum=hyp.momentum,
        warmup_epochs=hyp.warmup_epochs,
        warmup_momentum=hyp.warmup_momentum,
        warmup_bias_lr=train_hyp.warmup_bias_lr,
    )
    return optimizer, train_hyp, schedule


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """`deepspeed.initialize` on the model and Ultralytics' optimizer; returns the engine."""
    import deepspeed

    stage = ds_config["zero_optimization"]["stage"]
    if stage > 0:
        fuse_for_flat_partitions(optimizer)
        use_broadcast_all_gathers_on_gloo()
        use_reduces_for_reduce_scatters_on_gloo()
    if stage == 3:
        mark_layers_as_zero3_leaves(model, stride=model_stride(model))  # one gather per layer, not per Conv
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if stage > 0:
        reduce_grad_norm_once(engine.optimizer)  # one all-reduce for Ultralytics' 3 parameter groups, not 3
    return engine


# torch optimizers with a fused kernel on both CPU and CUDA (Ultralytics' SGD, Adam and AdamW)
FUSABLE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def fuse_for_flat_partitions(optimizer: torch.optim.Optimizer) -> None:
    """Switch Ultralytics' optimizer to torch's fused kernel, for ZeRO 1-3, which step it on flat partitions.

    ZeRO 1-3 hand the optimizer one flat fp32 partition per group instead of the model's 184-355 tensors. torch's
    default on CPU is its per-tensor loop, which makes about ten passes over each tensor and allocates a temporary
    the size of each: over an 11M-element partition (yolov8s on 1 rank) AdamW took 71 ms a step and SGD 59 ms on
    this CPU, against 7 ms and 5 ms fused (and 24 ms / 15 ms for the per-tensor loop over the model's own tensors,
    which is what DDP and Ultralytics run). ZeRO-0 steps the model's tensors and keeps Ultralytics' optimizer as it
    is, so a 1-rank run stays step-exact with Ultralytics'; fused differs from the loop only in rounding (ulps).
    Other optimizers (RMSProp, NAdam, ...) have no fused kernel and are left as they are.
    """
    # Set on the groups (which hold every hyperparameter): AdamW's constructor cannot be handed Adam's defaults.
    groups = [*optimizer.param_groups, optimizer.defaults]
    if type(optimizer) not in FUSABLE_OPTIMIZERS or any(group.get("differentiable") for group in groups):
        return
    if optimizer.state:
        return  # fused is chosen per group before the first step creates the state
    for group in groups:
        group["foreach"], group["fused"] = False, True


def _module_holds_unscaled_fp32_grads(ds_config: dict[str, Any]) -> bool:
    """ZeRO-0 in fp32 or bf16 torch_autocast: the module's own .grad is what DeepSpeed clips (no loss scale, no
    master copy of DeepSpeed's bf16/fp16 sections)."""
    half_sections = any(ds_config.get(section, {}).get("enabled") for section in ("bf16", "fp16"))
    return (
        ds_config["zero_optimization"]["stage"] == 0 and not half_sections and resolved_precision(ds_config) != "fp16"
    )


def build_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ds_config: dict[str, Any],
    *,
    ema,
    schedule: Schedule,
    device: torch.device,
    memory_format: torch.memory_format,
    stop_request: StopRequest,
    step_at_epoch_end: bool = False,
) -> TrainStep:
    """`build_engine`, then the TrainStep on it: the step `yolods.train` runs and `yolods.bench` times.

    At ZeRO-0 without fp16 loss scaling the TrainStep clips gradients itself with torch's `clip_grad_norm_`,
    Ultralytics' call, and DeepSpeed's clipping is off: DeepSpeed sums the same norm in another order, and that
    alone moved a 1-rank run off Ultralytics' by 1e-6 within 12 steps.
    """
    clip_norm = None
    if _module_holds_unscaled_fp32_grads(ds_config):
        clip_norm = float(ds_config.get("gradient_clipping", 0.0))
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    engine = build_engine(model, optimizer, ds_config)
    if ds_config["zero_optimization"]["stage"] == 0 and dist.get_world_size() == 1:
        # Averaging gradients over one rank is the identity, but DeepSpeed would still flatten, all-reduce and
        # copy them back at every optimizer step (60 ms of a yolov8n step on this CPU).
        engine.enable_backward_allreduce = False
    if ema is not None and engine.zero_optimization_stage() == 3:
        ema.partition_like(engine.module, device=device)  # each rank averages its own slices, with no gather
    return TrainStep(
        engine,
        ema=ema,
        schedule=schedule,
        device=device,
        memory_format=memory_format,
        loss_names=loss_names(model),
        stop_request=stop_request,
        step_at_epoch_end=step_at_epoch_end,
        clip_norm=clip_norm,
    )


def build_trainer(
    plan: RunPlan,
    run_dir: Path,
    *,
    stop_request: StopRequest,
    on_step_phase: Callable[[str], None] | None = None,
    checkpoint_writing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Trainer:
    """Every part of a training run, handed to the Trainer; resumes when the plan says so.

    `on_step_phase` is called as each phase of each train step ends (the fault watchdog counts them), and
    `checkpoint_writing()` is entered around each checkpoint file write (the watchdog watches them for a hang).
    """
    cfg = plan.cfg
    device = dist.local_device(plan.cfg.device)
    seed_run(cfg.seed, deterministic=bool(plan.hyp.deterministic), paired_data=cfg.paired_data)
    data, hyp = resolve_data(plan, run_dir)
    ds_config = copy.deepcopy(plan.ds_config)
    place_monitor_outputs(ds_config, run_dir)

    main = dist.is_main_process()
    model = build_model(
        cfg.model,
        num_classes=data["nc"],
        class_names=data["names"],
        hyp=hyp,
        verbose=cfg.verbose and main,
        summary=main,
        channels=data.get("channels", 3),
    )
    names, stride = loss_names(model), model_stride(model)
    check_imgsz(cfg.imgsz, stride=stride, model=cfg.model)  # P6 models (stride 64) need more than a multiple of 32
    train_data = build_train_loader(plan, hyp, data, stride=stride, device=device)
    validator = build_validator(plan, hyp, data, stride=stride, device=device, run_dir=run_dir, names=names)
    memory_format = training_memory_format(device, hyp)
    model = place_model(model, device)
    optimizer, train_hyp, schedule = build_optimizer_and_schedule(
        plan,
        hyp,
        model,
        num_classes=data["nc"],
        num_train_images=train_data.num_images,
        batches_per_epoch=train_data.batches_per_epoch(),
    )
    ema = build_ema(model)  # before initialize: ZeRO-3 empties the parameters
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)  # after the EMA copy: only the trained model recomputes
    # after the optimizer groups and the EMA copy, which keep Ultralytics' BatchNorm (so do the saved weights)
    recipe_for(plan, optimizer).scale_batchnorm(model)
    synced_norms = convert_sync_batchnorm(model) if cfg.sync_bn else None
    step = build_train_step(
        model,
        optimizer,
        ds_config,
        ema=ema,
        schedule=schedule,
        device=device,
        memory_format=memory_format,
        stop_request=stop_request,
        step_at_epoch_end=cfg.step_at_epoch_end,
    )
    step.on_phase = on_step_phase
    validator.on_progress = on_step_phase  # val batches count too: a rank hung in validation is found
    engine = step.engine
    period = SavePeriod(steps=cfg.save_period_steps, minutes=cfg.save_period_min)
    checkpointer = Checkpointer(run_dir, engine, train_args=vars(train_hyp), period=period, writing=checkpoint_writing)
    checkpointer.save_run_files(cfg, ds_config)
    # results.png unless `--hyp plots=False` (Ultralytics' setting: it draws its plots only when True)
    logger = RunLogger(run_dir, loss_names=names, plot_results=cfg.hyp.get("plots", True) is not False)
    trainer = Trainer(
        plan,
        hyp=hyp,
        step=step,
        train_data=train_data,
        validator=validator,
        ema=ema,
        checkpointer=checkpointer,
        logger=logger,
        profiler=StepProfiler(plan.profile, run_dir=run_dir, engine=engine, comms_logger=cfg.comms_logger),
    )
    if cfg.resume:
        trainer.resume()
    batch = plan.batch
    logger.info(
        f"yolods: {dist.ranks_phrase(dist.get_world_size())}, ZeRO-{plan.zero_stage}, {plan.precision}, global batch "
        f"{batch.global_batch} ({batch.micro_batch}/rank) x accumulate {schedule.accumulate}, "
        f"{type(optimizer).__name__}(lr0={train_hyp.lr0:g}), {train_data.num_images} train images, run dir {run_dir}"
    )
    logger.info(
        describe_large_batch(
            plan,
            optimizer,
            lr0_per_group=schedule.lr0_per_group,
            warmup_batches=schedule.warmup_iterations,
            batches_per_epoch=schedule.batches_per_epoch,
            accumulate=schedule.accumulate,
        )
    )
    if synced_norms is not None:
        logger.info(describe_sync_bn(synced_norms, device=device))
    if getattr(hyp, "channels_last", None) is True and memory_format != torch.channels_last:
        logger.info(f"--hyp channels_last=True is ignored on {device.type}: NHWC images are for CUDA only")
    if cfg.paired_data and dist.get_world_size() > 1:
        logger.info(
            f"--paired_data: every rank loads each global batch of {train_data.global_batch} images, augmented as at "
            f"1 rank, and trains on its share"
        )
    return trainer
