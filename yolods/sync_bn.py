"""`--sync_bn`: BatchNorm statistics over every rank's images, for small per-rank batches.

torch.nn.SyncBatchNorm on accelerators; on CPU (gloo), where torch's refuses to run, the same maths through
all-reduces: the forward sums (x, x^2, count) over ranks, the backward sums (dy, dy * x_hat) over ranks. Only the
trained model is converted, after its optimizer groups and the EMA copy were made: the EMA, and so best.pt /
last.pt, keep plain BatchNorm2d and load in `ultralytics.YOLO`. The converted layers keep the parameters,
buffers and state-dict names of the originals, so DeepSpeed checkpoints load with or without `--sync_bn`.

On one rank there is nothing to synchronise: the model is left as it is.

Examples:
    >>> convert_sync_batchnorm(model)  # yolov8n, under a process group of 2+ ranks
    57
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn

from yolods import dist


class RankSyncBatchNorm(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm, with a CPU path for gloo process groups; evaluation uses the running statistics."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu":
            return super().forward(input)
        if not (self.training and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
            # torch's SyncBatchNorm raises on CPU even where it would not synchronise; _BatchNorm's forward is it
            return nn.modules.batchnorm._BatchNorm.forward(self, input)
        self._check_input_dim(input)
        momentum = self.momentum or 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as torch
                momentum = 1.0 / float(self.num_batches_tracked)
        return _AllReduceBatchNorm.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, momentum
        )


class _AllReduceBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over the batch of all ranks (per channel: dim 1), by all-reduce on the world group.

    Computed in float32 at least (bf16/fp16 inputs under autocast), returned in the input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        channels = x.shape[1]
        # float64 sums: the variance comes from E[x^2] - E[x]^2, which float32 would round badly
        local_count = torch.tensor([x.numel() / channels], dtype=torch.float64)
        sums = torch.cat([x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64), local_count])
        torch_dist.all_reduce(sums)
        count = sums[-1]
        mean64 = sums[:channels] / count
        var64 = (sums[channels : 2 * channels] / count - mean64 * mean64).clamp_(min=0)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = var64 * count / (count - 1).clamp(min=1)
                running_mean.mul_(1 - momentum).add_(mean64.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        compute = torch.promote_types(x.dtype, torch.float32)
        invstd = torch.rsqrt(var64 + eps).to(compute)
        x_hat = (x.to(compute) - mean64.to(compute).view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, count.to(compute))
        ctx.dims, ctx.shape, ctx.input_dtype = dims, shape, x.dtype
        out = x_hat if weight is None else x_hat * weight.to(compute).view(shape) + bias.to(compute).view(shape)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x_hat, weight, invstd, count = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        grad_output = grad_output.to(x_hat.dtype)
        channels = x_hat.shape[1]
        # This rank's share of the affine gradients: the engine reduces parameter gradients over ranks itself.
        local_dy = grad_output.sum(dims)
        local_dy_xhat = (grad_output * x_hat).sum(dims)
        # The input gradient needs both sums over every rank's images, as the statistics came from all of them.
        sums = torch.cat([local_dy, local_dy_xhat])
        torch_dist.all_reduce(sums)
        mean_dy, mean_dy_xhat = (sums[:channels] / count).view(shape), (sums[channels:] / count).view(shape)
        scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
        grad_input = (scale.view(shape) * (grad_output - mean_dy - x_hat * mean_dy_xhat)).to(ctx.input_dtype)
        affine = weight is not None
        grad_weight = local_dy_xhat.to(weight.dtype) if affine and ctx.needs_input_grad[1] else None
        grad_bias = local_dy.to(weight.dtype) if affine and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm of `model` by a RankSyncBatchNorm on the same parameters and buffers.

    Returns how many were replaced: 0 on one rank, where the model is left as it is.
    """
    if dist.get_world_size() == 1:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, _synced_copy(child))
                replaced += 1
    return replaced


def _synced_copy(norm: nn.modules.batchnorm._BatchNorm) -> RankSyncBatchNorm:
    """A RankSyncBatchNorm holding `norm`'s own Parameter and buffer objects (optimizer groups stay valid)."""
    synced = RankSyncBatchNorm(
        norm.num_features,
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
        device=norm.running_mean.device if norm.running_mean is not None else None,
    )
    if norm.affine:
        synced.weight, synced.bias = norm.weight, norm.bias
    synced.running_mean, synced.running_var = norm.running_mean, norm.running_var
    synced.num_batches_tracked = norm.num_batches_tracked
    synced.train(norm.training)
    return synced


def describe_sync_bn(replaced: int, *, device: torch.device) -> str:
    """The start-of-run line for `--sync_bn`."""
    world_size = dist.get_world_size()
    if not replaced:
        return f"sync BN: off on {dist.ranks_phrase(world_size)} (nothing to synchronise)"
    backend = "all-reduce BatchNorm on CPU" if device.type == "cpu" else "torch SyncBatchNorm"
    return f"sync BN: {replaced} BatchNorm layers normalise over all {world_size} ranks' images ({backend})"
