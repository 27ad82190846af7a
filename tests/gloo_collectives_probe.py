"""Run under torchrun with 2 ranks: DeepSpeed's all_gather_into_tensor, rerouted through broadcasts on gloo, gives
what torch's own all-gather gives. Prints one line per case; exits non-zero on the first difference."""

import deepspeed.comm as ds_comm
import torch
import torch.distributed as torch_dist

from yolods import dist
from yolods.gloo_collectives import use_broadcast_all_gathers_on_gloo


def expected(shard: torch.Tensor) -> torch.Tensor:
    whole = torch.empty(shard.numel() * torch_dist.get_world_size(), dtype=shard.dtype)
    torch_dist.all_gather_into_tensor(whole, shard)
    return whole


def main() -> None:
    dist.init_distributed("cpu", verbose=False)  # DeepSpeed's comm backend on gloo, as yolods.train starts it
    assert use_broadcast_all_gathers_on_gloo(), "the route was not installed on gloo"
    assert use_broadcast_all_gathers_on_gloo(), "installing twice must be harmless"
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    both_ranks = torch_dist.new_group(list(range(world)))

    for dtype in (torch.float32, torch.bfloat16):
        shard = torch.arange(5, dtype=torch.float32).add(10 * rank).to(dtype)
        whole = torch.full((5 * world,), -1.0, dtype=dtype)
        assert ds_comm.all_gather_into_tensor(whole, shard) is None  # synchronous, like torch's
        assert torch.equal(whole, expected(shard)), (dtype, whole)
        dist.print_main(f"separate input {dtype}: ok")

    # ZeRO 1-2 hand in the output's own slice as the input
    flat = torch.full((6 * world,), -1.0)
    flat.narrow(0, 6 * rank, 6).copy_(torch.linspace(0, 1, 6) + rank)
    handle = ds_comm.all_gather_into_tensor(flat, flat.narrow(0, 6 * rank, 6), group=both_ranks, async_op=True)
    handle.wait()
    assert torch.equal(flat, expected(torch.linspace(0, 1, 6) + rank)), flat
    dist.print_main("aliased input, subgroup, async: ok")

    # a 2-D output is gathered along its first dimension, as torch does
    shard_2d = torch.full((2, 3), float(rank))
    whole_2d = torch.empty(2 * world, 3)
    ds_comm.all_gather_into_tensor(whole_2d, shard_2d)
    assert torch.equal(whole_2d.view(-1), expected(shard_2d.view(-1))), whole_2d
    dist.print_main("2-d output: ok")

    # what broadcasts cannot serve (a non-contiguous output) still goes to gloo's own all-gather
    strided = torch.empty(4 * world, 2)[:, 0]
    ds_comm.all_gather_into_tensor(strided, torch.full((4,), float(rank)))
    assert torch.equal(strided.contiguous(), expected(torch.full((4,), float(rank)))), strided
    dist.print_main("non-contiguous output: ok")
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
