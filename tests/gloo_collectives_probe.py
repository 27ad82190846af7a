"""Run with 2 ranks: DeepSpeed's all_gather_into_tensor and reduce_scatter_tensor, rerouted through broadcasts and
reduces on gloo, give what torch's own collectives give. Prints one line per case; exits non-zero on the first
difference."""

import deepspeed.comm as ds_comm
import torch
import torch.distributed as torch_dist

from yolods import dist, gloo_collectives
from yolods.gloo_collectives import use_broadcast_all_gathers_on_gloo, use_reduces_for_reduce_scatters_on_gloo


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
    check_reduce_scatters(both_ranks)
    torch_dist.destroy_process_group()


def reduced_slice(whole: torch.Tensor) -> torch.Tensor:
    """torch's reduce_scatter_tensor of `whole` into a separate output (gloo's own, untouched by the route)."""
    out = torch.empty(whole.numel() // torch_dist.get_world_size(), dtype=whole.dtype)
    torch_dist.reduce_scatter_tensor(out, whole.clone())
    return out


def counting_reduces() -> list[int]:
    """Count torch.distributed.reduce calls from here on (the route's own collective): [count]."""
    count = [0]
    reduce = torch_dist.reduce

    def counted(*args, **kwargs):
        count[0] += 1
        return reduce(*args, **kwargs)

    torch_dist.reduce = counted
    return count


def check_reduce_scatters(both_ranks) -> None:
    assert use_reduces_for_reduce_scatters_on_gloo(), "the reduce-scatter route was not installed on gloo"
    assert use_reduces_for_reduce_scatters_on_gloo(), "installing twice must be harmless"
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    reduces = counting_reduces()
    for dtype in (torch.float32, torch.bfloat16):
        # as ZeRO-3's reduce_scatter_coalesced: DeepSpeed's enum op, the output the rank's own slice of the input
        whole = torch.linspace(-1, 1, 7 * world).add(rank).to(dtype)
        expected_slice = reduced_slice(whole)
        own = whole.view(world, 7)[rank]
        before = reduces[0]
        assert ds_comm.reduce_scatter_fn(own, whole) is None  # synchronous, like torch's
        assert torch.equal(own, expected_slice), (dtype, own, expected_slice)
        assert reduces[0] - before == world, "the route was not taken"
        dist.print_main(f"reduce-scatter in place {dtype}: ok")

    # above REDUCES_MAX_RANKS (set to 1 here, as if this group were larger) gloo's reduce-scatter serves
    gloo_collectives.REDUCES_MAX_RANKS, before = 1, reduces[0]
    whole = torch.arange(5 * world, dtype=torch.float32).add(rank)
    expected_slice = reduced_slice(whole)
    own = whole.view(world, 5)[rank]
    ds_comm.reduce_scatter_fn(own, whole)
    assert torch.equal(own, expected_slice) and reduces[0] == before, (own, reduces)
    gloo_collectives.REDUCES_MAX_RANKS = world
    dist.print_main("reduce-scatter above the group size: ok")

    whole = torch.arange(4 * world, dtype=torch.float32).mul(rank + 1)
    expected_slice = reduced_slice(whole)
    own = whole.view(world, 4)[rank]
    ds_comm.reduce_scatter_tensor(own, whole, group=both_ranks, async_op=True).wait()
    assert torch.equal(own, expected_slice), own
    dist.print_main("reduce-scatter subgroup, async: ok")

    # a separate output keeps gloo's own reduce-scatter, and the input as it was
    whole = torch.arange(3 * world, dtype=torch.float32).add(rank)
    kept = whole.clone()
    out = torch.empty(3)
    ds_comm.reduce_scatter_fn(out, whole)
    assert torch.equal(out, reduced_slice(kept)) and torch.equal(whole, kept), (out, whole)
    dist.print_main("reduce-scatter separate output: ok")


if __name__ == "__main__":
    main()
