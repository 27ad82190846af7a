"""The training loop around the DeepSpeed engine: epochs of train steps, then validate, export and checkpoint.

The Trainer is handed its parts by yolods.build (a TrainStep, the data, the validator, the EMA, a Checkpointer,
a RunLogger, a StepProfiler) and only sequences them; it holds the loop's own state and composes it for
checkpoints with `state_dict()` / `rank_state_dict()`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from yolods import dist
from yolods.checkpoint import Checkpointer, complete_tags
from yolods.config import RunPlan
from yolods.data import TrainData
from yolods.errors import TrainingDiverged
from yolods.metrics import RunFacts, RunLogger, best_epoch, peak_memory_gib
from yolods.model import advance_loss_schedule, floating_buffers, ultralytics_weights
from yolods.preemption import TrainingInterrupted
from yolods.profiling import StepProfiler
from yolods.reshard import reshard_note
from yolods.step import TrainStep, grad_scaler, loss_scale
from yolods.validation import EpochValidator


@dataclass
class OptimizerStepWindow:
    """The micro-batches since the last optimizer step, summed: one TensorBoard point per optimizer step covers all
    of them, as Ultralytics' `accumulate` sums their gradients. An optimizer step can span an epoch's end (the
    accumulation carries over, as in Ultralytics); only the micro-batches' own seconds count, not validation's."""

    loss_sums: torch.Tensor | None = None
    micro_batches: int = 0
    images: int = 0  # on all ranks
    seconds: float = 0.0  # waiting for data + the train step, per micro-batch
    data_wait_s: float = 0.0

    def add(self, loss_items: torch.Tensor, *, images: int, seconds: float, data_wait_s: float) -> None:
        self.loss_sums = loss_items.clone() if self.loss_sums is None else self.loss_sums + loss_items
        self.micro_batches += 1
        self.images += images
        self.seconds += seconds
        self.data_wait_s += data_wait_s

    def mean_losses(self) -> torch.Tensor:
        return self.loss_sums / self.micro_batches

    def imgs_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def data_wait_share(self) -> float:
        return self.data_wait_s / max(self.seconds, 1e-9)


@dataclass
class TrainState:
    """What a checkpoint must carry beyond DeepSpeed's own state."""

    epoch: int = 0  # epoch to run next (or the one a stop signal interrupted)
    batch_index: int = 0  # first batch of `epoch` still to run: > 0 only after a stop signal
    best_fitness: float | None = None
    fitness_history: list[float] = field(default_factory=list)


def patience_exhausted(fitness_history: list[float | None], patience: int) -> bool:
    """Ultralytics' EarlyStopping: `patience` epochs have passed since fitness last rose strictly above its best
    (0: never stop early). A tie is no improvement; while the best is still 0, early in training, every epoch
    counts as one; an epoch without fitness never stops the run but counts towards the next."""
    if not patience or not fitness_history or fitness_history[-1] is None:
        return False
    best_epoch, best_fitness = 0, 0.0
    for epoch, fitness in enumerate(fitness_history, start=1):
        if fitness is not None and (fitness > best_fitness or best_fitness == 0):
            best_epoch, best_fitness = epoch, fitness
    return len(fitness_history) - best_epoch >= patience


class Trainer:
    """Ultralytics YOLO detection training through DeepSpeed, on any launcher and ZeRO stage.

    Examples:
        >>> trainer = build_trainer(plan, run_dir)  # yolods.build makes the parts
        >>> trainer.train()
        >>> trainer.close()
    """

    def __init__(
        self,
        plan: RunPlan,
        *,
        hyp: SimpleNamespace,
        step: TrainStep,
        train_data: TrainData,
        validator: EpochValidator,
        ema,
        checkpointer: Checkpointer,
        logger: RunLogger,
        profiler: StepProfiler,
    ):
        self.epochs = plan.cfg.epochs
        self.hyp = hyp  # the plan's, naming the data.yaml trained on (the synthetic set's once drawn)
        self.step = step
        self.engine = step.engine
        self.train_data = train_data
        self.validator = validator
        self.ema = ema
        self.checkpointer = checkpointer
        self.logger = logger
        self.profiler = profiler
        self.run_dir: Path = checkpointer.run_dir
        self.loss_names = step.loss_names
        self.plan = plan
        self.state = TrainState()
        self.started_s = time.perf_counter()
        self.images_trained = 0  # by all ranks, in this process's run (a resumed run counts from its start)
        self.step_window = OptimizerStepWindow()  # checkpoints fall on optimizer steps: a resumed run starts one
        self.stop_after_epoch = False
        self.finished = False
        self.checkpoint_due = False  # an epoch ended mid-accumulation: checkpoint at the next optimizer step
        self.resumed_loss_sums: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; returns the last validation metrics (rank 0) or {}."""
        metrics: dict[str, Any] = {}
        self.started_s = time.perf_counter()
        # rows of epochs this run (re)does: written after the checkpoint it resumed from, or by an attempt that
        # died before its first checkpoint and is being started over in the same directory
        self.logger.truncate_results(completed_epochs=self.state.epoch)
        for epoch in range(self.state.epoch, self.epochs):
            # DeepSpeed's counts of optimizer steps skipped (non-finite gradients at ZeRO 1-3) and taken, skipped or not
            steps_before = self.engine.skipped_steps, self.engine.global_steps
            train_losses = self.train_epoch(epoch)
            self._stop_if_diverged(epoch, train_losses, steps_before=steps_before)
            metrics = self.end_epoch(epoch, train_losses)
            if self.finished:
                break
            if self.stop_after_epoch and not self.checkpoint_due:  # else the stop waits for the next optimizer step
                raise TrainingInterrupted(f"epoch{epoch + 1}", exit_code=self.step.stop_request.agreed_exit_code)
        self.logger.plot()
        return metrics

    def train_epoch(self, epoch: int) -> list[float]:
        """One pass over this rank's shard; returns the epoch's mean train losses.

        After a stop signal the epoch ends early with a checkpoint and TrainingInterrupted, at an optimizer step.
        A run resumed from that checkpoint replays the epoch's loader up to where it stopped without training on
        it, so sampler, augmentation and mosaic draws continue exactly where they were. The same holds for the
        checkpoint of an epoch that ended mid-accumulation, which waits for the next optimizer step.
        """
        mosaic_closed = bool(self.hyp.close_mosaic) and epoch >= self.epochs - self.hyp.close_mosaic
        self.engine.train()
        loader = self.train_data.loader_for_epoch(epoch, close_mosaic=self.hyp if mosaic_closed else None)
        num_batches = len(loader)
        first_batch, self.state.batch_index = self.state.batch_index, 0
        loss_sums = self.resumed_loss_sums if first_batch else torch.zeros(len(self.loss_names))
        bar = self.logger.progress(loader, epoch=epoch, epochs=self.epochs, total=num_batches)
        step_started = time.perf_counter()
        for batch_index, batch in enumerate(bar):
            if batch_index < first_batch:
                # already trained on before the interruption; counted, so that a rank still replaying (minutes into
                # a large epoch) is not taken for stuck by one that is done (yolods.faults.PeerPulse)
                self._passed("replay")
                step_started = time.perf_counter()  # the replay is not the next batch's wait for data
                continue
            data_wait_s = time.perf_counter() - step_started
            with self.profiler.step():
                result = self.step(
                    batch,
                    iteration=batch_index + num_batches * epoch,
                    epoch=epoch,
                    last_in_epoch=batch_index == num_batches - 1,
                )
            loss_sums += result.loss_items
            images = batch["img"].shape[0] * dist.get_world_size()
            self.images_trained += images
            self.step_window.add(
                result.loss_items, images=images, seconds=time.perf_counter() - step_started, data_wait_s=data_wait_s
            )
            self.logger.update_bar(
                epoch=epoch,
                epochs=self.epochs,
                mean_losses=(loss_sums / (batch_index + 1)).tolist(),
                instances=batch["cls"].shape[0],  # this rank's boxes in the batch, as Ultralytics shows
                mem_gib=peak_memory_gib(self.step.device),
                imgsz=batch["img"].shape[-1],
            )
            if result.stepped:
                self.logger.log_step(self.engine.global_steps, self._step_scalars(self.step_window))
                self.step_window = OptimizerStepWindow()
            mid_epoch_boundary = result.stepped and batch_index < num_batches - 1  # the epoch's end saves anyway
            if mid_epoch_boundary and (
                result.stop or self.checkpoint_due or self.checkpointer.mid_epoch_save_due(self.engine.global_steps)
            ):
                self._save_mid_epoch(epoch, next_batch=batch_index + 1, loss_sums=loss_sums, stop=result.stop)
            step_started = time.perf_counter()
        return (loss_sums / max(num_batches, 1)).tolist()

    def _stop_if_diverged(self, epoch: int, train_losses: list[float], *, steps_before: tuple[int, int]) -> None:
        """End the run, before the epoch's weights and checkpoint are written, if its train loss was NaN or infinite
        on any rank, or if DeepSpeed skipped every optimizer step of the epoch for non-finite gradients without fp16
        loss scaling (whose search for a scale skips steps by design). A collective: every rank decides together.

        Ultralytics' trainer checks the loss at each epoch end and reloads last.pt to try the epoch again, up to 3
        times. Without the check yolods trained on through NaN losses (ZeRO-0), or through steps ZeRO 1-3 all
        skipped, exported weights whose NaNs the export zeroes, and exited 0 with "best epoch N: mAP50 0.000". Here
        the earlier epochs' checkpoints and weights stay as they were, unpoisoned, and the user is told what to change.
        """
        skipped = self.engine.skipped_steps - steps_before[0]
        taken = self.engine.global_steps - steps_before[1]
        non_finite_loss = not all(math.isfinite(loss) for loss in train_losses)
        every_step_skipped = taken > 0 and skipped == taken and loss_scale(self.engine) is None
        if not dist.any_rank(non_finite_loss or every_step_skipped):
            return
        what = "the train loss became NaN or infinite" if non_finite_loss else "every optimizer step was skipped"
        what += f" in epoch {epoch + 1}/{self.epochs}" + ("" if non_finite_loss else " (non-finite gradients)")
        raise TrainingDiverged(
            f"{what}: the run diverged, so that epoch's "
            "weights and checkpoint were not saved (earlier epochs' are kept). Lower --lr0 or the --hyp loss gains, "
            "or train in bf16 or fp32 rather than fp16, and start again"
        )

    def _passed(self, point: str) -> None:
        """Count a point every rank passes, as the train step counts its phases (its `on_phase`, when set)."""
        if self.step.on_phase is not None:
            self.step.on_phase(point)

    def _save_mid_epoch(self, epoch: int, *, next_batch: int, loss_sums: torch.Tensor, stop: bool) -> None:
        """Checkpoint at an optimizer-step boundary (no half-summed gradients) as tag epochN-batchM; then stop if
        asked to. Saved for a stop, a save period, or an epoch end that fell mid-accumulation.

        The data state saved is the epoch's start: a resumed run replays the epoch's loader up to `next_batch`, so
        it continues exactly.
        """
        self.state.epoch, self.state.batch_index = epoch, next_batch
        tag = f"epoch{epoch + 1}-batch{next_batch}"
        rank_state = self.rank_state_dict(loss_sums, data_state=self.train_data.epoch_start_state)
        self.checkpointer.save(tag, client_state=self.state_dict(), rank_state=rank_state)
        # this process goes on from where it is; only a resumed one starts there
        self.state.batch_index, self.checkpoint_due = 0, False
        if stop:
            self._log_stop(tag)
            raise TrainingInterrupted(tag, exit_code=self.step.stop_request.agreed_exit_code)

    def _step_scalars(self, window: OptimizerStepWindow) -> dict[str, float]:
        """TensorBoard scalars for one optimizer step (the mean loss of its micro-batches on this rank, its time and
        images over all of them); names carry their units."""
        scalars = {f"train/{name}": float(value) for name, value in zip(self.loss_names, window.mean_losses())}
        scalars.update({f"lr/pg{index}": group["lr"] for index, group in enumerate(self.engine.optimizer.param_groups)})
        scalars.update(
            {
                "throughput/imgs_per_s": window.imgs_per_s(),
                "time/step_s": window.seconds,
                "time/data_wait_share": window.data_wait_share(),
                "memory/peak_gib": peak_memory_gib(self.step.device),
            }
        )
        grad_norm = self.step.grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        scale = loss_scale(self.engine)
        if scale is not None:
            scalars["train/loss_scale"] = scale
        return scalars

    def end_epoch(self, epoch: int, train_losses: list[float]) -> dict[str, Any]:
        """Sync BatchNorm statistics, validate, log, save weights and the DeepSpeed checkpoint.

        An epoch that ends mid-accumulation (Ultralytics carries the cycle over into the next epoch) is
        checkpointed at the next optimizer step instead, so a checkpoint never holds half-summed gradients; the
        last epoch's checkpoint is saved at once (its pending gradients are never applied, as in Ultralytics).
        """
        advance_loss_schedule(self.engine.module, completed_epochs=epoch + 1)
        # DeepSpeed broadcasts buffers once, at initialize; each rank's BatchNorm then tracks its own shard.
        # Averaging them (model and EMA) makes every rank validate and save the same network.
        dist.all_reduce_mean_(floating_buffers(self.engine.module) + floating_buffers(self.ema.ema))
        with self.ema.gathered() as ema_model:  # ZeRO-3: assembled from the ranks' slices for this epoch end
            return self._validate_and_save(epoch, ema_model, train_losses)

    def _validate_and_save(self, epoch: int, ema_model: torch.nn.Module, train_losses: list[float]) -> dict[str, Any]:
        metrics = self.validator(ema_model, epoch=epoch, epochs=self.epochs)
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
            weights = ultralytics_weights(
                ema_model,
                epoch=epoch,
                best_fitness=self.state.best_fitness,
                updates=self.ema.updates,
                metrics=metrics,
            )
            self.checkpointer.export_weights(weights, is_best=is_best)
        self.finished = epoch + 1 >= self.epochs or self._should_stop(epoch)
        self.stop_after_epoch = self.step.stop_request.agreed()  # a signal during the last step or validation
        if self.step.accumulating and not self.finished:
            self.checkpoint_due = True
            return metrics or {}
        tag = f"epoch{epoch + 1}"
        rank_state = self.rank_state_dict(None, data_state=self.train_data.state_dict())
        self.checkpointer.save(tag, client_state=self.state_dict(), rank_state=rank_state, finished=self.finished)
        self.checkpoint_due = False
        if self.stop_after_epoch and not self.finished:  # a stop in the last epoch leaves nothing to resume
            self._log_stop(tag)
        return metrics or {}

    def _log_stop(self, tag: str) -> None:
        cause = self.step.stop_request.cause or "another rank's stop request"
        self.logger.info(f"\nStopped by {cause}: checkpoint {tag} saved; continue with --resume {self.run_dir}")

    def _should_stop(self, epoch: int) -> bool:
        stop = epoch + 1 < self.epochs and patience_exhausted(self.state.fitness_history, self.hyp.patience)
        if stop:
            self.logger.info(f"Stopping early: no improvement in the last {self.hyp.patience} epochs.")
        return stop

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The state every rank shares (DeepSpeed's client state): loop position, fitness, step and EMA."""
        return {
            "yolods": {
                "epoch": self.state.epoch,
                "batch_index": self.state.batch_index,
                "best_fitness": self.state.best_fitness,
                "fitness_history": self.state.fitness_history,
                **self.step.state_dict(),
                "ema_updates": self.ema.updates,
            },
            "ema": self.ema.state_dict(),  # whole (ZeRO-3: gathered), so any number of ranks can resume it
        }

    def rank_state_dict(self, loss_sums: torch.Tensor | None, *, data_state: dict[str, Any]) -> dict[str, Any]:
        """What differs between ranks and DeepSpeed saves from rank 0 only (BatchNorm statistics of the model and
        the EMA), this rank's running train losses, the fp16 loss scaler, and the data's random state to go on
        from (`data_state`: the next epoch's start, or the current epoch's for a mid-epoch checkpoint)."""
        scaler = grad_scaler(self.engine)
        return {
            "data": data_state,
            "module_buffers": [b.detach().clone() for b in floating_buffers(self.engine.module)],
            "ema_buffers": [b.detach().clone() for b in floating_buffers(self.ema.ema)],
            "loss_sums": loss_sums,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
        }

    def load_state_dict(self, client_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Restore what `state_dict` and `rank_state_dict` saved (DeepSpeed has loaded its own state already)."""
        saved = client_state["yolods"]
        self.state = TrainState(
            batch_index=saved["batch_index"],
            epoch=saved["epoch"],
            best_fitness=saved["best_fitness"],
            fitness_history=list(saved["fitness_history"]),
        )
        self.step.load_state_dict(saved)
        self.ema.load_state_dict(client_state["ema"])
        self.ema.updates = saved["ema_updates"]
        with torch.no_grad():
            for target, value in zip(floating_buffers(self.engine.module), rank_state["module_buffers"]):
                target.copy_(value)
            for target, value in zip(floating_buffers(self.ema.ema), rank_state["ema_buffers"]):
                target.copy_(value)
        self.resumed_loss_sums = rank_state["loss_sums"]
        if rank_state.get("data") is not None:  # absent in checkpoints of yolods before data states were saved
            self.train_data.load_state_dict(rank_state["data"])
        advance_loss_schedule(self.engine.module, completed_epochs=self.state.epoch)
        scaler = grad_scaler(self.engine)
        if scaler is not None and rank_state["grad_scaler"]:
            scaler.load_state_dict(rank_state["grad_scaler"])

    def resume(self) -> None:
        """Continue from the newest complete checkpoint of the run directory, saved on any number of ranks."""
        loaded = self.checkpointer.load()
        self.load_state_dict(loaded.client_state, loaded.rank_state)
        if self.state.epoch >= self.epochs:
            self.logger.info(f"{self.run_dir} already finished its {self.epochs} epochs; nothing to resume.")
            return
        where = f", batch {self.state.batch_index + 1}" if self.state.batch_index else ""
        self.logger.info(
            f"Resuming {self.run_dir} from {loaded.tag} at epoch {self.state.epoch + 1}/{self.epochs}{where}"
        )
        if loaded.saved_world_size != dist.get_world_size():
            self.logger.info(reshard_note(loaded.tag, loaded.saved_world_size, self.plan.zero_stage, self.plan.batch))

    def summarize(self, *, stopped: str | None = None) -> None:
        """Rank 0's closing lines: results, speed, where the files are and what to run next."""
        wall_s = time.perf_counter() - self.started_s
        tags = complete_tags(self.run_dir) if dist.is_main_process() else []
        facts = RunFacts(
            epochs_done=self.state.epoch,
            epochs=self.epochs,
            wall_s=wall_s,
            imgs_per_s=self.images_trained / max(wall_s, 1e-9),
            world_size=dist.get_world_size(),
            zero_stage=self.plan.zero_stage,
            precision=self.plan.precision,
            data_yaml=self.hyp.data,
            latest_checkpoint=tags[0].name if tags else None,
            stopped=stopped,
            best_epoch=best_epoch(self.state.fitness_history),
        )
        self.logger.summary(facts)

    def close(self) -> None:
        """Flush logs and leave the process group cleanly (every rank)."""
        self.profiler.close()
        self.logger.close()
        dist.shutdown(self.engine)
