"""Faults in real 2-rank jobs: an error on one rank ends the whole job in seconds; a stop never loses work.

Each test injects one fault (an exception mid-step, a failed write, a frozen rank, a signal to the launcher or its whole
process group, a damaged checkpoint) and checks the exit code, the time to exit, that no process is left
and, for stops, that the checkpoint resumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch.utils.data as torch_data
from conftest import REPO, assert_ok, free_port, run_train, small_run_args, torchrun_command, train_command, train_env

pytestmark = pytest.mark.multirank

FAULT_EXIT_S = 60  # the bar: a fault on one rank ends every process within a minute


def deepspeed_command(args: list[str]) -> list[str]:
    """The deepspeed launcher, 2 ranks on this node (it takes --module, not -m)."""
    launcher = str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "yolods.train", *args]


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a job under a scheduler
    )


def process_tree(process: subprocess.Popen) -> list[psutil.Process]:
    return [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]


def wait_for_all(tree: list[psutil.Process], *, timeout_s: float) -> list[psutil.Process]:
    """Wait until every process of the tree has exited; returns those still running at the timeout."""
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    for process in alive:
        process.kill()
    return alive


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert process.poll() is None and time.time() < deadline, "run ended or stalled before its first checkpoint"
        time.sleep(0.05)


def fault_args(shapes_data: Path, project: Path, name: str) -> list[str]:
    return small_run_args(shapes_data, project, name, "--workers", "2", epochs=3)


@pytest.mark.parametrize(("kind", "rank", "at"), [("raise", 1, 3), ("write", 0, 1)])
def test_an_error_on_one_rank_ends_the_job_fast(kind, rank, at, shapes_data, tmp_path):
    """An exception mid-step on rank 1 (an OOM), or a failed weights write on rank 0 (a full disk)."""
    command = [*torchrun_command(2), str(REPO / "tests" / "fault_probe.py"), kind, str(rank), str(at), "--"]
    command += fault_args(shapes_data, tmp_path, kind)
    started = time.time()
    process = start(command)
    tree = process_tree(process)
    output, _ = process.communicate(timeout=240)
    elapsed_s = time.time() - started
    assert process.returncode != 0, output[-3000:]
    assert not wait_for_all(tree, timeout_s=10), "processes left running"
    errors = [line for line in output.splitlines() if line.startswith(f"yolods: rank {rank}: error:")]
    assert len(errors) == 1, output[-3000:]
    assert "injected" in errors[0]
    assert f"yolods: rank {1 - rank}: stopping, rank {rank} failed" in output
    assert (tmp_path / kind / "logs" / f"rank{rank}.log").read_text().startswith("Traceback")
    assert elapsed_s < FAULT_EXIT_S + 60, elapsed_s  # start-up included; the fault itself ends it in seconds


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank` (its dataloader workers share its environment but are its children)."""
    tree = psutil.Process(launcher.pid).children(recursive=True)
    of_rank = [process for process in tree if process.environ().get("RANK") == str(rank)]
    return next(process for process in of_rank if process.parent() not in of_rank)


HUNG_IN = {"hang": "hanging_step", "val-hang": "hanging_validation", "write-hang": "hanging_write"}


@pytest.mark.parametrize(
    ("fault", "launcher", "rank"),
    [("freeze", "deepspeed", 0), ("hang", "torchrun", 1), ("val-hang", "torchrun", 1), ("write-hang", "torchrun", 1)],
)
def test_a_frozen_or_hung_rank_ends_the_job_instead_of_hanging_it(fault, launcher, rank, shapes_data, tmp_path):
    """Faults that neither raise nor exit, so no launcher notices them. `freeze`: SIGSTOP, a process that stops
    altogether (a paused host; rank 0 also hosts the store under deepspeed). `hang`: a train step that never
    returns while the process lives on (a deadlock). `val-hang`: the same in validation, where the other rank
    waits in Ultralytics' stats gather. `write-hang`: rank 1's write of the second checkpoint never returns (a
    file system that stopped answering), while rank 0 waits in the checkpoint's barrier."""
    # the default is 30 s; shorter here to keep the test short (a write stalls for 4x it: the lowest, 4 s, there)
    heartbeat_timeout_s = 4 if fault == "write-hang" else 6
    args = fault_args(shapes_data, tmp_path, fault)
    if fault in HUNG_IN:
        at = {"hang": "3", "val-hang": "1", "write-hang": "2"}[fault]
        command = [*torchrun_command(2), str(REPO / "tests" / "fault_probe.py"), fault, str(rank), at, "--", *args]
    else:
        command = deepspeed_command(args)
    process = subprocess.Popen(
        command,
        env={**train_env(), "YOLODS_HEARTBEAT_TIMEOUT_S": str(heartbeat_timeout_s)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if fault == "freeze":
        wait_for_checkpoint(tmp_path / fault, process)
    tree = process_tree(process)
    faulted_at = time.time()  # the hang: its job's start
    if fault == "freeze":
        rank_process(process, rank).suspend()
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # it hung, as it would until the collective timeout
        pytest.fail(f"the job still ran {time.time() - faulted_at:.0f} s after rank {rank}'s fault")
    elapsed_s = time.time() - faulted_at
    assert process.returncode != 0, output[-3000:]
    assert not wait_for_all(tree, timeout_s=10), "processes left running"
    peer = 1 - rank
    if fault == "freeze":
        assert re.search(
            rf"yolods: rank {peer}: stopping, (rank {rank} stopped responding|the job's store stopped answering)",
            output,
        ), output[-3000:]
        # the frozen rank is killed by its peer: no wait for the launchers' 30 s grace before their SIGKILL
        assert elapsed_s < heartbeat_timeout_s + 20, elapsed_s
    else:
        # the peer watches the hung rank's progress; a hung write is found by the writer itself
        failure = f"rank {rank}'s checkpoint write moved no bytes" if fault == "write-hang" else f"rank {rank} is stuck"
        assert f"yolods: rank {peer}: stopping, {failure}" in output, output[-3000:]
        assert f"yolods: rank {rank}: stopping, {failure}" in output, output[-3000:]
        assert f"in {HUNG_IN[fault]}" in output, output[-3000:]  # the stuck rank's stack says where it hangs
        timeout_factor = 4 if fault == "write-hang" else 1.5  # faults.WRITE_STALL_FACTOR, STUCK_TIMEOUT_FACTOR
        assert elapsed_s < timeout_factor * heartbeat_timeout_s + 40, elapsed_s  # start-up and the steps before
    if fault == "write-hang":  # the first checkpoint stays the newest complete one: --resume continues from it
        assert (tmp_path / fault / "checkpoints" / "latest").read_text().startswith("epoch1"), output[-3000:]


def stop_and_resume(command: list[str], run_dir: Path, *, how: signal.Signals, to_group: bool) -> str:
    """Signal a running job once it has a checkpoint; check that every process exits in time; return the output."""
    process = start(command)
    wait_for_checkpoint(run_dir, process)
    time.sleep(0.3)
    tree = process_tree(process)
    signalled = time.time()
    if to_group:
        os.killpg(process.pid, how)
    else:
        process.send_signal(how)
    output, _ = process.communicate(timeout=120)
    assert not wait_for_all(tree, timeout_s=FAULT_EXIT_S), "processes left running"
    assert time.time() - signalled < FAULT_EXIT_S
    return output


def test_sigterm_to_the_deepspeed_launchers_process_group_saves_and_resumes(shapes_data, tmp_path):
    """What scancel does: every process (runner, launch.py, ranks, dataloader workers) gets SIGTERM."""
    run_dir = tmp_path / "stopped"
    output = stop_and_resume(
        deepspeed_command(fault_args(shapes_data, tmp_path, "stopped")), run_dir, how=signal.SIGTERM, to_group=True
    )
    assert "Stopped by SIGTERM: checkpoint epoch" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert_ok(run_train(["--resume", str(run_dir)], nproc=2))


def test_sigterm_to_the_deepspeed_runner_alone_stops_the_ranks(shapes_data, tmp_path):
    """The runner does not pass SIGTERM on; the ranks notice it is gone and stop with a checkpoint."""
    run_dir = tmp_path / "stopped"
    output = stop_and_resume(
        deepspeed_command(fault_args(shapes_data, tmp_path, "stopped")), run_dir, how=signal.SIGTERM, to_group=False
    )
    # launch.py and the ranks keep writing to the runner's output after it is gone
    assert "the launcher is gone: saving a checkpoint" in output, output[-3000:]
    # rank 0 names the launcher, or (when rank 1 noticed first) its peer's request
    stopped = r"Stopped by (the launcher's exit|another rank's stop request): checkpoint epoch"
    assert re.search(stopped, output), output[-3000:]
    assert (run_dir / "checkpoints" / "latest").is_file()  # resuming it: the process-group test above


def test_ctrl_c_under_torchrun_saves_once_and_exits_130(shapes_data, tmp_path):
    run_dir = tmp_path / "stopped"
    output = stop_and_resume(
        [*torchrun_command(2), "-m", "yolods.train", *fault_args(shapes_data, tmp_path, "stopped")],
        run_dir,
        how=signal.SIGINT,
        to_group=False,
    )
    assert output.count("Ctrl-C: saving a checkpoint") == 1, output[-3000:]
    assert "Stopped by SIGINT" in output, output[-3000:]  # torchrun reports its own SignalException, not our 130
    assert not [line for line in output.splitlines() if 'File "' in line and "yolods" in line], output[-3000:]
    assert (run_dir / "checkpoints" / "latest").is_file()  # resumed after a stop: test_resume, the SIGTERM tests


def flip_a_bit_in_the_largest_tensor(path: Path) -> None:
    """One bit flipped mid-way through the largest member of a torch.save zip: torch.load takes it as it is."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    payload = bytearray(path.read_bytes())
    name_and_extra = int.from_bytes(payload[member.header_offset + 26 : member.header_offset + 28], "little")
    name_and_extra += int.from_bytes(payload[member.header_offset + 28 : member.header_offset + 30], "little")
    payload[member.header_offset + 30 + name_and_extra + member.file_size // 2] ^= 0x04  # past the local header
    path.write_bytes(bytes(payload))


@pytest.mark.parametrize("damage", ["truncated", "missing", "bit flipped"])
def test_resume_skips_a_damaged_newest_checkpoint(zero2_run, tmp_path, damage):
    """A copy of the finished ZeRO-2 run (checkpoints epoch2 and epoch3) whose newest has a truncated rank file, lost
    one of its ZeRO optimizer partitions (it failed in DeepSpeed's load, with no fallback), or had a bit of its model
    states flipped on disk (torch.load does not check the zip's CRCs: it resumed with the changed weight)."""
    from yolods.checkpoint import COMPLETE_MARKER

    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run, run_dir)
    newest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    marker = newest / COMPLETE_MARKER  # as if the run went on after it (a finished run's --resume trains nothing)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "finished": False}))
    if damage == "truncated":
        damaged = newest / "yolods_rank1.pt"
        damaged.write_bytes(damaged.read_bytes()[:500])  # cut off mid-write
    elif damage == "missing":
        damaged = next(newest.glob("*zero_pp_rank_1_*optim_states.pt"))
        damaged.unlink()
    else:
        damaged = newest / "mp_rank_00_model_states.pt"
        flip_a_bit_in_the_largest_tensor(damaged)
    unfinished = run_dir / "checkpoints" / "epoch4"  # a save that never completed (a full disk): no marker
    unfinished.mkdir()
    (unfinished / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1000)
    result = run_train(["--resume", str(run_dir)], nproc=2)
    assert_ok(result)
    output = result.stdout + result.stderr
    assert f"skipping checkpoint {newest.name}: {damaged.name}" in output, output[-3000:]
    assert "Resuming" in output and "from epoch2" in output, output[-3000:]
    assert not unfinished.exists()  # its space freed first: on a full disk it was what the resume needed


def test_the_ranks_check_a_tags_crcs_between_them(tmp_path):
    """Each file's bytes are read by one rank: of 2 ranks exactly one finds the flipped bit, and 1 rank finds it."""
    import torch

    from yolods.checkpoint import damaged_file

    for name in ("a.pt", "b.pt", "c.pt"):
        torch.save({"weight": torch.arange(50_000, dtype=torch.float32)}, tmp_path / name)
    flip_a_bit_in_the_largest_tensor(tmp_path / "b.pt")
    found = [damaged_file(tmp_path, rank=rank, world_size=2) for rank in (0, 1)]
    assert found.count(None) == 1 and "b.pt: its bytes changed" in next(filter(None, found)), found
    assert "b.pt: its bytes changed" in damaged_file(tmp_path), damaged_file(tmp_path)


def test_a_tag_whose_completion_marker_was_cut_off_counts_as_unfinished(tmp_path):
    """An empty or half-written yolods_complete.json (a full disk, a crash in its write) failed --resume with a bare
    JSONDecodeError; the tag is now passed over, as one without a marker is, and the one before it resumes."""
    from yolods.checkpoint import COMPLETE_MARKER, complete_tags

    for tag, marker in (("epoch1", '{"world_size": 2, "saved_at": 1.0}'), ("epoch2", ""), ("epoch3", '{"world_')):
        (tmp_path / "checkpoints" / tag).mkdir(parents=True)
        (tmp_path / "checkpoints" / tag / COMPLETE_MARKER).write_text(marker)
    assert [tag.name for tag in complete_tags(tmp_path)] == ["epoch1"]


def test_a_finished_run_started_again_exits_0_on_any_number_of_ranks_from_a_copy(zero2_run, tmp_path):
    """A job started again after its run finished (a requeue, an elastic restart on other nodes) finds it complete:
    on 3 ranks, which its global batch of 8 does not split over, and in a copy that did not keep file times (the
    older tag's marker now looks newer: found by file time, epoch2 was resumed and the batch refused, exit 2)."""
    from yolods.checkpoint import COMPLETE_MARKER

    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run, run_dir)
    later = time.time() + 60
    os.utime(run_dir / "checkpoints" / "epoch2" / COMPLETE_MARKER, (later, later))
    result = run_train(["--resume", str(run_dir)], nproc=3)
    assert_ok(result)
    assert "already finished (epoch3 of 3 epochs); nothing to resume." in result.stdout + result.stderr


def test_ctrl_c_to_a_single_process_exits_130_and_resumes(shapes_data, tmp_path):
    """Ctrl-C in a terminal signals the whole foreground group: the training process and its 2 loader workers."""
    run_dir = tmp_path / "stopped"
    command = train_command(fault_args(shapes_data, tmp_path, "stopped"), nproc=1)
    process = start(command)
    wait_for_checkpoint(run_dir, process)
    time.sleep(0.3)
    tree = process_tree(process)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "Stopped by SIGINT" in output, output[-3000:]
    assert f"python -m yolods.train --resume {run_dir.resolve()}" in output, output[-2000:]  # the summary says how
    assert not wait_for_all(tree, timeout_s=FAULT_EXIT_S), "processes left running"
    assert_ok(run_train(["--resume", str(run_dir)], nproc=1))


class _MissingImage(torch_data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise FileNotFoundError("Image Not Found /data/images/train/000007.jpg")


def test_an_error_in_a_data_loader_worker_is_summed_up_by_the_workers_own_line():
    """torch re-raises a worker's error as "Caught FileNotFoundError in DataLoader worker process 0." with the
    worker's traceback below: the one line a failed rank prints must name the file, not the worker."""
    from yolods.faults import _summary

    with pytest.raises(FileNotFoundError) as caught:
        next(iter(torch_data.DataLoader(_MissingImage(), num_workers=1)))
    assert _summary(caught.value) == "Image Not Found /data/images/train/000007.jpg (in DataLoader worker process 0)"
    assert _summary(ValueError("first line\nsecond line")) == "first line"
    # a SIGKILLed peer: the survivor's collective names gloo's socket, not the cause
    gone = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:36092: Connection reset by peer"
    )
    assert _summary(gone).startswith("a peer rank's process is gone (") and "--resume continues" in _summary(gone)


def test_a_full_disk_is_named_in_one_line(tmp_path):
    """torch.save on a full disk fails as "unexpected pos ..."; the rank's log cannot be written either. The line
    says the disk is full, and no traceback floods the console. (/dev/full fails every write with ENOSPC.)"""
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    (logs / "rank0.log").symlink_to("/dev/full")
    code = (
        "from pathlib import Path; from yolods import faults; "
        f"faults.abort_job(RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2'), run_dir=Path({str(tmp_path / 'run')!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=train_env())
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert (
        lines[-2].startswith("yolods: rank 0: error: RuntimeError: [enforce fail")
        and "is full: free space" in lines[-2]
    )
    assert lines[-1] == "(traceback not saved: no space left on device)"
    assert not (logs / "rank0.log").exists()


def test_an_aborting_rank_takes_its_data_loader_workers_with_it(tmp_path):
    """os._exit skips the DataLoader's shutdown: a worker still in its init function (yolods' mosaic buffer reads
    images there) when its parent left took PID 1 for its parent and waited for work for good, ignoring SIGTERM
    (QA: 2 of 8 aborted `--workers 2` runs left one). abort_job kills the workers before it leaves."""
    code = (
        "import time, torch.utils.data as d; from pathlib import Path; from yolods import faults\n"
        "loader = d.DataLoader(list(range(8)), num_workers=2, worker_init_fn=lambda _: time.sleep(60))\n"
        "batches = iter(loader)  # the workers start, and sleep in their init function\n"
        "import multiprocessing; print(*[child.pid for child in multiprocessing.active_children()], flush=True)\n"
        f"faults.abort_job(ValueError('a fault'), run_dir=Path({str(tmp_path / 'run')!r}))\n"
    )
    # without the kill, the orphaned workers hold the pipes open: the run times out
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=train_env())
    assert result.returncode != 0 and "yolods: rank 0: error: ValueError: a fault" in result.stderr, result.stderr
    worker_pids = [int(pid) for pid in result.stdout.split()]
    assert len(worker_pids) == 2
    time.sleep(1)
    alive = [pid for pid in worker_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"data loader workers {alive} outlived their rank"
