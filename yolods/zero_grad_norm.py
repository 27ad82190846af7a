"""ZeRO's gradient norm in one all-reduce, not one per parameter group.

Before every optimizer step DeepSpeed 0.19.8's ZeRO 1-2 optimizer (`scaled_global_norm`) computes the norm of each
parameter group's gradient partition in a Python loop over its tensors, each cast to fp64 on its own, and
all-reduces it; Ultralytics has 3 groups, so a step pays 3 scalar all-reduces (each a full round trip) and about
200 small casts, all before the optimizer can start. The same sum of squares over every group's partition, in
fp64 as DeepSpeed accumulates it, reduced once, gives the same norm (up to rounding), and the clip factor with it.

ZeRO-3's optimizer (`_get_norm_groups`) does the same per sub-group (one per parameter group for a YOLO): a cast and
a norm per tensor, then one scalar all-reduce per group. yolods returns the whole norm as one group instead, which
DeepSpeed's `combine_grad_norm_groups` passes through.

Only the plain path is replaced: no CPU offload (its own norm), no model parallelism, no MoE or Muon (their own
rules). Anything else keeps DeepSpeed's method.
"""

from __future__ import annotations

import types

import torch


def reduce_grad_norm_once(optimizer) -> bool:
    """Replace the gradient norm of a DeepSpeed ZeRO 1-3 optimizer where it is safe; True when replaced."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) is DeepSpeedZeroOptimizer_Stage3:
        return _reduce_stage3_grad_norm_once(optimizer)

    plain = (
        type(optimizer) is DeepSpeedZeroOptimizer
        and not optimizer.cpu_offload
        and not optimizer.has_moe_layers
        and optimizer.model_parallel_group is None
        and not any(optimizer._is_muon_group(group) for group in optimizer.bit16_groups if group)
    )
    if plain:
        optimizer.scaled_global_norm = types.MethodType(_scaled_global_norm, optimizer)
    return plain


def _scaled_global_norm(self, norm_type=2):
    """The L2 norm of every group's gradient partition (still loss-scaled), summed over ranks in one all-reduce.

    Non-finite gradients give +inf, which DeepSpeed's step reads as an overflow, as it reads its own combination.
    """
    import deepspeed.comm as ds_dist

    assert norm_type == 2, "only L2 norm supported"
    partition_grads = [
        grad
        for group_grads in self.averaged_gradients.values()
        for grad in group_grads or ()
        if not getattr(grad, "_zero_padding", False)
    ]
    sum_of_squares = torch.zeros((), dtype=torch.float64, device=self.device)
    if partition_grads:
        norms = torch._foreach_norm(partition_grads, 2, dtype=torch.float64)  # as torch's clip_grad_norm_ does
        sum_of_squares = torch.stack(norms).square().sum()
    sum_of_squares = sum_of_squares.float()
    ds_dist.all_reduce(sum_of_squares, op=ds_dist.ReduceOp.SUM, group=self.dp_process_group)
    norm = sum_of_squares.sqrt()
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))


def _reduce_stage3_grad_norm_once(optimizer) -> bool:
    params = [param for group in optimizer.fp16_groups for param in group]
    plain = (
        bool(params)
        and not optimizer.offload_optimizer
        and not optimizer.use_muon
        and optimizer.model_parallel_group is None
        and len({id(optimizer._get_param_partition_group(param)) for param in params}) == 1  # DeepSpeed's norm
        and optimizer._autoep_expert_parallel_group(params) is None  # reduces over each group's partition group
    )
    if plain:
        optimizer._get_norm_groups = types.MethodType(_stage3_norm_groups, optimizer)
    return plain


def _stage3_norm_groups(self) -> list[torch.Tensor]:
    """ZeRO-3's gradient norm (still loss-scaled) over every sub-group's partition, as one group: the sum of squares
    in fp64, as DeepSpeed's `get_grad_norm_direct` accumulates it, summed over ranks in one all-reduce.

    Non-finite gradients give +inf, which `combine_grad_norm_groups` and the step read as an overflow.
    """
    import deepspeed.comm as ds_dist

    partition_group = self._get_param_partition_group(self.fp16_groups[0][0])  # every parameter's, checked above
    partition_grads = [grad for i in range(len(self.fp16_groups)) for grad in self.averaged_gradients[i]]
    sum_of_squares = torch.zeros((), dtype=torch.float64, device=self.device)
    if partition_grads:
        norms = torch._foreach_norm(partition_grads, 2, dtype=torch.float64)
        sum_of_squares = torch.stack(norms).square().sum()
    ds_dist.all_reduce(sum_of_squares, op=ds_dist.ReduceOp.SUM, group=partition_group)
    norm = sum_of_squares.sqrt()
    return [torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))]
