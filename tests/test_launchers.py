"""Threads per rank under each launcher: cores shared among the node's ranks, or what the user set; and DeepSpeed's
accelerator counting the node's ranks, not its NUMA nodes."""

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


# numactl as a one-NUMA-node machine reports it: DeepSpeed's CPU accelerator runs it when LOCAL_SIZE is unset
ONE_NUMA_NODE = "#!/bin/sh\necho 'available: 1 nodes (0)'\necho 'node 0 cpus: 0 1'\n"


def probe_ranks(command: list[str], *, omp_num_threads: str | None, tmp_path: Path) -> dict[int, tuple[int, int]]:
    """{rank: (torch threads, ranks per node as DeepSpeed's accelerator counts them)} from tests/threads_probe.py."""
    numactl = tmp_path / "bin" / "numactl"
    numactl.parent.mkdir(parents=True)
    numactl.write_text(ONE_NUMA_NODE)
    numactl.chmod(0o755)
    env = train_env()
    env.pop("OMP_NUM_THREADS", None)
    env["PATH"] = f"{numactl.parent}{os.pathsep}{env['PATH']}"
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    found = re.findall(r"rank (\d) threads (\d+) devices (\d+)", output)
    return {int(rank): (int(threads), int(devices)) for rank, threads, devices in found}


def deepspeed_probe() -> list[str]:
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", "2", "--master_port", str(free_port()), PROBE]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_each_rank_gets_its_share_of_the_cores(launcher, tmp_path):
    command = deepspeed_probe() if launcher == "deepspeed" else [*torchrun_command(2), PROBE]
    # torchrun sets OMP_NUM_THREADS=1 itself when unset; the deepspeed launcher leaves it unset. Only the deepspeed
    # launcher sets LOCAL_SIZE; under torchrun DeepSpeed would count the one NUMA node numactl reports
    share = max(1, CORES // 2)
    assert probe_ranks(command, omp_num_threads=None, tmp_path=tmp_path) == {0: (share, 2), 1: (share, 2)}


def test_a_single_process_uses_every_core_and_a_users_setting_wins(tmp_path):
    assert probe_ranks([sys.executable, PROBE], omp_num_threads=None, tmp_path=tmp_path / "one") == {0: (CORES, 1)}
    assert probe_ranks(deepspeed_probe(), omp_num_threads="3", tmp_path=tmp_path / "two") == {0: (3, 2), 1: (3, 2)}


def test_a_rank_that_cannot_see_its_gpu_is_told_how_to_launch(monkeypatch):
    """srun --gpus-per-task=1 shows each task one GPU while LOCAL_RANK counts the node's tasks: the rank must say
    so in one line, not fail in NCCL. (On this CPU machine every rank sees none; the check is the same.)"""
    from yolods import dist
    from yolods.errors import ConfigError

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "11")
    with pytest.raises(ConfigError, match=r"rank 11 has local rank 3 but sees 0 GPU\(s\): .*--gpu-bind=none"):
        dist.bind_local_gpu()
