"""Record a training run step by step, under the Ultralytics trainer or under yolods, for the step-parity test.

Each trainer runs in a fresh process (its own seeds, deterministic mode and Ultralytics globals) and writes one
trace: per micro-step the images it trained on (file names and a hash of the augmented pixels), the losses, each
optimizer group's lr and momentum and whether the optimizer stepped; after each epoch's last batch the model's
and the EMA's state (parameters and BatchNorm statistics); after validation the epoch's metrics.

    python tests/step_trace.py ultralytics DATA.yaml OUT.pt --epochs 3 --imgsz 96 --batch 8 [--hyp close_mosaic=1]
    python tests/step_trace.py yolods DATA.yaml OUT.pt --epochs 3 --imgsz 96 --batch 8 [--hyp close_mosaic=1]
    python -m torch.distributed.run --nproc_per_node 2 tests/step_trace.py yolods DATA.yaml OUT.pt --zero 2 ...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def image_hash(images: torch.Tensor) -> str:
    return hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and floating buffers (BatchNorm statistics), detached copies."""
    return {k: v.detach().clone().float() for k, v in module.state_dict().items() if v.is_floating_point()}


def group_values(param_groups) -> dict[str, list[float]]:
    return {
        "lr": [float(group["lr"]) for group in param_groups],
        "momentum": [float(group.get("momentum", group.get("betas", (float("nan"),))[0])) for group in param_groups],
    }


class Trace:
    """What both trainers record, in the same shape."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []

    def start(self, state: dict[str, torch.Tensor]) -> None:
        self.initial = state

    def batch(self, batch: dict[str, Any]) -> None:
        self.steps.append({"im_file": [Path(f).name for f in batch["im_file"]], "img": image_hash(batch["img"])})

    def step_end(self, loss_items: dict[str, torch.Tensor], param_groups, *, stepped: bool) -> None:
        self.steps[-1].update(
            losses=[float(value) for value in loss_items.values()],
            stepped=stepped,
            end_s=time.perf_counter(),
            end_cpu_s=time.process_time(),
            **group_values(param_groups),
        )

    def epoch_end(self, model: torch.nn.Module, ema: torch.nn.Module) -> None:
        self.epochs.append({"model": float_state(model), "ema": float_state(ema)})

    def metrics(self, metrics: dict[str, float]) -> None:
        """The epoch's validation metrics (Ultralytics' final evaluation of best.pt calls this again: ignored)."""
        self.epochs[-1].setdefault("metrics", {k: float(v) for k, v in metrics.items() if k.startswith("metrics/")})

    def save(self, path: str) -> None:
        torch.save({"initial": self.initial, "steps": self.steps, "epochs": self.epochs}, path)


def run_ultralytics(args: argparse.Namespace, hyp: dict[str, Any]) -> Trace:
    """Ultralytics' own DetectionTrainer, observed through a subclass and its callbacks."""
    import ultralytics.data.utils as data_utils
    from ultralytics.models.yolo.detect import DetectionTrainer

    data_utils.check_font = lambda *a, **k: None  # fonts only matter for plots (and would be fetched)
    trace = Trace()

    class TracingTrainer(DetectionTrainer):
        def preprocess_batch(self, batch):
            trace.batch(batch)
            self._stepped = False
            return super().preprocess_batch(batch)

        def optimizer_step(self):
            super().optimizer_step()
            self._stepped = True

    overrides = dict(
        model=args.model,
        data=args.data,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        workers=args.workers,
        seed=args.seed,
        device="cpu",
        plots=False,
        amp=False,
        val=True,
        verbose=False,
        project=str(Path(args.out).parent / "ultralytics"),
        name="run",
        exist_ok=True,
    )
    trainer = TracingTrainer(overrides={**overrides, **hyp})
    trainer.args.workers = args.workers  # Ultralytics sets 0 on CPU; the trace may ask for more
    trainer.add_callback(
        "on_train_batch_end", lambda t: trace.step_end(t.loss_items, t.optimizer.param_groups, stepped=t._stepped)
    )
    trainer.add_callback("on_train_start", lambda t: trace.start(float_state(t.model)))
    trainer.add_callback("on_train_epoch_end", lambda t: trace.epoch_end(t.model, t.ema.ema))
    trainer.add_callback("on_fit_epoch_end", lambda t: trace.metrics(t.metrics))
    trainer.train()
    return trace


def run_yolods(args: argparse.Namespace, hyp: dict[str, Any]) -> Trace | None:
    """yolods' Trainer, observed by wrapping its TrainStep and its epoch end; under torchrun, at N ranks.

    At N ranks the trace is rank 0's, with each step's images being the whole global batch (every rank's files,
    in rank order), its losses the mean over ranks, and the parameters gathered (ZeRO-3). Returns None on other
    ranks.
    """
    import torch.distributed as torch_dist

    from yolods import dist
    from yolods.build import build_trainer
    from yolods.config import parse_args, resolve_run
    from yolods.preemption import StopRequest

    run_dir = Path(tempfile.mkdtemp(dir=Path(args.out).parent))
    flags = ["--model", args.model, "--data", args.data, "--epochs", str(args.epochs), "--imgsz", str(args.imgsz)]
    flags += ["--batch", str(args.batch), "--workers", str(args.workers), "--seed", str(args.seed)]
    flags += ["--device", "cpu", "--zero", str(args.zero), "--precision", "fp32"]
    flags += ["--project", str(run_dir), "--name", "run"]
    for key, value in hyp.items():
        flags += ["--hyp", f"{key}={value}"]
    flags += args.yolods_flag
    plan = resolve_run(parse_args(flags), world_size=dist.get_world_size())
    dist.init_distributed("cpu")
    world = dist.get_world_size()
    trainer = build_trainer(plan, run_dir / "run", stop_request=StopRequest())
    trace = Trace()
    step, end_epoch = trainer.step, trainer.end_epoch

    def whole_model_state() -> dict[str, torch.Tensor]:
        module = trainer.engine.module
        if plan.zero_stage != 3:
            return float_state(module)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return float_state(module)

    class TracedStep:
        def __getattr__(self, name):
            return getattr(step, name)

        def __call__(self, batch, **kwargs):
            files = [None] * world
            torch_dist.all_gather_object(files, list(batch["im_file"]))
            trace.batch({"im_file": [f for rank_files in files for f in rank_files], "img": batch["img"]})
            result = step(batch, **kwargs)
            losses = result.loss_items.clone()
            dist.all_reduce_mean_([losses])
            trace.step_end(
                dict(zip(step.loss_names, losses)), step.engine.optimizer.param_groups, stepped=result.stepped
            )
            return result

    def traced_end_epoch(epoch, train_losses):
        trace.epochs.append({"model": whole_model_state()})  # before end_epoch averages BatchNorm statistics
        metrics = end_epoch(epoch, train_losses)
        with trainer.ema.gathered() as ema_model:  # ZeRO-3 keeps slices: every rank assembles the whole EMA
            trace.epochs[-1]["ema"] = float_state(ema_model)  # as validated: statistics averaged over ranks
        trace.metrics(metrics)
        return metrics

    trainer.step, trainer.end_epoch = TracedStep(), traced_end_epoch
    trace.start(whole_model_state())
    trainer.train()
    trainer.close()
    return trace if dist.is_main_process() else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trainer", choices=("ultralytics", "yolods"))
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--model", default="yolov8n.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage (yolods only)")
    parser.add_argument("--hyp", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--yolods-flag", action="append", default=[], help="an extra yolods flag (yolods only)")
    args = parser.parse_args()
    import yaml

    hyp = {key: yaml.safe_load(value) for key, _, value in (pair.partition("=") for pair in args.hyp)}
    os.environ.setdefault("YOLO_OFFLINE", "1")
    trace = (run_ultralytics if args.trainer == "ultralytics" else run_yolods)(args, hyp)
    if trace is not None:
        trace.save(args.out)


if __name__ == "__main__":
    main()
