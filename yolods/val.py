"""`python -m yolods.val`: Ultralytics' validation of trained weights, with the split sharded over every rank.

    python -m yolods.val --model runs/train/exp --data data.yaml     # a yolods run directory: its weights/best.pt
    python -m yolods.val --model best.pt --data coco.yaml --imgsz 640 --batch 32 --half
    torchrun --nproc_per_node 8 -m yolods.val --model best.pt --data coco.yaml
    deepspeed --num_gpus 8 --module yolods.val --model best.pt --data coco.yaml
    srun --ntasks-per-node 8 python -m yolods.val ...                # SLURM: export MASTER_ADDR=<first node> first

The numbers are those of `ultralytics.YOLO(weights).val(...)` on one process with the same settings (each rank
scores a contiguous run of the split's rect batches; see yolods.validation.ShardedDetectionValidator). Rank 0
prints Ultralytics' table and writes metrics.json into the output directory (default runs/val/exp).

Exit codes: 0 done; 2 a user mistake (one line, before any process group); 143 or 130 stopped by a signal;
1 an error on some rank, which ended every rank (see yolods.faults).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolods import dist, heap, inference
from yolods.errors import ConfigError
from yolods.flags import FlagParser
from yolods.model import TrainedDetector, load_trained_detector

# Ultralytics val settings taken as flags of the same name; any other one through --hyp KEY=VALUE.
SWITCHES = ("save_json", "save_txt", "save_conf", "plots", "single_cls", "agnostic_nms", "augment", "verbose")


@dataclass(frozen=True)
class ValPlan:
    """A validation job, checked: the loaded weights, the Ultralytics settings, where to write."""

    detector: TrainedDetector
    settings: dict[str, Any]
    device: str
    project: str
    name: str
    exist_ok: bool


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="python -m yolods.val",
        description="Validate trained YOLO weights, the split sharded over every rank (any launcher).",
    )
    inference.add_common_flags(parser, default_project="runs/val")
    parser.add_argument("--data", help="Ultralytics data.yaml (default: the one the weights were trained on)")
    parser.add_argument("--split", default="val", help="val, test or train (default val)")
    parser.add_argument("--workers", type=int, help="dataloader workers per rank on CUDA (CPU loads in-process)")
    parser.add_argument("--fraction", type=float, help="share of the split to validate (default 1.0)")
    for switch in SWITCHES:
        parser.add_argument(f"--{switch}", action=argparse.BooleanOptionalAction, help="as in Ultralytics")
    parser.add_argument(
        "--hyp", action="append", default=[], metavar="KEY=VALUE", help="any other Ultralytics val setting"
    )
    return parser


def _drawn_data_beside(model: str) -> Path | None:
    """The data.yaml of the set `--data synthetic` drew for the run that `model` (RUN_DIR or one of its weights files)
    comes from; None when there is none."""
    model_path = Path(model).resolve()
    run_dir = model_path if model_path.is_dir() else model_path.parent.parent
    drawn = run_dir / "synthetic" / "data.yaml"
    return drawn if drawn.is_file() else None


def plan_validation(argv: list[str] | None) -> ValPlan:
    """Flags -> ValPlan on every rank before any process group; every user mistake raises ConfigError."""
    from yolods.config import absolute_if_local, parse_hyp_overrides, refuse_flags_given_as_hyp
    from yolods.data import load_data_yaml
    from yolods.hyp import ultralytics_settings

    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = parse_hyp_overrides(args.hyp)
    refuse_flags_given_as_hyp(overrides, {action.dest for action in parser._actions} - {"help", "hyp"})
    settings = {**overrides, **inference.common_settings(args)}
    ultralytics_settings(overrides)  # types and ranges, as Ultralytics' validator would check them mid-job
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers {args.workers} must be 0 (load in the validating process) or more")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise ConfigError(f"--fraction {args.fraction} must be in (0, 1]")
    detector = load_trained_detector(args.model)
    drawn = _drawn_data_beside(args.model)
    if args.data == "synthetic":  # yolods.train's drawn set: each run keeps its own copy
        hint = f"--data {drawn}" if drawn else "--data RUN_DIR/synthetic/data.yaml, the run's drawn set"
        raise ConfigError(f"--data synthetic: yolods.val reads a data.yaml; pass {hint}")
    data_yaml = args.data or detector.defaults.get("data")
    if not data_yaml:
        raise ConfigError(f"--model {args.model} names no data set it was trained on: pass --data data.yaml")
    if args.data is None and not Path(data_yaml).is_file():
        # a run dir moved with its drawn data: the set is beside the weights
        hint = str(drawn) if Path(data_yaml).parent.name == "synthetic" and drawn else "data.yaml"
        raise ConfigError(f"--model {args.model} was trained on {data_yaml}, which is not here: pass --data {hint}")
    data = load_data_yaml(data_yaml, split=args.split)
    if data["channels"] != detector.channels:  # else a torch error on the first batch
        kind = "grayscale" if detector.channels == 1 else "colour"
        raise ConfigError(
            f"--model {args.model} takes {detector.channels}-channel images and --data {data_yaml} has "
            f"{data['channels']}-channel ones (its channels: setting): validate on {kind} data like the model's "
            f"training data, with channels: {detector.channels} in its data.yaml"
        )
    settings.update({key: getattr(args, key) for key in ("workers", *SWITCHES) if getattr(args, key) is not None})
    if args.fraction is not None:
        settings["fraction"] = _fraction_of(args.split, args.fraction)
    device = inference.device_type(args)
    settings.update(
        data=absolute_if_local(str(data_yaml)), split=args.split, device=inference.ultralytics_device(device)
    )
    return ValPlan(
        detector=detector,
        settings=settings,
        device=device,
        project=args.project,
        name=args.name,
        exist_ok=args.exist_ok,
    )


def _fraction_of(split: str, fraction: float) -> float | list[float]:
    """Ultralytics' `fraction` setting that takes `fraction` of `split`: a plain number applies to the train split
    only (ultralytics.data.utils.get_split_fraction), a [train, val, test] list to each split."""
    splits = ["train", "val", "test"]
    if split not in splits[1:]:
        return fraction
    return [fraction if name == split else 1.0 for name in splits]


def run(plan: ValPlan, job: inference.Job) -> int:
    """Validate on every rank; rank 0 prints Ultralytics' table and writes metrics.json."""
    from yolods.checkpoint import make_run_dir
    from yolods.config import write_json
    from yolods.validation import validate_trained

    run_dir = job.run_dir = make_run_dir(project=plan.project, name=plan.name, exist_ok=plan.exist_ok)
    summary = validate_trained(plan.detector, settings=plan.settings, save_dir=run_dir, on_batch_end=job.check_stop)
    if dist.is_main_process():
        settings = {key: value for key, value in plan.settings.items() if key != "device"}
        report = {"model": str(plan.detector.weights), "world_size": dist.get_world_size(), "settings": settings}
        write_json(run_dir / "metrics.json", {**report, **summary})
        dist.print_main(
            f"yolods: {summary['images']} images validated on {dist.ranks_phrase(dist.get_world_size())} "
            f"({', '.join(map(str, summary['images_per_rank']))}); metrics in {run_dir / 'metrics.json'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Validate; returns the process exit code (see the module docstring)."""
    return inference.run_job(argv, plan=plan_validation, run=run)


if __name__ == "__main__":
    heap.finish_process(main())
