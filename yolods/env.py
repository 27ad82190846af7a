"""Process environment that must be in place before Ultralytics, DeepSpeed or torch read it."""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path


def _translate_slurm_env() -> None:
    """Map the variables `srun` sets onto the ones torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK).

    The deepspeed launcher and torchrun set RANK themselves; under srun only SLURM_* exist. Only an srun step
    counts: SLURM_PROCID and SLURM_NTASKS are also set in an sbatch script itself, where a plain `python -m
    yolods.train` would otherwise wait 30 minutes for peers that never start. The step's own task counts are
    used, not the job's (`srun -n 2` in a job of 8 tasks starts 2). MASTER_ADDR must name the first node (the
    sbatch example in benchmarks/README.md exports it); we fall back to the node that launched the step.
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_STEP_NUM_TASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(_slurm_tasks_on_this_node()))
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", str(slurm_default_port()))


def slurm_default_port() -> int:
    """MASTER_PORT for an srun step that sets none: one per job step, so two jobs sharing a node do not meet on
    torch's 29500 (the second one's rank 0 failed with EADDRINUSE while its other ranks joined the first job's
    store). 15000-24999: below Linux's ephemeral ports (32768+), which outgoing connections take."""
    job, step = os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_STEP_ID", "0")
    return 15000 + (int(job) * 7 + int(step)) % 10000 if job.isdigit() and step.isdigit() else 29500


def _slurm_tasks_on_this_node() -> int:
    """This node's tasks of the srun step, from SLURM_STEP_TASKS_PER_NODE ("4(x2),3": 4 on each of the first two
    nodes, 3 on the third), which srun always sets; SLURM_NTASKS_PER_NODE exists only with --ntasks-per-node."""
    counts: list[int] = []
    for group in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split(","):
        count, _, repeats = group.partition("(x")
        counts += [int(count)] * int(repeats.rstrip(")") or 1)
    node = int(os.environ.get("SLURM_STEP_NODEID", os.environ.get("SLURM_NODEID", "0")))
    return counts[min(node, len(counts) - 1)]


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


def _omp_num_threads_set_by_the_user() -> str | None:
    """OMP_NUM_THREADS, unless torchrun put it there: for more than one rank per node it sets 1 where the user set
    nothing (with a warning to tune it), which would leave each rank one thread whatever the cores. Its own
    environment at start, the one the user launched it with, tells the two apart."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value != "1" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return value
    try:
        launched_with = Path(f"/proc/{os.getppid()}/environ").read_bytes().split(b"\0")
    except OSError:
        return value  # cannot tell: take it as the user's
    return value if any(entry.startswith(b"OMP_NUM_THREADS=") for entry in launched_with) else None


# The thread count the user asked for, read before `import ultralytics` sets OMP_NUM_THREADS=1 (after torch has
# already sized its thread pool, so the variable no longer says what torch uses): see dist.threads_per_rank.
USER_OMP_NUM_THREADS = _omp_num_threads_set_by_the_user()
LAUNCHED_BY_LAUNCHER = "RANK" in os.environ or "SLURM_STEP_NUM_TASKS" in os.environ  # torchrun, deepspeed, srun


def _start_ticks(pid: int) -> str:
    """When process `pid` started (clock ticks since boot), telling it apart from a later process given its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


@dataclass(frozen=True)
class LauncherJob:
    """What identifies a job across the attempts its launcher or scheduler makes at it.

    `key` is the same in every attempt of one job and differs between jobs; `may_be_restart` says whether this
    attempt may follow an earlier one, whose run directory it should then continue.
    """

    key: str
    may_be_restart: bool


def launcher_job() -> LauncherJob | None:
    """This process's job, if its launcher can start it again; None for a plain run.

    In order: YOLODS_JOB_ID (set it around an outer retry loop); torchrun's rendezvous id (`--rdzv-id`, the same
    on every node); SLURM's job and step (kept by `--requeue`; looked up only on a requeued or restarted attempt,
    so two runs in one allocation stay apart); torchrun's agent, for a one-node torchrun without `--rdzv-id`:
    the agent outlives the worker groups it restarts and is this process's parent.
    """
    torchrun_restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if os.environ.get("YOLODS_JOB_ID"):
        return LauncherJob(f"YOLODS_JOB_ID={os.environ['YOLODS_JOB_ID']}", may_be_restart=True)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return LauncherJob(f"torchrun --rdzv-id {run_id}", may_be_restart=True)
    if "SLURM_JOB_ID" in os.environ:
        requeued = int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0
        step = os.environ.get("SLURM_STEP_ID", "batch")
        return LauncherJob(
            f"SLURM job {os.environ['SLURM_JOB_ID']} step {step}", may_be_restart=requeued or torchrun_restarts > 0
        )
    if run_id and os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
        agent = f"{socket.gethostname()}:{LAUNCH_PARENT_PID}:{_start_ticks(LAUNCH_PARENT_PID)}"
        return LauncherJob(f"torchrun agent {agent}", may_be_restart=True)
    return None  # a plain run, the deepspeed launcher, or a multi-node torchrun without --rdzv-id


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
    # and never pip-installs what an optional feature lacks (faster-coco-eval for --save_json, pi_heif for a file
    # it cannot decode): offline it would only print "attempting AutoUpdate..."; this way it names the package
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
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
