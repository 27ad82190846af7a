"""Threads per rank under each launcher: cores shared among the node's ranks, or what the user set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, torchrun_command, train_env

pytestmark = pytest.mark.multirank

PROBE = str(REPO / "tests" / "threads_probe.py")
CORES = len(os.sched_getaffinity(0))


def threads_per_rank(command: list[str], *, omp_num_threads: str | None) -> dict[int, int]:
    env = train_env()
    env.pop("OMP_NUM_THREADS", None)
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return {int(rank): int(threads) for rank, threads in re.findall(r"rank (\d) threads (\d+)", output)}


def deepspeed_probe() -> list[str]:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", "2", "--master_port", str(free_port()), PROBE]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_each_rank_gets_its_share_of_the_cores(launcher):
    command = deepspeed_probe() if launcher == "deepspeed" else [*torchrun_command(2), PROBE]
    # torchrun sets OMP_NUM_THREADS=1 itself when unset; the deepspeed launcher leaves it unset
    assert threads_per_rank(command, omp_num_threads=None) == {0: max(1, CORES // 2), 1: max(1, CORES // 2)}


def test_a_single_process_uses_every_core_and_a_users_setting_wins():
    assert threads_per_rank([sys.executable, PROBE], omp_num_threads=None) == {0: CORES}
    assert threads_per_rank(deepspeed_probe(), omp_num_threads="3") == {0: 3, 1: 3}


def test_a_rank_that_cannot_see_its_gpu_is_told_how_to_launch(monkeypatch):
    """srun --gpus-per-task=1 shows each task one GPU while LOCAL_RANK counts the node's tasks: the rank must say
    so in one line, not fail in NCCL. (On this CPU machine every rank sees none; the check is the same.)"""
    from yolods import dist
    from yolods.errors import ConfigError

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "11")
    with pytest.raises(ConfigError, match=r"rank 11 has local rank 3 but sees 0 GPU\(s\): .*--gpu-bind=none"):
        dist.bind_local_gpu()
