"""Process environment that must be in place before Ultralytics, DeepSpeed or torch read it."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path


def _translate_slurm_env() -> None:
    """Map the variables `srun` sets onto the ones torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK).

    The deepspeed launcher and torchrun set RANK themselves; under srun only SLURM_* exist. MASTER_ADDR must
    name the first node (the sbatch example in benchmarks/README.md exports it); we fall back to the node that
    launched the step.
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", "29500")


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_flag(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (Linux), or None if it is gone or unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name in (...) may hold spaces


# This process's parent and grandparent as they were at import, before a slow start gives the launcher time to
# die: under the deepspeed launcher they are launch.py and the `deepspeed` runner (see yolods.faults).
LAUNCH_PARENT_PID = os.getppid()
LAUNCH_GRANDPARENT_PID = parent_of(LAUNCH_PARENT_PID)
# The thread count the user asked for, read before `import ultralytics` sets OMP_NUM_THREADS=1 (after torch has
# already sized its thread pool, so the variable no longer says what torch uses): see dist.threads_per_rank.
USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")
LAUNCHED_BY_LAUNCHER = "RANK" in os.environ or "SLURM_PROCID" in os.environ  # torchrun, deepspeed, srun


def _parent_is_deepspeed_launch() -> bool:
    try:
        return b"deepspeed.launcher.launch" in Path(f"/proc/{LAUNCH_PARENT_PID}/cmdline").read_bytes()
    except OSError:
        return False


LAUNCHED_BY_DEEPSPEED = _parent_is_deepspeed_launch()


def prepare_process_env(argv: list[str] | None = None) -> None:
    """Set the variables that Ultralytics, DeepSpeed and torch read once, at import."""
    argv = sys.argv if argv is None else argv
    # Ultralytics must never reach the network: no analytics, no font/weight/dataset downloads, no pip checks.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "True")
    _translate_slurm_env()
    # DeepSpeed picks its accelerator at import; `--device cpu` on a GPU host must select the CPU one. Naming it
    # where there is no GPU also spares every rank DeepSpeed's "unable to detect" warning.
    if _device_flag(argv) == "cpu" or not _cuda_present():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # torch warns "No CUDA runtime is found, using CUDA_HOME" whenever DeepSpeed loads its JIT-built CPU comm op;
    # nothing CUDA is built, so the warning only alarms.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # torch 2.14 warns on every step about the collectives DeepSpeed's ZeRO calls; they say nothing actionable.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed.*")
