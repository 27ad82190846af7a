"""fp16 steps of a bare DeepSpeed ZeRO engine with 3 parameter groups, for the GradScaler growth test.

Prints, for each ZeRO stage, as JSON, the GradScaler's scale after each optimizer step, with yolods'
`grow_scale_once_per_step` applied to a growth interval of 2 and the scale started at 1 (no step overflows). One
process, gloo, every stage in it (an engine each).

    python tests/grad_scaler_probe.py --zero 1,2,3 --port 29611
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import yolods  # noqa: F401  (offline environment first)
from yolods.step import grad_scaler, grow_scale_once_per_step

parser = argparse.ArgumentParser()
parser.add_argument("--zero", required=True, help="stages, comma-separated")
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import deepspeed  # noqa: E402  (after the environment it reads)

from yolods import dist  # noqa: E402

# as yolods.train joins (DeepSpeed's bare init_distributed would JIT-build its shared-memory op: 20 s on a new venv)
dist.init_distributed("cpu", verbose=False)


def scales_at(zero: int) -> list[float | None]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    groups = [  # Ultralytics' three: weights with decay, BatchNorm weights, biases
        {"params": [model[0].weight, model[2].weight]},
        {"params": [model[1].weight]},
        {"params": [model[0].bias, model[1].bias, model[2].bias]},
    ]
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": zero},
        "torch_autocast": {"enabled": True, "dtype": "float16"},
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(groups, lr=0.01), config=config)
    scaler = grad_scaler(engine)
    scaler.set_growth_interval(2)
    grow_scale_once_per_step(engine)
    scaler.scale(torch.zeros(()))  # the scale is made at its first use
    scaler.update(new_scale=1.0)
    scales = []
    for _ in range(6):
        engine.backward(engine(torch.randn(4, 8)).float().pow(2).mean())
        engine.step()
        scales.append(float(scaler.get_scale()) if engine.was_step_applied() else None)
    return scales


for stage in args.zero.split(","):
    print(f"scales {stage}:", json.dumps(scales_at(int(stage))))
