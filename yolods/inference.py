"""What `yolods.val` and `yolods.predict` share: the job around them, their common flags, and the sharding rule.

The job: parse and check everything on every rank -> join the process group (a torch.distributed group is
enough: inference needs no DeepSpeed engine) -> run -> leave. A user mistake prints one line and exits 2; an
error on any rank ends the whole job in seconds (yolods.faults); a stop signal (SIGTERM, SIGUSR1, Ctrl-C, the
launcher gone) is honoured at the next batch boundary with exit 143 or 130.

The sharding rule: the work is a list of batches in a fixed order (yolods.val: Ultralytics' rect-sorted val
batches; yolods.predict: the source's images in sorted order, then each video's frames, `--batch` at a time).
Rank r takes a contiguous run of whole batches, the first `num_batches % world_size` ranks one batch more:
every batch is done exactly once, by one rank, and holds the same images it would hold on one process (the
rule of Ultralytics' ContiguousDistributedSampler).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

import torch

from yolods import dist, heap
from yolods.config import check_imgsz
from yolods.errors import ConfigError
from yolods.preemption import StopRequest, exit_code_for, kill_worker_processes

T = TypeVar("T")


class JobStopped(Exception):  # a request to leave, not an error
    """Raised at a batch boundary after a stop signal; `exit_code` is the process's (143 or 130)."""

    def __init__(self, exit_code: int):
        super().__init__(f"stopped (exit {exit_code})")
        self.exit_code = exit_code


@dataclass
class Job:
    """What a running inference job shares with its entry point: its stop request, and where tracebacks go."""

    stop_request: StopRequest
    run_dir: Path | None = None

    def check_stop(self) -> None:
        """Raise JobStopped if this rank was asked to stop; call it between batches."""
        if self.stop_request.received is not None:
            raise JobStopped(exit_code_for(self.stop_request.received))


class InferencePlan(Protocol):
    device: str  # 'cpu' or 'cuda'


P = TypeVar("P", bound=InferencePlan)


def run_job(argv: list[str] | None, *, plan: Callable[[list[str] | None], P], run: Callable[[P, Job], int]) -> int:
    """`plan(argv)` on every rank before any process group, then `run(plan, job)` in one; returns the exit code.

    Exit codes: 0 done; 2 a user mistake (one line); 143/130 stopped by a signal at a batch boundary; 1 an error
    on some rank, which ended every rank.
    """
    from yolods import faults

    job = Job(StopRequest().install())  # first: a stop that arrives during start-up is honoured too
    watchdog = None
    try:
        with heap.collector_paused():
            dist.check_launcher_env()
            resolved = plan(argv)
            dist.init_distributed(resolved.device, for_deepspeed=False)
            watchdog = faults.JobWatchdog(job.stop_request).start()
        exit_code = run(resolved, job)
    except ConfigError as error:
        if watchdog is not None:
            watchdog.stop()  # every rank leaves with this error; rank 0 leaving first is no fault
        if job.run_dir is not None:  # refused before writing anything (e.g. a val split with no images)
            with contextlib.suppress(OSError):
                job.run_dir.rmdir()  # only if empty
        dist.print_main(f"yolods: error: {error}", every_rank=error.every_rank)
        return 2
    except JobStopped as stopped:
        if watchdog is not None:  # it leaves without the shutdown barrier: its silence is no fault to the peers
            watchdog.stop()
        print(f"\nyolods: rank {dist.get_rank()}: stopped at a batch boundary", file=sys.stderr, flush=True)
        _leave_now(stopped.exit_code)  # the other ranks may be mid-batch: no shutdown barrier
    except Exception as error:
        faults.abort_job(error, run_dir=job.run_dir)
    watchdog.stop()  # before the shutdown barrier, after which rank 0 may close the store
    dist.shutdown()
    return exit_code


def _leave_now(exit_code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    kill_worker_processes()
    os._exit(exit_code)


def shard(batches: Sequence[T], *, rank: int, world_size: int) -> Sequence[T]:
    """Rank `rank`'s contiguous run of `batches` (see the module docstring); the runs of all ranks partition it.

    Examples:
        >>> [list(shard(range(5), rank=r, world_size=2)) for r in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    base, extra = divmod(len(batches), world_size)
    start = rank * base + min(rank, extra)
    return batches[start : start + base + (1 if rank < extra else 0)]


def ultralytics_device(device_type: str) -> str:
    """The device Ultralytics should put this rank on: 'cpu', or this rank's local GPU index (made current)."""
    if device_type == "cpu":
        return "cpu"
    return str(dist.bind_local_gpu())  # NCCL collectives and Ultralytics' select_device both use the current GPU


def add_common_flags(parser: argparse.ArgumentParser, *, default_project: str) -> None:
    """Flags both commands take, with Ultralytics' names; None means 'Ultralytics' default for this model'."""
    parser.add_argument(
        "--model", required=True, help="trained weights: a local .pt, or a yolods.train run directory (weights/best.pt)"
    )
    parser.add_argument("--imgsz", type=int, help="inference size (default: the size the weights were trained at)")
    parser.add_argument(
        "--batch", type=int, help="images per forward on EACH rank (unlike yolods.train's global --batch)"
    )
    parser.add_argument("--conf", type=float, help="confidence threshold (Ultralytics' default for the mode)")
    parser.add_argument("--iou", type=float, help="NMS IoU threshold (default 0.7)")
    parser.add_argument("--max_det", type=int, help="detections kept per image (default 300)")
    parser.add_argument("--half", action="store_true", help="fp16 inference on CUDA, as Ultralytics' half=True")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    parser.add_argument("--project", default=default_project, help="parent directory of output directories")
    parser.add_argument("--name", default="exp", help="output directory name; exp, exp2, ... unless --exist_ok")
    parser.add_argument("--exist_ok", action="store_true", help="write into --name even if it exists")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's


def common_settings(args: argparse.Namespace) -> dict[str, object]:
    """The Ultralytics settings the common flags give (only those given), checked; raises ConfigError."""
    if args.imgsz is not None:
        check_imgsz(args.imgsz)
    if args.batch is not None and args.batch < 1:
        raise ConfigError(f"--batch {args.batch} must be at least 1 (images per forward on each rank)")
    for flag in ("conf", "iou"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"--{flag} {value} must be between 0 and 1")
    if args.max_det is not None and args.max_det < 1:
        raise ConfigError(f"--max_det {args.max_det} must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device: use --device cpu or check the driver")
    settings = {key: getattr(args, key) for key in ("imgsz", "batch", "conf", "iou", "max_det")}
    if args.half:
        settings["quantize"] = 16  # Ultralytics' name for half=True since 8.4 (fp32 on CPU, as Ultralytics does)
    return {key: value for key, value in settings.items() if value is not None}


def device_type(args: argparse.Namespace) -> str:
    """'cuda' or 'cpu': the flag, else cuda when present."""
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")
