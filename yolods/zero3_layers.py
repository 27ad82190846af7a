"""ZeRO-3 fetches each YOLO layer's parameters as one unit (DeepSpeed's "leaf modules"), not each Conv and BatchNorm.

At ZeRO-3 DeepSpeed hooks every submodule: before its forward it gathers the module's parameters, after it releases
them, and the same again around its backward. A YOLO detector is about 220 small modules (yolov8n: 3 M parameters
in 64 convolutions and their BatchNorms), so those hooks, not communication, were most of ZeRO-3's step: at one
rank, where nothing is sent, yolov8n's step took 484-550 ms against ZeRO-0's 78 ms (8 images @160, fp32, bare
DetectionModel; bare DeepSpeed's gloo all-gathers also slow a 2-thread rank's kernels, yolods/gloo_collectives.py).
Marking each layer of `model.model` a leaf module (`deepspeed.utils.set_z3_leaf_module`) makes it one gather, one
release and one gradient reduction per layer: 183-186 ms, the same losses.

DeepSpeed's own knob, `stage3_module_granularity_threshold`, marks leaves by size and breaks on YOLO: it marks the
first layer, whose input (the images) needs no gradient. DeepSpeed reduces a leaf's gradients from a full backward
hook, and torch fires that hook, for a module none of whose tensor inputs requires grad, when the gradient of its
output arrives, before its own parameters' gradients exist (0.19.8: `RuntimeError: output with shape [1] doesn't
match the broadcast shape [16]` at the first backward). The same holds for a module fed a list (Ultralytics' Detect
head, Concat) or detached tensors (YOLO26's one-to-one head). So the leaves are chosen by a probe forward: a module
is a leaf if it was called exactly once with a tensor argument that requires grad, and every parameter in it is
trained; otherwise its children are tried. Modules without children gain nothing and keep DeepSpeed's hooks.

Examples:
    >>> mark_layers_as_zero3_leaves(model, stride=32)  # yolov8n, before deepspeed.initialize
    21
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

# containers Ultralytics never calls as a whole (it iterates them): their children are the candidates
_UNCALLED_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def mark_layers_as_zero3_leaves(model: nn.Module, *, stride: int) -> int:
    """Mark the largest safe modules of `model` as ZeRO-3 leaf modules; returns how many. Call before initialize."""
    from deepspeed.utils import set_z3_leaf_module

    leaves = zero3_leaves(model, stride=stride)
    for module in leaves:
        set_z3_leaf_module(module, True)
    return len(leaves)


def zero3_leaves(model: nn.Module, *, stride: int) -> list[nn.Module]:
    """The largest modules whose parameters ZeRO-3 can fetch, and whose gradients it can reduce, as one unit."""
    return _largest_safe_leaves(model, calls=_probe_calls(model, stride=stride))


def zero3_fetch_units(model: nn.Module, *, stride: int) -> int:
    """How many parameter fetches ZeRO-3 makes per forward with those leaves: one per leaf, one per other module
    that holds parameters itself (the first layer's Conv2d and BatchNorm, the head's frozen DFL)."""
    leaves = zero3_leaves(model, stride=stride)
    in_leaves = {id(parameter) for leaf in leaves for parameter in leaf.parameters()}
    outside = [
        module
        for module in model.modules()
        if any(id(parameter) not in in_leaves for parameter in module.parameters(recurse=False))
    ]
    return len(leaves) + len(outside)


def _probe_calls(model: nn.Module, *, stride: int) -> Counter[nn.Module]:
    """How often each module ran, fed a tensor that requires grad, in one training-mode forward of a small batch;
    a module also called without one counts 0. The buffers (BatchNorm's running statistics) are put back after."""
    calls: Counter[nn.Module] = Counter()
    fed_without_grad: set[nn.Module] = set()

    def count(module: nn.Module, args: tuple) -> None:
        if any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args):
            calls[module] += 1
        else:
            fed_without_grad.add(module)

    first_conv = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    # the model's own input channels (1 for a grayscale-trained .pt), two images: BatchNorm trains on more than one
    images = torch.zeros(
        2,
        first_conv.in_channels,
        2 * stride,
        2 * stride,
        device=first_conv.weight.device,
        dtype=first_conv.weight.dtype,
    )
    saved_buffers = [buffer.clone() for buffer in model.buffers()]
    was_training = model.training
    handles = [module.register_forward_pre_hook(count) for module in model.modules()]
    try:
        with torch.enable_grad():
            model.train()(images)  # the training forward: the head's branches differ in evaluation mode
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), saved_buffers):
                buffer.copy_(saved)
    for module in fed_without_grad:
        calls[module] = 0
    return calls


def _largest_safe_leaves(module: nn.Module, *, calls: Counter[nn.Module]) -> list[nn.Module]:
    parameters = list(module.parameters())
    if not any(parameter.requires_grad for parameter in parameters):
        return []  # nothing to gather for training: DeepSpeed's default hooks are as cheap
    children = list(module.children())
    if not children:
        return []
    trained = all(parameter.requires_grad for parameter in parameters)
    if trained and calls[module] == 1 and not isinstance(module, _UNCALLED_CONTAINERS):
        return [module]
    return [leaf for child in children for leaf in _largest_safe_leaves(child, calls=calls)]
