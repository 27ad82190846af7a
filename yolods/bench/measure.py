"""Timing: burn-in, then timed steps of the step under test split into data wait / forward / backward / optimizer.

The step timed for DeepSpeed is yolods.step.TrainStep, the code `yolods.train` runs, called as the Trainer calls
it; the DDP baseline's DDPStepper is called the same way. Each takes a raw collated batch and reports the end of
each of its phases (yolods.step.PHASES: preprocess, forward, backward, optimizer) through `on_phase`; data wait is
fetching the next raw batch plus the preprocess phase (to the device, / 255). On CUDA every phase ends with a
synchronize, so each phase is charged its own kernels (the syncs cost a little throughput, the same for every
engine). The Ultralytics baseline sees only its batch boundaries, and `step_stats` summarises both the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from yolods import dist
from yolods.bench.comm_model import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, fit_link
from yolods.gloo_collectives import all_gather_into_tensor, reduce_scatter_tensor
from yolods.profiling import comm_totals
from yolods.step import PHASES as STEP_PHASES

PHASES = ("data_wait", "forward", "backward", "optimizer")


class TimedStep(Protocol):
    """A training micro-step as yolods.step.TrainStep is called: a raw collated batch in, phases reported."""

    on_phase: Callable[[str], None] | None  # called with each of yolods.step.PHASES as that phase ends

    def __call__(self, batch: dict[str, Any], *, iteration: int, epoch: int, last_in_epoch: bool) -> Any:
        """Preprocess, forward, backward, optimizer step (and whatever the step does after it)."""


@dataclass(frozen=True)
class StepRecord:
    """One timed step; `phases` maps PHASES to seconds."""

    total_s: float
    phases: dict[str, float]


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None  # CPU kernels have finished when the call returns


def run_steps(
    step: TimedStep,
    batches: Iterator[dict[str, Any]],
    iterations: Iterator[int],
    count: int,
    *,
    after_step: Callable[[], None] | None = None,
) -> None:
    """`count` untimed steps, as the Trainer calls them within epoch 0 (`iterations` counts on across calls)."""
    for _ in range(count):
        step(next(batches), iteration=next(iterations), epoch=0, last_in_epoch=False)
        if after_step is not None:
            after_step()


def time_steps(
    step: TimedStep,
    batches: Iterator[dict[str, Any]],
    iterations: Iterator[int],
    *,
    steps: int,
    warmup_steps: int,
    device: torch.device,
    on_window_start: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> tuple[list[StepRecord], float]:
    """Run `warmup_steps` untimed, then `steps` timed steps; returns their records and the window's wall time.

    Each step is `step(batch, iteration=i, epoch=0, last_in_epoch=False)` with i from `iterations`; its phases
    come from `step.on_phase`, set only for the timed steps. `after_step` runs after every step (outside the
    step's own time, inside the window). The window runs between two barriers, so it ends when the slowest rank
    does: global images/s is global batch x steps / window.
    """
    sync = synchronizer(device)
    run_steps(step, batches, iterations, warmup_steps, after_step=after_step)
    sync()
    dist.barrier()
    if on_window_start is not None:
        on_window_start()
    ended: dict[str, float] = {}

    def phase_done(phase: str) -> None:
        sync()
        ended[phase] = time.perf_counter()

    records = []
    step.on_phase = phase_done
    try:
        window_start = time.perf_counter()
        for _ in range(steps):
            ended.clear()
            started = time.perf_counter()
            batch = next(batches)
            step(batch, iteration=next(iterations), epoch=0, last_in_epoch=False)
            sync()
            finished = time.perf_counter()
            if tuple(ended) != STEP_PHASES:
                raise RuntimeError(f"the step reported phases {tuple(ended)}, expected {STEP_PHASES}")
            records.append(
                StepRecord(
                    total_s=finished - started,
                    phases={
                        "data_wait": ended["preprocess"] - started,
                        "forward": ended["forward"] - ended["preprocess"],
                        "backward": ended["backward"] - ended["forward"],
                        "optimizer": finished - ended["backward"],
                    },
                )
            )
            if after_step is not None:
                after_step()
    finally:
        step.on_phase = None
    dist.barrier()
    return records, time.perf_counter() - window_start


def step_stats(step_times_s: list[float]) -> dict[str, float]:
    """Mean, median, p90, min and max of step times, in seconds."""
    ordered = sorted(step_times_s)
    p90_index = min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))
    return {
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p90": ordered[p90_index],
        "min": ordered[0],
        "max": ordered[-1],
    }


def mean_phases(records: list[StepRecord]) -> dict[str, float]:
    """Mean seconds per phase over the timed steps."""
    return {phase: statistics.fmean(record.phases[phase] for record in records) for phase in PHASES}


def probe_link(
    device: torch.device, *, message_bytes: tuple[int, ...] = (2**12, 2**20, 2**23, 2**25), repeats: int = 5
) -> dict[str, Any] | None:
    """Time each collective ZeRO uses at a few sizes and fit its latency and bandwidth (None on one rank).

    Calibrates the communication model against this job's backend and links (gloo here, NCCL on GPUs). Sizes
    are whole tensors: the all-reduce's, the all-gather's output, the reduce-scatter's input.
    """
    world_size = dist.get_world_size()
    if world_size < 2:
        return None
    import torch.distributed as torch_dist

    sync = synchronizer(device)

    def timed(run: Callable[[], Any]) -> float:
        for _ in range(2):  # first calls set up buffers and connections
            run()
        sync()
        dist.barrier()
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        sync()
        return (time.perf_counter() - started) / repeats

    fits: dict[str, Any] = {}
    for op in (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER):
        seconds = []
        for size in message_bytes:
            whole = torch.zeros(size // 4 // world_size * world_size, dtype=torch.float32, device=device)
            shard = torch.zeros(whole.numel() // world_size, dtype=torch.float32, device=device)
            run = {
                ALL_REDUCE: lambda whole=whole: torch_dist.all_reduce(whole),
                # the routes DeepSpeed's collectives take in yolods (broadcasts and reduces on gloo:
                # yolods.gloo_collectives)
                ALL_GATHER: lambda whole=whole, shard=shard: all_gather_into_tensor(whole, shard),
                # ZeRO-3's route (reduces on gloo): its output is this rank's own slice of the input
                REDUCE_SCATTER: lambda whole=whole: reduce_scatter_tensor(
                    whole.view(world_size, -1)[dist.get_rank()], whole
                ),
            }[op]
            seconds.append(timed(run))
        seconds = dist.broadcast_object(seconds)  # rank 0's view for everyone
        link = fit_link(op=op, num_ranks=world_size, message_bytes=message_bytes, seconds=seconds)
        fits[op] = {
            "message_bytes": list(message_bytes),
            "seconds": seconds,
            "latency_s": link.latency_s,
            "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
        }
    return {
        "backend": torch_dist.get_backend(),
        "ops": fits,
        **{k: fits[ALL_REDUCE][k] for k in ("latency_s", "bandwidth_bytes_per_s")},
    }


def logged_comm_per_step(run_steps: Callable[[int], None], *, steps: int) -> dict[str, dict[str, float]]:
    """Calls, bytes and seconds per step of each collective, from DeepSpeed's comms logger.

    The logger synchronizes after every collective, so these steps are run apart from the timed window. Its op
    timers run on across calls (`yolods.profiling.comm_totals`), so they are reset first.
    """
    import deepspeed.comm as ds_comm
    from deepspeed.comm import comm as ds_comm_module

    ds_comm.configure(enabled=True, prof_all=True, verbose=False, debug=False)
    ds_comm.reset_log()
    for timer in ds_comm_module.timers.timers.values():
        timer.reset()
    try:
        run_steps(steps)
        raw = ds_comm.comms_logger.get_raw_data()
    finally:
        ds_comm.configure(enabled=False)
    return {
        op_name: {"calls": calls / steps, "message_bytes": total_bytes / steps, "seconds": seconds / steps}
        for op_name, (calls, total_bytes, seconds) in comm_totals(raw).items()
    }


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if dist.get_world_size() < 2:
        return [value]
    import torch.distributed as torch_dist

    gathered: list[Any] = [None] * dist.get_world_size()
    torch_dist.all_gather_object(gathered, value)
    return gathered
