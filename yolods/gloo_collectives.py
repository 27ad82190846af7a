"""DeepSpeed's all-gathers and ZeRO-3's reduce-scatters on gloo, done as one broadcast or one reduce per rank.

ZeRO 1-2 all-gather the updated parameters after every optimizer step, and ZeRO-3 gathers each layer's parameters
before using them; both go through `deepspeed.comm.all_gather_into_tensor`. On gloo (DeepSpeed's backend without a
GPU) torch's all_gather_into_tensor is much slower than the broadcasts that move the same bytes: 2 ranks on this
2-core machine, fp32, median of 20 (`benchmarks/gloo_allgather.py`, two runs, 2026-11-30): 45 MB (yolov8s)
33.6 / 32.2 ms against 12.6 / 11.7 ms for a copy of the rank's own slice plus one broadcast from each owner,
12 MB (yolov8n) 4.6 / 5.9 ms against 3.3 / 2.7 ms. NCCL's all-gather is the fast path on GPUs, so only gloo groups
are rerouted.

The broadcasts also keep a rank that runs more than one thread at full speed. After a single torch gloo all-gather
above ATen's 32,768-element grain size, every later op of a 2-thread process ran about 1.5x slower (SiLU on 410k
floats 0.047 -> 0.076 ms, a 256x256 matmul 0.16 -> 0.24 ms), as if the gloo thread's copy had started a second
OpenMP team and libgomp, with more threads than cores, stopped spin-waiting; all-reduces and broadcasts do not.

ZeRO-3 reduce-scatters each gradient bucket (`reduce_scatter_coalesced`), and gloo's reduce_scatter_tensor is slower
than one `reduce` of each slice to its owner: 2 ranks, 1 thread each, fp32, median of 20
(`benchmarks/gloo_allgather.py`, two runs at 53d1294): a 2 M-element bucket 7.5 / 6.7 ms against 4.2 / 4.7 ms,
1 M 4.1 / 3.2 ms against 2.3 / 1.9 ms (yolov8n's 3.0 M parameters make one of each at ZeRO-3's 2e6 buckets). A gloo
reduce uses the input on the other ranks as scratch, so this route is taken only where the caller treats the input
the same way: its output is the rank's own slice of the input (ZeRO-3's coalesced buffer). And only in a group of 2:
one reduce per rank falls behind as ranks are added (same script at eb8edb2, 4 and 8 ranks on these 2 cores,
oversubscribed: a 2 M bucket 14.2 against 15.0 ms at 4 ranks, 34.6 against 65.9 ms at 8).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as torch_dist

# the largest group whose reduce-scatters go as reduces: the route won at 2 ranks, tied at 4 and lost at 8 (above)
REDUCES_MAX_RANKS = 2


class _AllOf:
    """One work handle for several: DeepSpeed waits on what an async all-gather returns."""

    def __init__(self, works: list) -> None:
        self._works = works

    def wait(self, timeout=None) -> bool:
        for work in self._works:
            work.wait()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self._works)


def all_gather_by_broadcasts(output_tensor: torch.Tensor, input_tensor: torch.Tensor, *, group=None, async_op=False):
    """`all_gather_into_tensor` as: copy this rank's input into its slice of the output, then each rank broadcasts
    its slice. Contiguous tensors only (the caller checks)."""
    rank = torch_dist.get_rank(group)
    slice_numel = input_tensor.numel()
    flat_output = output_tensor.view(-1)
    own_slice = flat_output.narrow(0, rank * slice_numel, slice_numel)
    if own_slice.data_ptr() != input_tensor.data_ptr():  # ZeRO 1-2 hand in the output's own slice
        own_slice.copy_(input_tensor.view(-1))
    return _one_per_owner(
        lambda piece, owner: torch_dist.broadcast(piece, src=owner, group=group, async_op=True),
        flat_output,
        slice_numel=slice_numel,
        group=group,
        async_op=async_op,
    )


def _one_per_owner(collective, flat: torch.Tensor, *, slice_numel: int, group, async_op: bool):
    """`collective(slice, owner)` on each rank's slice of `flat` (owner as a global rank), all started at once;
    their one handle when `async_op`, else None once all are done."""
    handle = _AllOf(
        [
            collective(
                flat.narrow(0, owner * slice_numel, slice_numel),
                owner if group is None else torch_dist.get_global_rank(group, owner),
            )
            for owner in range(torch_dist.get_world_size(group))
        ]
    )
    if async_op:
        return handle
    handle.wait()
    return None


def _broadcastable(output_tensor: torch.Tensor, input_tensor: torch.Tensor, group) -> bool:
    return (
        output_tensor.device.type == "cpu"
        and output_tensor.is_contiguous()
        and input_tensor.is_contiguous()
        and output_tensor.dtype == input_tensor.dtype
        and output_tensor.numel() == input_tensor.numel() * torch_dist.get_world_size(group)
    )


def all_gather_into_tensor(
    output_tensor: torch.Tensor,
    input_tensor: torch.Tensor,
    *,
    group=None,
    async_op: bool = False,
    otherwise=torch_dist.all_gather_into_tensor,
):
    """The all-gather yolods' DeepSpeed runs: `all_gather_by_broadcasts` on gloo where it applies, else `otherwise`
    (DeepSpeed's own call once routed; the bench's link probe times this very choice)."""
    if torch_dist.get_backend(group) == "gloo" and _broadcastable(output_tensor, input_tensor, group):
        return all_gather_by_broadcasts(output_tensor, input_tensor, group=group, async_op=async_op)
    return otherwise(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)


def use_broadcast_all_gathers_on_gloo() -> bool:
    """Route DeepSpeed's all_gather_into_tensor through `all_gather_into_tensor` above when its backend is gloo.

    Call after the process group exists. Returns whether the route is in place (it stays for the process).
    """
    return _route_deepspeed_call_on_gloo(
        "all_gather_into_tensor",
        lambda backend, deepspeeds_own: functools.partial(all_gather_into_tensor, otherwise=deepspeeds_own),
    )


def _route_deepspeed_call_on_gloo(name: str, make_route) -> bool:
    """Replace DeepSpeed's comm backend method `name` by `make_route(backend, its own method)`, once, when the
    backend is gloo; whether the route is in place."""
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    if backend is None or torch_dist.get_backend() != "gloo":
        return False
    routed_marker = f"_yolods_routed_{name}"
    if not getattr(backend, routed_marker, False):
        setattr(backend, name, make_route(backend, getattr(backend, name)))
        setattr(backend, routed_marker, True)
    return True


def reduce_scatter_by_reduces(
    output_tensor: torch.Tensor, input_tensor: torch.Tensor, *, op, group=None, async_op=False
):
    """`reduce_scatter_tensor` as one reduce of each slice to its owner, for an output that is this rank's own slice
    of the input (the caller checks). The input's other slices are left as scratch."""
    return _one_per_owner(
        lambda piece, owner: torch_dist.reduce(piece, dst=owner, op=op, group=group, async_op=True),
        input_tensor.view(-1),
        slice_numel=output_tensor.numel(),
        group=group,
        async_op=async_op,
    )


def _own_slice_of_input(output_tensor: torch.Tensor, input_tensor: torch.Tensor, group) -> bool:
    num_ranks, rank = torch_dist.get_world_size(group), torch_dist.get_rank(group)
    return (
        input_tensor.device.type == "cpu"
        and input_tensor.is_contiguous()
        and output_tensor.is_contiguous()
        and output_tensor.dtype == input_tensor.dtype
        and input_tensor.numel() == output_tensor.numel() * num_ranks
        and output_tensor.data_ptr()
        == input_tensor.data_ptr() + rank * output_tensor.numel() * output_tensor.element_size()
    )


def reduce_scatter_tensor(
    output_tensor: torch.Tensor,
    input_tensor: torch.Tensor,
    op=torch_dist.ReduceOp.SUM,
    *,
    group=None,
    async_op: bool = False,
    otherwise=torch_dist.reduce_scatter_tensor,
):
    """The reduce-scatter yolods' DeepSpeed runs: `reduce_scatter_by_reduces` on a gloo group of up to
    REDUCES_MAX_RANKS ranks where it applies, else `otherwise` (DeepSpeed's own call once routed; the bench's link
    probe times this very choice)."""
    if (
        torch_dist.get_backend(group) == "gloo"
        and torch_dist.get_world_size(group) <= REDUCES_MAX_RANKS
        and _own_slice_of_input(output_tensor, input_tensor, group)
    ):
        return reduce_scatter_by_reduces(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
    return otherwise(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def use_reduces_for_reduce_scatters_on_gloo() -> bool:
    """Route DeepSpeed's reduce_scatter_tensor through `reduce_scatter_tensor` above when its backend is gloo.

    Call after the process group exists. Returns whether the route is in place (it stays for the process).
    """

    def make_route(backend, deepspeeds_own):
        def routed(output_tensor, input_tensor, op=torch_dist.ReduceOp.SUM, group=None, async_op=False):
            torch_op = backend._reduce_op(op)  # DeepSpeed passes its own ReduceOp enum
            return reduce_scatter_tensor(
                output_tensor, input_tensor, torch_op, group=group, async_op=async_op, otherwise=deepspeeds_own
            )

        return routed

    return _route_deepspeed_call_on_gloo("reduce_scatter_tensor", make_route)
