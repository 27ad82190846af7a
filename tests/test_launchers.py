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


def probe_ranks(
    command: list[str], *, omp_num_threads: str | None, tmp_path: Path, cores: int | None = None
) -> dict[int, tuple[int, int]]:
    """{rank: (torch threads, ranks per node as DeepSpeed's accelerator counts them)} from tests/threads_probe.py,
    on this machine's cores or, with `cores`, as if it had that many."""
    numactl = tmp_path / "bin" / "numactl"
    numactl.parent.mkdir(parents=True)
    numactl.write_text(ONE_NUMA_NODE)
    numactl.chmod(0o755)
    env = train_env()
    env.pop("OMP_NUM_THREADS", None)
    env["PATH"] = f"{numactl.parent}{os.pathsep}{env['PATH']}"
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    if cores is not None:
        env["PROBE_CORES"] = str(cores)
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
    """As if on 8 cores (on this machine's 2, 1 thread a rank is also what torchrun's own default gives).

    torchrun sets OMP_NUM_THREADS=1 itself when unset, which is not the user's choice; the deepspeed launcher leaves
    it unset. Only the deepspeed launcher sets LOCAL_SIZE; under torchrun DeepSpeed would count the one NUMA node
    numactl reports."""
    command = deepspeed_probe() if launcher == "deepspeed" else [*torchrun_command(2), PROBE]
    assert probe_ranks(command, omp_num_threads=None, tmp_path=tmp_path, cores=8) == {0: (4, 2), 1: (4, 2)}


def test_a_single_process_uses_every_core_and_a_users_setting_wins(tmp_path):
    assert probe_ranks([sys.executable, PROBE], omp_num_threads=None, tmp_path=tmp_path / "one") == {0: (CORES, 1)}
    assert probe_ranks(deepspeed_probe(), omp_num_threads="3", tmp_path=tmp_path / "two") == {0: (3, 2), 1: (3, 2)}
    torchrun = [*torchrun_command(2), PROBE]  # the user's 1, which torchrun would have set too: still the user's
    assert probe_ranks(torchrun, omp_num_threads="1", tmp_path=tmp_path / "three", cores=8) == {0: (1, 2), 1: (1, 2)}


def test_launcher_variables_no_launcher_would_leave_are_refused_on_every_rank(monkeypatch):
    """A stray WORLD_SIZE planned the batch for ranks that never came (an AssertionError in DeepSpeed); RANK alone
    sent DeepSpeed looking for MPI ("No module named mpi4py")."""
    from yolods import dist
    from yolods.errors import ConfigError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    cases = [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
        ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "are not counts"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not a rank of WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "without MASTER_PORT and LOCAL_RANK"),
    ]
    for variables, pattern in cases:
        with monkeypatch.context() as scoped:
            for name, value in variables.items():
                scoped.setenv(name, value)
            with pytest.raises(ConfigError, match=pattern) as caught:
                dist.check_launcher_env()
            assert caught.value.every_rank and "start the job with torchrun, deepspeed or srun" in str(caught.value)
    with monkeypatch.context() as scoped:
        for name, value in {"RANK": "0", "WORLD_SIZE": "1"}.items():  # alone, by hand: the group meets locally
            scoped.setenv(name, value)
        dist.check_launcher_env()


def test_an_srun_step_is_translated_and_an_sbatch_script_alone_is_not(monkeypatch):
    """In an sbatch script SLURM_PROCID=0 and SLURM_NTASKS=8 are set without srun: a plain `python -m yolods.train`
    there waited 30 min for 7 ranks. An srun step's own counts are used (`srun -n 7` in a job of 8), and the tasks
    on this node from SLURM_STEP_TASKS_PER_NODE (SLURM_NTASKS_PER_NODE exists only with --ntasks-per-node)."""
    from yolods import env

    batch_script = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}
    monkeypatch.setattr(os, "environ", dict(batch_script))
    env._translate_slurm_env()
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    step = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_STEP_NUM_TASKS": "7"}
    monkeypatch.setattr(os, "environ", {**batch_script, **step, "SLURM_STEP_TASKS_PER_NODE": "2(x2),3"})
    env._translate_slurm_env()
    translated = {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    assert translated == {"RANK": "5", "WORLD_SIZE": "7", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3"}
    # two jobs on one node met on torch's port 29500: each job step has its own, the same on all its tasks
    assert os.environ["MASTER_PORT"] == str(env.slurm_default_port())
    ports = set()
    for job in ("5", "6", "123456"):
        monkeypatch.setattr(os, "environ", {**batch_script, **step, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0"})
        ports.add(env.slurm_default_port())
    assert len(ports) == 3 and all(15000 <= port < 25000 for port in ports)


def test_a_master_port_in_use_is_one_line_with_the_fix(shapes_data, tmp_path):
    """torch's EADDRINUSE is 30 lines of C++ frames; the user needs the port and what to do."""
    import socket

    from conftest import small_run_args

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        alone = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, "-m", "yolods.train", *small_run_args(shapes_data, tmp_path, "taken")]
        result = subprocess.run(command, env={**train_env(), **alone}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("yolods: error:")]
    assert len(errors) == 1 and f"MASTER_PORT {port} is already in use" in errors[0], result.stderr[-3000:]
    assert "set MASTER_PORT to a free port" in errors[0]


def test_a_rank_that_cannot_see_its_gpu_is_told_how_to_launch(monkeypatch):
    """srun --gpus-per-task=1 shows each task one GPU while LOCAL_RANK counts the node's tasks: the rank must say
    so in one line, not fail in NCCL. (On this CPU machine every rank sees none; the check is the same.)"""
    from yolods import dist
    from yolods.errors import ConfigError

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "11")
    with pytest.raises(ConfigError, match=r"rank 11 has local rank 3 but sees 0 GPU\(s\): .*--gpu-bind=none"):
        dist.bind_local_gpu()


def test_a_stop_signal_while_rank_0_waits_for_its_peers_ends_it_at_once(shapes_data, tmp_path):
    """Joining the process group waits in torch's C++ rendezvous (up to the 30-min collective timeout) for ranks that
    may never come, where Python's signal handlers cannot run: SIGTERM and Ctrl-C went unanswered until the timeout.
    Nothing is trained yet, so the signal now ends the process at once."""
    import signal
    import time

    import psutil
    from conftest import small_run_args

    port = free_port()
    rank_0_of_2 = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    command = [sys.executable, "-m", "yolods.train", *small_run_args(shapes_data, tmp_path, "alone")]
    process = subprocess.Popen(command, env={**train_env(), **rank_0_of_2}, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not any(  # rank 0 hosts the store: once it listens, rank 0 is waiting for rank 1
            connection.laddr.port == port and connection.status == psutil.CONN_LISTEN
            for connection in psutil.Process(process.pid).net_connections(kind="tcp")
        ):
            assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    finally:
        process.kill()  # a no-op once it has exited
    assert process.returncode == -signal.SIGTERM  # 143 to a shell, as for a stop
