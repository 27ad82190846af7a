"""Run building: the optimizer DeepSpeed's ZeRO 1-3 step on their flat partitions."""

from __future__ import annotations

import pytest
import torch

import yolods  # noqa: F401  (offline environment before Ultralytics is imported)
from yolods.build import fuse_for_flat_partitions
from yolods.config import RunConfig, hyperparameters
from yolods.model import build_model, build_optimizer

NAMES = {0: "rectangle", 1: "ellipse", 2: "triangle"}


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_zero_partitions_step_with_the_fused_kernel_and_the_same_update(name, shapes_data):
    """Ultralytics' optimizer, fused for ZeRO 1-3, keeps its groups and steps as the per-tensor loop does, to
    rounding, through a momentum warmup and lr changes like the schedule's."""
    hyp = hyperparameters(RunConfig(data=str(shapes_data), device="cpu"))
    models = [build_model("yolov8n.yaml", num_classes=3, class_names=NAMES, hyp=hyp, verbose=False) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    loop, fused = (
        build_optimizer(model, hyp=hyp, num_classes=3, iterations=100, weight_decay=5e-4, zero_stage=2)[0]
        for model in models
    )
    for group in loop.param_groups:  # Ultralytics' optimizer is not fused already
        assert group.get("fused") is not True
    if name == "SGD":  # `auto` gives AdamW on a short run
        loop, fused = (torch.optim.SGD(o.param_groups, lr=0.01, momentum=0.9, nesterov=True) for o in (loop, fused))
    fuse_for_flat_partitions(fused)
    assert all(group["fused"] and not group["foreach"] for group in fused.param_groups)
    assert [group["param_group"] for group in fused.param_groups] == [
        group["param_group"] for group in loop.param_groups
    ]

    generator = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in models[0].parameters()]
    for step in range(6):
        gradients = [torch.randn(p.shape, generator=generator) * 1e-2 for p in models[0].parameters()]
        for optimizer, model in ((loop, models[0]), (fused, models[1])):
            for group in optimizer.param_groups:
                group["lr"] = 0.01 * (step + 1) / 6
                if "momentum" in group:
                    group["momentum"] = 0.8 + 0.02 * step
            for param, gradient in zip(model.parameters(), gradients):
                param.grad = gradient.clone()
            optimizer.step()
    moved = max(float((p.detach() - p0).abs().max()) for p, p0 in zip(models[0].parameters(), before))
    apart = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(*(m.parameters() for m in models)))
    assert moved > 1e-3 and apart <= 1e-5 * moved


def test_optimizers_without_a_fused_kernel_are_left_as_they_are():
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.RMSprop(params, lr=0.01)
    fuse_for_flat_partitions(optimizer)
    assert not optimizer.param_groups[0].get("fused")
    stepped = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    params[0].grad = torch.ones(3)
    stepped.step()  # state exists: the kernel was chosen already
    fuse_for_flat_partitions(stepped)
    assert not stepped.param_groups[0]["fused"]
