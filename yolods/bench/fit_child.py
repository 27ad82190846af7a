"""One probe point of `--fit` in a fresh job: a few timed steps of one configuration, then each rank's peak memory.

    torchrun --nproc_per_node N -m yolods.bench.fit_child SPEC_JSON   # what yolods.bench.fit launches per point

A fresh process per point is what makes the peak honest on CPU: resident memory only grows back slowly after a
larger configuration (glibc keeps freed pages, torch keeps its caches), so in a long-lived process the peak of a
small configuration would carry the previous one's. Each rank records its resident set size once the process
group is up and before the model is built (`baseline_bytes`: interpreter, torch, DeepSpeed, Ultralytics), then
the bench's PeakMemory over the steps (CPU: VmHWM; CUDA: max_memory_allocated).

On CPU a watchdog thread ends the rank as soon as its resident memory passes the budget, so a point that does
not fit never takes more than the budget (plus one polling interval) from a shared machine; torchrun then ends
the other ranks. Each rank writes `rank{R}.json` into the spec's directory: its verdict and numbers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from yolods import heap

# A rank that passed the memory budget exits with this code after writing its verdict.
OVER_BUDGET_EXIT = 75
OUT_OF_MEMORY_EXIT = 76
WATCH_INTERVAL_S = 0.02


@dataclass(frozen=True)
class ChildSpec:
    """What one probe job runs; it crosses to the child as JSON."""

    config: dict[str, Any]  # a BenchConfig's fields
    out_dir: str  # where each rank writes rank{R}.json
    budget_bytes: int | None  # per rank; None on CUDA: the device's memory


def child_command(spec: ChildSpec, *, nproc: int) -> list[str]:
    """The command line of a probe job at `nproc` ranks on a free port (run it with ultralytics_child.child_env())."""
    module = ["-m", "yolods.bench.fit_child", json.dumps(asdict(spec))]
    if nproc == 1:
        return [sys.executable, *module]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    return [*launcher, *module]


def resident_bytes() -> int:
    """This process's resident set size now (VmRSS)."""
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


class MemoryWatchdog:
    """Ends this process (exit OVER_BUDGET_EXIT) when its resident memory passes `budget_bytes`, writing a verdict."""

    def __init__(self, budget_bytes: int, *, write_verdict):
        self.budget_bytes = budget_bytes
        self.write_verdict = write_verdict
        self.thread = threading.Thread(target=self._watch, daemon=True, name="yolods-fit-watchdog")

    def start(self) -> MemoryWatchdog:
        self.thread.start()
        return self

    def _watch(self) -> None:
        while True:
            resident = resident_bytes()
            if resident > self.budget_bytes:
                self.write_verdict({"status": "over_budget", "peak_mem_bytes": resident})
                os._exit(OVER_BUDGET_EXIT)  # no unwinding: the point is to free the memory now
            time.sleep(WATCH_INTERVAL_S)


def run(spec: ChildSpec) -> int:
    """Measure the configuration on this rank; every rank writes its verdict. Returns the exit code."""
    import torch

    from yolods import dist
    from yolods.bench.measure import all_gather_object
    from yolods.bench.runner import measure_training
    from yolods.bench.sweep import BenchConfig

    cfg = BenchConfig(**spec.config)
    rank = dist.get_rank()
    verdict_path = Path(spec.out_dir) / f"rank{rank}.json"

    def write_verdict(verdict: dict[str, Any]) -> None:
        # Whole or absent, never half-written: when one rank's watchdog ends the job, torchrun kills the others,
        # perhaps mid-write (the parent then read an empty rank1.json and failed with a JSONDecodeError)
        partial = verdict_path.with_suffix(".partial")
        partial.write_text(json.dumps({"rank": rank, **verdict}))
        os.replace(partial, verdict_path)

    dist.init_distributed(cfg.device, verbose=False)
    device = dist.local_device(cfg.device)
    if device.type == "cuda":
        budget = spec.budget_bytes or torch.cuda.mem_get_info(device)[1]
        baseline = 0  # what max_memory_allocated counts starts at the model
    else:
        budget = spec.budget_bytes
        baseline = resident_bytes()
        if budget is not None:
            MemoryWatchdog(budget, write_verdict=write_verdict).start()
    try:
        measured = measure_training(cfg, device=device, data_yaml=None, links=None)
    except torch.OutOfMemoryError as error:
        write_verdict({"status": "out_of_memory", "message": str(error).splitlines()[0]})
        return OUT_OF_MEMORY_EXIT
    baselines = all_gather_object(baseline)
    if measured is not None:  # rank 0: every rank's peak
        peaks = measured["peak_mem_bytes_per_rank"]
        write_verdict(
            {
                "status": "ok" if max(peaks) <= budget else "over_budget",
                "budget_bytes": budget,
                "peak_mem_bytes": max(peaks),
                "peak_mem_bytes_per_rank": peaks,
                "baseline_bytes_per_rank": baselines,
                "peak_mem_source": measured["peak_mem_source"],
                "imgs_per_s": measured["imgs_per_s"],
                "step_time_s": measured["step_time_s"]["median"],
                "model_state_bytes": measured["model_state_bytes"]["total"],
            }
        )
    dist.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    (spec_json,) = argv if argv is not None else sys.argv[1:]
    return run(ChildSpec(**json.loads(spec_json)))


if __name__ == "__main__":
    # the verdict is on disk and the process group is down: without the interpreter's teardown, where about one
    # 2-rank CPU probe in ten aborted and turned a measured point into a failed one
    heap.finish_process(main())
