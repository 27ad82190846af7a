"""`python -m yolods.train`: parse -> build -> train -> close.

    python -m yolods.train                                   # synthetic shapes, yolov8n, a few minutes on a CPU
    python -m yolods.train --data data.yaml --model yolov8s.yaml --epochs 100 --imgsz 640 --batch 64
    deepspeed --num_gpus 8 --module yolods.train --data coco.yaml --model yolo11m.yaml --batch 256 \\
        --deepspeed_config ds_configs/zero2_bf16.json
    deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 --module yolods.train ...
    torchrun --nproc_per_node 8 -m yolods.train ...          # srun under SLURM works the same
    python -m yolods.train --resume runs/train/exp           # continue from its last DeepSpeed checkpoint
"""

from __future__ import annotations

import sys

from yolods import dist
from yolods.config import ConfigError, parse_args
from yolods.preemption import EXIT_CODE, TrainingInterrupted


def main(argv: list[str] | None = None) -> int:
    """Train; returns the process exit code (0, or 2 for a user mistake reported in one line)."""
    try:
        cfg = parse_args(argv)
        dist.init_distributed(cfg.device)
        from yolods import checkpoint
        from yolods.engine import Trainer

        if cfg.resume is not None:
            run_dir = checkpoint.find_resume_dir(cfg)
            cfg = checkpoint.load_run_config(run_dir)
        else:
            run_dir = checkpoint.new_run_dir(cfg)
            if dist.is_main_process():
                checkpoint.save_run_config(run_dir, cfg)
        trainer = Trainer(cfg, run_dir)
    except ConfigError as error:
        if dist.is_main_process():
            print(f"yolods: error: {error}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except TrainingInterrupted:
        return EXIT_CODE  # the checkpoint is on disk; the scheduler may requeue
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
