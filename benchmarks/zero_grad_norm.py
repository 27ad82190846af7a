"""ZeRO's gradient norm: DeepSpeed's per-group method against yolods' one all-reduce (yolods/zero_grad_norm.py).

Builds a ZeRO-1, 2 or 3 engine on a real yolov8n (Ultralytics' 3 parameter groups, through yolods.build), takes
a few steps, and before each step computes the norm both ways: prints the two norms, their relative difference and
the median time of each (20 calls, on gradients of 8 images @128).

    torchrun --nproc_per_node 2 benchmarks/zero_grad_norm.py --zero 2
"""

import argparse
import os
import sys
import types

import torch
from gloo_allgather import median_ms  # its neighbour in benchmarks/, the script's own directory

import yolods  # noqa: F401  (offline environment first)
from yolods import dist
from yolods.build import build_engine
from yolods.model import build_optimizer
from yolods.zero_grad_norm import _scaled_global_norm, _stage3_norm_groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, choices=(1, 2, 3), default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    dist.init_distributed("cpu", verbose=False)
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    hyp = get_cfg()
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.args = hyp
    optimizer, _ = build_optimizer(
        model, hyp=hyp, num_classes=3, iterations=100, weight_decay=5e-4, zero_stage=args.zero
    )
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 10.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": args.zero, "reduce_bucket_size": 2e6, "contiguous_gradients": False},
        "steps_per_print": 1e9,
    }
    engine = build_engine(model, optimizer, config)
    zero_optimizer = engine.optimizer
    if args.zero == 3:  # the step combines its per-group norms; yolods' is one group
        from deepspeed.runtime.utils import combine_grad_norm_groups

        def deepspeeds():
            return combine_grad_norm_groups(type(zero_optimizer)._get_norm_groups(zero_optimizer))

        def yolods_():
            return combine_grad_norm_groups(_stage3_norm_groups(zero_optimizer))
    else:
        deepspeeds = types.MethodType(type(zero_optimizer).scaled_global_norm, zero_optimizer)
        yolods_ = types.MethodType(_scaled_global_norm, zero_optimizer)
    batch = {
        "img": torch.rand(8, 3, 128, 128),
        "batch_idx": torch.arange(8.0),
        "cls": torch.tensor([[0.0], [1.0], [2.0], [0.0]] * 2),
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 8),
    }
    for step in range(args.steps):
        loss, _ = engine(batch)
        engine.backward(loss.sum() * dist.get_world_size())
        theirs, ours = float(deepspeeds()), float(yolods_())
        theirs_ms, ours_ms = median_ms(deepspeeds), median_ms(yolods_)
        if dist.get_rank() == 0:
            print(
                f"ZeRO-{args.zero} step {step}: norm {theirs:.9g} (DeepSpeed) {ours:.9g} (yolods), relative difference "
                f"{abs(theirs - ours) / theirs:.1e}; {theirs_ms:.2f} ms against {ours_ms:.2f} ms (median of 20)"
            )
        engine.step()


if __name__ == "__main__":
    if "RANK" not in os.environ:  # --help, or run without a launcher
        sys.exit(__doc__)
    main()
