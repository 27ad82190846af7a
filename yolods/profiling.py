"""On-demand profiling of training steps: torch.profiler traces, DeepSpeed's flops profiler, its comms logger.

`--profile WAIT,WARMUP,ACTIVE` skips WAIT steps, warms up WARMUP and records ACTIVE steps of the first epoch;
each rank writes `profile/rank{N}.*.pt.trace.json` in the run dir (TensorBoard's profiler view and Perfetto
open it). The first recorded step also goes through DeepSpeed's flops profiler (rank 0 prints the summary and
writes flops_profile.txt). `--comms_logger` adds a per-collective summary at the end (calls, bytes, time, from
DeepSpeed's comms logger); it synchronises every collective, so it is off unless asked.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from yolods import dist
from yolods.config import ProfileSpec


class StepProfiler:
    """Wraps training steps; does nothing unless `spec` is given.

    Examples:
        >>> profiler = StepProfiler(ProfileSpec(wait=1, warmup=1, active=2), run_dir=run_dir, engine=engine)
        >>> for batch in loader:
        ...     with profiler.step():
        ...         train_step(batch)
        >>> profiler.close()
    """

    def __init__(self, spec: ProfileSpec | None, *, run_dir: Path, engine, comms_logger: bool = False):
        self.enabled = spec is not None
        self.spec = spec
        self.run_dir = run_dir
        self.engine = engine
        self.comms_logger = comms_logger
        self.steps_seen = 0
        self.torch_profiler = None
        if not self.enabled:
            return
        wait, warmup, active = spec.wait, spec.warmup, spec.active
        self.flops_step = wait + warmup  # the first recorded step
        self.last_step = wait + warmup + active
        trace_dir = run_dir / "profile"
        activities = [torch.profiler.ProfilerActivity.CPU]
        # the run's device, not the host's: a --device cpu run on a GPU host has no kernels to trace
        if torch.device(engine.device).type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.torch_profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                str(trace_dir), worker_name=f"rank{dist.get_rank()}"
            ),
            record_shapes=True,
            with_stack=False,  # stacks make traces ~10x larger; shapes are what tell kernels apart
        )
        self.torch_profiler.start()

    @contextlib.contextmanager
    def step(self):
        """Profile one training step (forward, backward, optimizer step)."""
        if not self.enabled or self.steps_seen >= self.last_step:
            yield
            return
        flops_profiler = self._start_flops_profiler() if self.steps_seen == self.flops_step else None
        with torch.profiler.record_function(f"train_step_{self.steps_seen}"):
            yield
        if flops_profiler is not None:
            self._finish_flops_profiler(flops_profiler)
        self.torch_profiler.step()
        self.steps_seen += 1
        if self.steps_seen == self.last_step:
            self.torch_profiler.stop()  # writes the traces

    def _start_flops_profiler(self):
        from deepspeed.profiling.flops_profiler import FlopsProfiler

        profiler = FlopsProfiler(self.engine.module, ds_engine=self.engine)
        profiler.start_profile()
        return profiler

    def _finish_flops_profiler(self, profiler) -> None:
        profiler.stop_profile()
        if dist.is_main_process():
            output = self.run_dir / "flops_profile.txt"
            profiler.print_model_profile(
                profile_step=self.flops_step, module_depth=2, top_modules=3, output_file=str(output)
            )
            print(_flops_summary(output.read_text()) if output.exists() else "", flush=True)
        profiler.end_profile()

    def close(self) -> None:
        if self.enabled and self.steps_seen < self.last_step:
            self.torch_profiler.stop()  # fewer steps ran than asked for: write what was recorded
            dist.print_main(self._short_window_note())
        if self.comms_logger:
            import deepspeed.comm

            dist.print_main(comms_summary(deepspeed.comm.comms_logger.get_raw_data()))

    def _short_window_note(self) -> str:
        spec, recorded = self.spec, max(self.steps_seen - self.flops_step, 0)
        flag = f"--profile {spec.wait},{spec.warmup},{spec.active}"
        if recorded == 0:
            return (
                f"yolods: WARNING: {flag} recorded no step: this run trained {self.steps_seen} steps (micro-batches), "
                f"and recording starts after WAIT + WARMUP = {self.flops_step}; lower them"
            )
        return f"yolods: WARNING: {flag} recorded {recorded} of {spec.active} steps: the run ended first"


def trace_files(run_dir: Path) -> list[Path]:
    """The torch.profiler traces a run wrote, one or more per rank."""
    return sorted((run_dir / "profile").glob("*.pt.trace.json"))


def _flops_summary(profile: str) -> str:
    """The head of DeepSpeed's flops profile: its notations and the summary (params, MACs, flops, latencies, FLOPS),
    without the per-module tables that follow."""
    lines = profile.splitlines()
    end = next((i for i, line in enumerate(lines) if "Aggregated Profile" in line), len(lines))
    return "\n".join(lines[:end]).rstrip()


def comm_totals(raw: dict) -> dict[str, tuple[int, int, float]]:
    """(calls, bytes, seconds) of each collective from DeepSpeed's comms logger (`comms_logger.get_raw_data()`).

    DeepSpeed 0.19.8 logs each call with its op's running timer total (`timed_op`: `elapsed(reset=False)`), not
    the call's own time, so its own summary (`log_summary`) shows latencies and bandwidths that grow with every
    call. The largest record of an op is that op's total; calls and message sizes are logged right.
    """
    totals = {}
    for op_name, by_size in raw.items():
        calls = sum(record[0] for record in by_size.values())
        total_bytes = sum(size * record[0] for size, record in by_size.items())
        total_ms = max(max(record[1]) for record in by_size.values())
        totals[op_name] = (calls, total_bytes, total_ms / 1000)
    return totals


def comms_summary(raw: dict) -> str:
    """A table of each collective's calls, bytes and time on this rank (rank 0's, printed at the end)."""
    rows = [f"{'collective':<28} {'calls':>8} {'MB':>10} {'total s':>9} {'ms/call':>9} {'MB/s':>9}"]
    for op_name, (calls, total_bytes, seconds) in sorted(comm_totals(raw).items()):
        rate = total_bytes / 1e6 / seconds if seconds > 0 else float("nan")
        rows.append(
            f"{op_name:<28} {calls:>8} {total_bytes / 1e6:>10.2f} {seconds:>9.3f} "
            f"{seconds * 1e3 / max(calls, 1):>9.3f} {rate:>9.1f}"
        )
    if len(rows) == 1:
        rows.append("(no collective was logged)")
    return "yolods: collectives on rank 0 (DeepSpeed comms logger; each call synchronised):\n" + "\n".join(rows)
