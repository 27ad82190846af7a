"""The training loop around the DeepSpeed engine: build once, then epochs of train steps, validate, save.

Data flows one way: RunConfig -> model + data -> DeepSpeed engine -> checkpoints and logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from yolods import checkpoint, dist
from yolods.config import RunConfig, place_monitor_outputs, resolve_deepspeed_config, resolved_precision, write_json
from yolods.data import build_train_data, build_val_loader, load_data_yaml, preprocess_batch
from yolods.metrics import RunLogger
from yolods.model import (
    build_ema,
    build_model,
    build_optimizer,
    export_snapshot,
    floating_buffers,
    loss_names,
    model_stride,
    optimizer_iterations,
    training_memory_format,
    weight_decay_for,
)
from yolods.preemption import StopRequest, TrainingInterrupted
from yolods.profiling import StepProfiler
from yolods.schedule import Schedule
from yolods.validation import EpochValidator


def build_hyp(cfg: RunConfig, data_yaml: str) -> SimpleNamespace:
    """Ultralytics' default.yaml with this run's values; model.args, the dataset and the validator read it."""
    from ultralytics.cfg import get_cfg

    from yolods.config import ConfigError

    overrides = {
        "task": "detect",
        "mode": "train",
        "model": cfg.model,
        "data": data_yaml,
        "epochs": cfg.epochs,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        "workers": cfg.workers,
        "seed": cfg.seed,
        "plots": False,
        "amp": False,  # precision is DeepSpeed's job (torch_autocast), not Ultralytics'
        **cfg.hyp,
    }
    try:
        return get_cfg(overrides=overrides)
    except (SyntaxError, TypeError, ValueError, KeyError) as error:
        raise ConfigError(str(error).strip().splitlines()[0]) from None


def resolve_data_yaml(cfg: RunConfig, run_dir: Path) -> str:
    """The data.yaml to train on; the synthetic set is drawn by rank 0 into the run directory."""
    if not cfg.is_synthetic:
        return cfg.data
    from yolods.data.synthetic import make_synthetic_dataset

    root = run_dir / "synthetic"
    if dist.is_main_process():
        make_synthetic_dataset(
            root,
            num_train=cfg.synthetic_images,
            num_val=max(cfg.synthetic_images // 4, 8),
            imgsz=cfg.imgsz,
            seed=cfg.seed,
        )
    dist.barrier()
    return str(root / "data.yaml")


@dataclass
class TrainState:
    """What a checkpoint must carry beyond DeepSpeed's own state."""

    epoch: int = 0  # epoch to run next (or the one a stop signal interrupted)
    batch_index: int = 0  # first batch of `epoch` still to run: > 0 only after a stop signal
    best_fitness: float | None = None
    fitness_history: list[float] = field(default_factory=list)


class Trainer:
    """Ultralytics YOLO detection training through `deepspeed.initialize`, on any launcher and ZeRO stage.

    Examples:
        >>> trainer = Trainer(cfg, run_dir)
        >>> trainer.train()
        >>> trainer.close()
    """

    def __init__(self, cfg: RunConfig, run_dir: Path):
        import deepspeed
        from ultralytics.utils.torch_utils import init_seeds

        self.cfg = cfg
        self.run_dir = run_dir
        self.device = torch.device(cfg.device, dist.get_local_rank() if cfg.device == "cuda" else None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # Per-rank seeds; the initial weights still agree because DeepSpeed broadcasts rank 0's at initialize.
        init_seeds(cfg.seed + dist.get_rank())

        data_yaml = resolve_data_yaml(cfg, run_dir)
        self.data = load_data_yaml(data_yaml)
        self.hyp = build_hyp(cfg, data_yaml)
        self.ds_config, self.batch_plan = resolve_deepspeed_config(
            cfg, world_size=dist.get_world_size(), nbs=self.hyp.nbs
        )
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        self.precision = resolved_precision(self.ds_config)
        place_monitor_outputs(self.ds_config, run_dir)
        if dist.is_main_process():
            write_json(run_dir / "ds_config.json", self.ds_config)

        names, num_classes = self.data["names"], self.data["nc"]
        model = build_model(
            cfg.model, num_classes=num_classes, class_names=names, hyp=self.hyp, verbose=dist.is_main_process()
        )
        self.loss_names = loss_names(model)
        self._build_data(stride=model_stride(model))
        self.memory_format = training_memory_format(self.device, self.hyp)
        optimizer = self._build_optimizer_and_schedule(model.to(self.device, memory_format=self.memory_format))
        self.ema = build_ema(model)  # before initialize: ZeRO-3 empties the parameters
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.input_dtype = next(self.engine.module.parameters()).dtype  # bf16/fp16 only under DeepSpeed's own sections

        self.logger = RunLogger(run_dir, loss_names=self.loss_names)
        self.profiler = StepProfiler(cfg.profile, run_dir=run_dir, engine=self.engine, comms_logger=cfg.comms_logger)
        self.stop_request = StopRequest().install()
        self.stop_after_epoch = False
        self.state = TrainState()
        self.last_optimizer_iteration = -1
        self.stage0_grad_norm: float | None = None
        self.resumed_loss_sums: torch.Tensor | None = None
        if cfg.resume:
            self._restore()
        self.logger.info(
            f"yolods: {dist.get_world_size()} ranks, ZeRO-{self.zero_stage}, {self.precision}, global batch "
            f"{self.batch_plan.global_batch} ({self.batch_plan.micro_batch}/rank) x accumulate {self.schedule.accumulate}, "
            f"{type(optimizer).__name__}(lr0={self.train_hyp.lr0:g}), {self.train_data.num_images} train images, run dir {run_dir}"
        )

    def _build_data(self, *, stride: int) -> None:
        """Train data (rebuilt per epoch) and the validator with its sharded loader."""
        micro_batch, workers = self.batch_plan.micro_batch, self.cfg.workers
        on_gpu = self.device.type == "cuda"
        self.train_data = build_train_data(
            self.hyp,
            self.data,
            micro_batch=micro_batch,
            workers=workers,
            seed=self.cfg.seed,
            stride=stride,
            pin_memory=on_gpu,
        )
        # Validation on CPU is compute-bound: worker processes would only compete with it (Ultralytics does the same).
        val_loader = build_val_loader(
            self.hyp,
            self.data,
            batch=micro_batch * 2,
            workers=workers if on_gpu else 0,
            stride=stride,
            device=self.device,
        )
        self.validator = EpochValidator(
            val_loader,
            hyp=self.hyp,
            data=self.data,
            run_dir=self.run_dir,
            device=self.device,
            loss_names=self.loss_names,
        )

    def _build_optimizer_and_schedule(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Ultralytics' optimizer groups and `auto` choice, with its lr/momentum/accumulation schedule."""
        batches_per_epoch = self.train_data.batches_per_epoch()
        accumulate = min(self.batch_plan.accumulate, batches_per_epoch * self.cfg.epochs)  # as Ultralytics caps it
        global_batch = self.batch_plan.global_batch
        optimizer, self.train_hyp = build_optimizer(
            model,
            hyp=self.hyp,
            num_classes=self.data["nc"],
            iterations=optimizer_iterations(
                num_train_images=self.train_data.num_images,
                global_batch=global_batch,
                nbs=self.hyp.nbs,
                epochs=self.cfg.epochs,
            ),
            weight_decay=weight_decay_for(
                hyp=self.hyp, global_batch=global_batch, accumulate=self.batch_plan.accumulate
            ),  # from the uncapped accumulation, as Ultralytics scales it
            zero_stage=self.zero_stage,
        )
        self.schedule = Schedule(
            epochs=self.cfg.epochs,
            batches_per_epoch=batches_per_epoch,
            accumulate=accumulate,
            lr0_per_group=tuple(group["lr"] for group in optimizer.param_groups),
            bias_groups=tuple(group.get("param_group") == "bias" for group in optimizer.param_groups),
            lrf=self.hyp.lrf,
            cos_lr=bool(self.hyp.cos_lr),
            momentum=self.hyp.momentum,
            warmup_epochs=self.hyp.warmup_epochs,
            warmup_momentum=self.hyp.warmup_momentum,
            warmup_bias_lr=self.train_hyp.warmup_bias_lr,
        )
        return optimizer

    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns the last validation metrics (rank 0) or {}."""
        metrics: dict[str, Any] = {}
        for epoch in range(self.state.epoch, self.cfg.epochs):
            train_losses = self.train_epoch(epoch)
            metrics = self.end_epoch(epoch, train_losses)
            if self._should_stop(epoch):
                break
            if self.stop_after_epoch:
                raise TrainingInterrupted(f"epoch{epoch + 1}")
        self.logger.plot()
        return metrics

    def train_epoch(self, epoch: int) -> list[float]:
        """One pass over this rank's shard; returns the epoch's mean train losses.

        After a stop signal the epoch ends early with a checkpoint and TrainingInterrupted. A run resumed from
        that checkpoint replays the epoch's loader up to where it stopped without training on it, so sampler,
        augmentation and mosaic draws continue exactly where they were.
        """
        if self.hyp.close_mosaic and epoch >= self.cfg.epochs - self.hyp.close_mosaic:
            self.train_data.close_mosaic(self.hyp)
        self.engine.train()
        loader = self.train_data.loader_for_epoch(epoch)
        num_batches = len(loader)
        first_batch, self.state.batch_index = self.state.batch_index, 0
        loss_sums = self.resumed_loss_sums if first_batch else torch.zeros(len(self.loss_names))
        bar = self.logger.progress(loader, epoch=epoch, epochs=self.cfg.epochs, total=num_batches)
        step_started = time.perf_counter()
        for batch_index, batch in enumerate(bar):
            if batch_index < first_batch:
                continue  # already trained on before the interruption
            data_wait_s = time.perf_counter() - step_started
            iteration = batch_index + num_batches * epoch
            with self.profiler.step():
                loss_items, stepped = self.train_step(
                    batch, iteration=iteration, epoch=epoch, last_in_epoch=batch_index == num_batches - 1
                )
            loss_sums += loss_items  # .cpu() in train_step synced with the device already
            step_time_s = time.perf_counter() - step_started
            imgs_per_s = batch["img"].shape[0] * dist.get_world_size() / step_time_s
            self.logger.update_bar(
                epoch=epoch,
                epochs=self.cfg.epochs,
                mean_losses=(loss_sums / (batch_index + 1)).tolist(),
                imgs_per_s=imgs_per_s,
                mem_gib=self._memory_gib(),
                imgsz=batch["img"].shape[-1],
            )
            if stepped:
                scalars = self._step_scalars(
                    loss_items, imgs_per_s=imgs_per_s, step_time_s=step_time_s, data_wait_s=data_wait_s
                )
                self.logger.log_step(self.engine.global_steps, scalars)
            stop = self.stop_request.agreed()  # a collective at every step, so all ranks stop at the same one
            if stop and stepped and batch_index < num_batches - 1:
                self._save_interrupted(epoch, next_batch=batch_index + 1, loss_sums=loss_sums)
            step_started = time.perf_counter()
        return (loss_sums / max(num_batches, 1)).tolist()

    def _save_interrupted(self, epoch: int, *, next_batch: int, loss_sums: torch.Tensor) -> None:
        """Checkpoint mid-epoch, at an optimizer-step boundary (no half-summed gradients), then stop."""
        self.state.epoch, self.state.batch_index = epoch, next_batch
        tag = f"epoch{epoch + 1}-batch{next_batch}"
        checkpoint.save_training_state(
            self.engine,
            self.run_dir,
            tag=tag,
            client_state=self._client_state(),
            rank_state=self._rank_state(loss_sums),
        )
        self.logger.info(
            f"\nStopped by {getattr(self.stop_request.received, 'name', 'a signal to another rank')}: checkpoint {tag} saved; continue with --resume {self.run_dir}"
        )
        raise TrainingInterrupted(tag)

    def _step_scalars(
        self, loss_items: torch.Tensor, *, imgs_per_s: float, step_time_s: float, data_wait_s: float
    ) -> dict[str, float]:
        """TensorBoard scalars for one optimizer step; names carry their units."""
        scalars = {f"train/{name}": float(value) for name, value in zip(self.loss_names, loss_items)}
        scalars.update({f"lr/pg{index}": group["lr"] for index, group in enumerate(self.engine.optimizer.param_groups)})
        scalars.update(
            {
                "throughput/imgs_per_s": imgs_per_s,
                "time/step_s": step_time_s,
                "time/data_wait_share": data_wait_s / step_time_s,
                "memory/peak_gib": self._memory_gib(),
            }
        )
        grad_norm = self.engine.get_global_grad_norm() if self.zero_stage else self.stage0_grad_norm
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        scale = loss_scale(self.engine)
        if scale is not None:
            scalars["train/loss_scale"] = scale
        return scalars

    def train_step(
        self, batch: dict[str, Any], *, iteration: int, epoch: int, last_in_epoch: bool
    ) -> tuple[torch.Tensor, bool]:
        """Forward, backward and (at an accumulation boundary) an optimizer step.

        Returns the detached losses and whether the optimizer stepped.
        """
        plan = self.schedule.at(iteration, epoch)
        for group, lr in zip(self.engine.optimizer.param_groups, plan.lrs):
            group["lr"] = lr
            if "momentum" in group:
                group["momentum"] = plan.momentum
        # Ultralytics steps when `accumulate` micro-batches have passed; accumulation ramps up during warmup, so
        # the boundary is ours to set. The last batch of an epoch always steps: checkpoints hold no half-summed grads.
        is_boundary = iteration - self.last_optimizer_iteration >= plan.accumulate or last_in_epoch
        self.engine.set_gradient_accumulation_boundary(is_boundary)
        batch = preprocess_batch(
            batch, device=self.device, input_dtype=self.input_dtype, memory_format=self.memory_format
        )
        loss, loss_items = self.engine(batch)
        # Ultralytics' loss is a sum over the rank's images; x world size because DeepSpeed, like DDP, averages
        # gradients over ranks. Never divided by accumulation: Ultralytics sums accumulated gradients.
        self.engine.backward(loss.sum() * dist.get_world_size(), scale_wrt_gas=False)
        if is_boundary and self.zero_stage == 0:
            self.stage0_grad_norm = self._reduced_grad_norm()
        self.engine.step()
        if is_boundary:
            self.last_optimizer_iteration = iteration
            self.ema.update(self.engine.module, zero_stage=self.zero_stage)
        return torch.stack([loss_items[name].detach().float().cpu() for name in self.loss_names]), is_boundary

    def end_epoch(self, epoch: int, train_losses: list[float]) -> dict[str, Any]:
        """Sync BatchNorm statistics, validate, log, save weights and the DeepSpeed checkpoint."""
        # DeepSpeed broadcasts buffers once, at initialize; each rank's BatchNorm then tracks its own shard.
        # Averaging them (model and EMA) makes every rank validate and save the same network.
        dist.all_reduce_mean_(floating_buffers(self.engine.module) + floating_buffers(self.ema.ema))
        metrics = self.validator(self.ema.ema, epoch=epoch, epochs=self.cfg.epochs)
        fitness = dist.broadcast_object(metrics.get("fitness") if metrics else None)
        self.state.epoch = epoch + 1
        self.state.fitness_history.append(fitness)
        is_best = fitness is not None and (self.state.best_fitness is None or fitness >= self.state.best_fitness)
        if is_best:
            self.state.best_fitness = fitness
        if dist.is_main_process():
            values = {
                **{f"train/{name}": round(loss, 5) for name, loss in zip(self.loss_names, train_losses)},
                **{key: value for key, value in metrics.items() if key != "fitness"},
                **{f"lr/pg{index}": group["lr"] for index, group in enumerate(self.engine.optimizer.param_groups)},
            }
            self.logger.log_epoch(epoch, values)
            self._export(epoch, metrics, is_best)
        self.stop_after_epoch = self.stop_request.agreed()  # a signal during the last step or validation
        if self.stop_after_epoch:
            self.logger.info(f"Stopped by a signal after epoch {epoch + 1}; continue with --resume {self.run_dir}")
        checkpoint.save_training_state(
            self.engine,
            self.run_dir,
            tag=f"epoch{epoch + 1}",
            client_state=self._client_state(),
            rank_state=self._rank_state(None),
        )
        return metrics or {}

    # ------------------------------------------------------------------------------------------------------------
    def _should_stop(self, epoch: int) -> bool:
        """Ultralytics' patience rule: stop when fitness has not improved for `patience` epochs."""
        history = [f for f in self.state.fitness_history if f is not None]
        if not history or not self.hyp.patience:
            return False
        best_epoch = max(range(len(history)), key=lambda i: (history[i], i))
        stop = len(history) - 1 - best_epoch >= self.hyp.patience and epoch + 1 < self.cfg.epochs
        if stop:
            self.logger.info(f"Stopping early: no improvement in the last {self.hyp.patience} epochs.")
        return stop

    def _export(self, epoch: int, metrics: dict[str, Any], is_best: bool) -> None:
        weights_dir = self.run_dir / "weights"
        snapshot = export_snapshot(self.ema.ema)
        train_args = {**vars(self.train_hyp), "save_dir": str(self.run_dir)}
        for path in [weights_dir / "last.pt"] + ([weights_dir / "best.pt"] if is_best else []):
            checkpoint.export_weights(
                path,
                snapshot=snapshot,
                epoch=epoch,
                best_fitness=self.state.best_fitness,
                updates=self.ema.updates,
                train_args=train_args,
                metrics=metrics,
            )

    def _client_state(self) -> dict[str, Any]:
        return {
            "yolods": {
                "epoch": self.state.epoch,
                "batch_index": self.state.batch_index,
                "best_fitness": self.state.best_fitness,
                "fitness_history": self.state.fitness_history,
                "last_optimizer_iteration": self.last_optimizer_iteration,
                "ema_updates": self.ema.updates,
            },
            "ema": self.ema.ema.state_dict(),
        }

    def _rank_state(self, loss_sums: torch.Tensor | None) -> dict[str, Any]:
        """What differs between ranks mid-epoch and DeepSpeed saves from rank 0 only (BatchNorm statistics of the
        model and the EMA), this rank's running train losses, and the fp16 loss scaler."""
        scaler = grad_scaler(self.engine)
        return {
            "module_buffers": [b.detach().clone() for b in floating_buffers(self.engine.module)],
            "ema_buffers": [b.detach().clone() for b in floating_buffers(self.ema.ema)],
            "loss_sums": loss_sums,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
        }

    def _restore(self) -> None:
        client_state, rank_state = checkpoint.load_training_state(self.engine, self.run_dir)
        saved = client_state["yolods"]
        self.state = TrainState(
            batch_index=saved["batch_index"],
            epoch=saved["epoch"],
            best_fitness=saved["best_fitness"],
            fitness_history=list(saved["fitness_history"]),
        )
        self.last_optimizer_iteration = saved["last_optimizer_iteration"]
        self.ema.ema.load_state_dict(client_state["ema"])
        self.ema.updates = saved["ema_updates"]
        with torch.no_grad():
            for target, value in zip(floating_buffers(self.engine.module), rank_state["module_buffers"]):
                target.copy_(value)
            for target, value in zip(floating_buffers(self.ema.ema), rank_state["ema_buffers"]):
                target.copy_(value)
        self.resumed_loss_sums = rank_state["loss_sums"]
        scaler = grad_scaler(self.engine)
        if scaler is not None and rank_state["grad_scaler"]:
            scaler.load_state_dict(rank_state["grad_scaler"])
        self.logger.truncate_results(completed_epochs=self.state.epoch)
        if self.state.epoch >= self.cfg.epochs:
            self.logger.info(f"{self.run_dir} already finished its {self.cfg.epochs} epochs; nothing to resume.")
        else:
            where = f", batch {self.state.batch_index + 1}" if self.state.batch_index else ""
            self.logger.info(f"Resuming {self.run_dir} at epoch {self.state.epoch + 1}/{self.cfg.epochs}{where}")

    def _reduced_grad_norm(self) -> float:
        """Gradient norm before clipping, for ZeRO-0, where DeepSpeed does not report it.

        At the boundary DeepSpeed has already averaged the gradients over ranks, so every rank gets the global norm.
        """
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0  # float() syncs
        return norm / (loss_scale(self.engine) or 1.0)

    def _memory_gib(self) -> float:
        """Peak memory of this rank: CUDA max allocated on GPU, peak RSS of the process on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def close(self) -> None:
        """Flush logs and leave the process group cleanly (every rank)."""
        self.profiler.close()
        self.logger.close()
        dist.shutdown(self.engine)


def grad_scaler(engine):
    """The GradScaler DeepSpeed attaches for fp16 torch_autocast (ZeRO-0 on the engine, else the optimizer)."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None) or getattr(
        engine.optimizer, "torch_autocast_gradscaler", None
    )


def loss_scale(engine) -> float | None:
    """The fp16 loss scale in force, wherever DeepSpeed keeps it; None when there is none (fp32, bf16)."""
    scaler = grad_scaler(engine)
    if scaler is not None and scaler.is_enabled():
        return float(scaler.get_scale())
    if engine.fp16_enabled():
        return float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 0.0)))
    return None
