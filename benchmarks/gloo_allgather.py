"""gloo at N ranks: torch's all_gather_into_tensor against the broadcasts yolods routes DeepSpeed's all-gathers
through, at yolov8n's and yolov8s's parameter bytes, and torch's reduce_scatter_tensor against the reduces it routes
ZeRO-3's gradient reduce-scatters through, at the sizes of ZeRO-3's 2e6-element buckets over yolov8n
(yolods/gloo_collectives.py).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/gloo_allgather.py
"""

import os
import sys
import time

import torch
import torch.distributed as torch_dist

from yolods.gloo_collectives import all_gather_by_broadcasts, reduce_scatter_by_reduces


def median_ms(run, *, repeats: int = 20) -> float:
    run()
    times = []
    for _ in range(repeats):
        torch_dist.barrier()
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo")
    num_ranks = torch_dist.get_world_size()
    for model, num_params in (("yolov8n", 3_011_433), ("yolov8s", 11_136_374)):
        whole = torch.empty(num_params // num_ranks * num_ranks)
        shard = torch.randn(whole.numel() // num_ranks)
        gloo_ms = median_ms(lambda whole=whole, shard=shard: torch_dist.all_gather_into_tensor(whole, shard))
        broadcasts_ms = median_ms(lambda whole=whole, shard=shard: all_gather_by_broadcasts(whole, shard))
        if torch_dist.get_rank() == 0:
            print(
                f"{model}: {whole.numel() * 4 / 1e6:.0f} MB fp32 over {num_ranks} ranks: all_gather_into_tensor "
                f"{gloo_ms:.1f} ms, broadcasts {broadcasts_ms:.1f} ms (median of 20)"
            )
    for bucket_numel in (2_000_000, 1_000_000):
        whole = torch.randn(bucket_numel // num_ranks * num_ranks)
        own_slice = whole.view(num_ranks, -1)[torch_dist.get_rank()]  # as ZeRO-3 hands it in
        gloo_ms = median_ms(lambda whole=whole, out=own_slice: torch_dist.reduce_scatter_tensor(out, whole))
        reduces_ms = median_ms(
            lambda whole=whole, out=own_slice: reduce_scatter_by_reduces(out, whole, op=torch_dist.ReduceOp.SUM)
        )
        if torch_dist.get_rank() == 0:
            print(
                f"bucket of {bucket_numel / 1e6:g} M fp32 over {num_ranks} ranks: reduce_scatter_tensor "
                f"{gloo_ms:.1f} ms, reduces {reduces_ms:.1f} ms (median of 20)"
            )
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" not in os.environ:  # --help, or run without a launcher
        sys.exit(__doc__)
    main()
