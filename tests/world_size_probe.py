"""One optimizer step of yolods' Trainer on fixed images, for the world-size invariance test.

Run under torchrun with 1 or 2 ranks: the 16 images are split as micro-batches over (micro-step, rank) in a
fixed order, every rank steps through the Trainer's `TrainStep`, and rank 0 saves the parameters before and after
the step, the EMA after its one update, and the bytes its EMA holds between epochs.

    python -m torch.distributed.run --nproc_per_node 2 tests/world_size_probe.py DATA.yaml OUT.pt --micro 8 --zero 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import yolods  # noqa: F401  (offline environment first)
from yolods import dist
from yolods.build import build_trainer
from yolods.config import parse_args, resolve_run
from yolods.preemption import StopRequest

NUM_IMAGES = 16


def gathered_parameters(module: torch.nn.Module, *, zero_stage: int) -> list[torch.Tensor]:
    parameters = list(module.parameters())
    if zero_stage != 3:
        return [p.detach().clone() for p in parameters]
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters):
        return [p.detach().clone() for p in parameters]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--micro", type=int, required=True)
    parser.add_argument("--zero", type=int, required=True)
    parser.add_argument("--bn-eval", action="store_true", help="BatchNorm on running stats: per-image maths")
    args = parser.parse_args()

    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    accumulate = NUM_IMAGES // (args.micro * world)
    run_dir = Path(tempfile.mkdtemp())
    ds_config = run_dir / "ds.json"
    # No clipping: clipping to a norm would hide exactly the gradient-scale errors this probe is for.
    ds_config.write_text(json.dumps({"gradient_clipping": 0.0, "zero_optimization": {"stage": args.zero}}))
    flags = [
        "--data",
        args.data,
        "--epochs",
        "1",
        "--imgsz",
        "128",
        "--batch",
        str(args.micro * world),
        "--nbs",
        str(NUM_IMAGES),
        "--warmup_epochs",
        "0",  # the plain update: at warmup's start the weights' lr is 0
    ]
    flags += [
        "--optimizer",
        "SGD",
        "--lr0",
        "0.01",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--deepspeed_config",
        str(ds_config),
    ]
    flags += ["--project", str(run_dir), "--name", "probe"]
    plan = resolve_run(parse_args(flags), world_size=world)
    dist.init_distributed("cpu")
    trainer = build_trainer(plan, run_dir / "probe", stop_request=StopRequest())

    from ultralytics.data.build import build_yolo_dataset

    plain = build_yolo_dataset(plan.hyp, plan.data["train"], args.micro, plan.data, mode="val", rect=False, stride=32)
    before = gathered_parameters(trainer.engine.module, zero_stage=args.zero)
    trainer.engine.train()
    if args.bn_eval:
        for module in trainer.engine.module.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
    rank = dist.get_rank()
    for step in range(accumulate):
        first = (step * world + rank) * args.micro
        batch = plain.collate_fn([plain[i] for i in range(first, first + args.micro)])
        trainer.step(batch, iteration=step, epoch=0, last_in_epoch=step == accumulate - 1)
    assert trainer.engine.global_steps == 1, trainer.engine.global_steps

    after = gathered_parameters(trainer.engine.module, zero_stage=args.zero)
    with trainer.ema.gathered() as ema_model:  # ZeRO-3: assembled from the ranks' slices
        ema = [p.detach().clone() for p in ema_model.parameters()]
    ema_bytes = sum(t.numel() * t.element_size() for t in trainer.ema.held_tensors())  # between epochs
    if dist.is_main_process():
        torch.save({"before": before, "after": after, "ema": ema, "ema_bytes": ema_bytes}, args.out)
    trainer.close()


if __name__ == "__main__":
    main()
