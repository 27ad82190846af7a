"""Elastic runs: a run resumes on another number of ranks, and a torchrun job restarts by itself after a rank dies.

Real jobs of 1 and 2 ranks on the 32 small shapes images. The state a checkpoint carries across a change in the
number of ranks is checked bit for bit (tests/reshard_probe.py loads a checkpoint on the new number of ranks and
saves it again at once); training that continues across the change is checked against the run left alone.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    assert_ok,
    ranks_command,
    results_without_time,
    run_train,
    stoppable_job_args,
    torchrun_command,
    train_command,
    train_env,
)

from yolods.reshard import load_whole_state

pytestmark = pytest.mark.multirank

PROBE = Path(__file__).with_name("reshard_probe.py")
WAIT_S = 300
# AdamW at lr 0.005 with one warmup epoch and no mosaic, so that the loss falls within the 3 epochs instead of rising
# through a 3-epoch warmup, as with Ultralytics' defaults.
LEARNING = ("--optimizer", "AdamW", "--lr0", "0.005", "--warmup_epochs", "1", "--hyp", "mosaic=0")
LOSSES = ("train/box_loss", "train/cls_loss", "train/dfl_loss")
MAP50 = "metrics/mAP50(B)"
# Final mAP50 of the run left alone on 2 ranks, seeds 0-3, measured here: 0, 0, 0.062, 0; runs moved between rank
# counts ended at 0 and 0.085. One detection more or less moves it ~0.07 on the 8 validation images, so the spread
# is taken as two detections' worth: four seeds understate a range.
SEED_MAP50_SPREAD = 0.15


def job_args(data_yaml: Path, project: Path, name: str, zero_stage: int, *extra: str) -> list[str]:
    return stoppable_job_args(data_yaml, project, name, zero_stage, (*LEARNING, *extra))


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as output:  # a file, not a pipe: nobody reads while the job runs
        return subprocess.Popen(
            command, env=train_env(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + WAIT_S
    while not condition():
        assert process.poll() is None, f"the job ended before {what}"
        assert time.time() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.05)


def stop_when(condition, command: list[str], *, log: Path) -> str:
    """Run the job until `condition()` holds, then SIGTERM it (it saves at the next optimizer step and stops)."""
    process = start(command, log)
    wait_until(condition, process, "the point to stop at")
    time.sleep(0.5)  # past the checkpoint that was being written: the stop lands mid-epoch
    process.send_signal(signal.SIGTERM)  # the launcher passes it on to its ranks
    assert process.wait(timeout=120) != 0, "the job finished before the stop: nothing was tested"
    return log.read_text()


def stop_after_epochs(command: list[str], run_dir: Path, *, epochs: int, log: Path) -> str:
    """Run the job until `epochs` epochs are in results.csv, then stop it: it saves and stops in the next epoch."""
    return stop_when(lambda: len(results_or_none(run_dir)) >= epochs, command, log=log)


def mid_epoch_checkpoint(run_dir: Path):
    return lambda: any((run_dir / "checkpoints").glob("*-batch*/yolods_complete.json"))


def results_or_none(run_dir: Path) -> list[dict[str, str]]:
    return results_without_time(run_dir) if (run_dir / "results.csv").is_file() else []


def resharded_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Resharded ")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------------------
# Bit-for-bit: a checkpoint loaded on another number of ranks and saved again holds the same state


def run_probe(run_dir: Path, tag: str, *, nproc: int) -> None:
    command = [*ranks_command(nproc), str(PROBE), str(run_dir), tag]
    assert_ok(subprocess.run(command, env=train_env(), capture_output=True, text=True, timeout=WAIT_S))


def is_buffer(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def assert_same_state(checkpoints: Path, saved: tuple[str, int], loaded: tuple[str, int], *, zero_stage: int) -> None:
    """`loaded` (tag, ranks) is `saved` after a load on its number of ranks: every element equal."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    (saved_tag, saved_ranks), (loaded_tag, loaded_ranks) = saved, loaded
    before = load_whole_state(checkpoints / saved_tag, saved_world_size=saved_ranks, zero_stage=zero_stage)
    after = load_whole_state(checkpoints / loaded_tag, saved_world_size=loaded_ranks, zero_stage=zero_stage)
    assert before.tensors.keys() == after.tensors.keys()
    keys = next(iter(before.tensors.values())).keys()
    assert len(keys) > 1, keys  # fp32 and the optimizer's: exp_avg, exp_avg_sq (AdamW) or momentum_buffer (SGD)
    differing = [
        (name, key)
        for name in before.tensors
        for key in keys
        if not torch.equal(before.tensors[name][key], after.tensors[name][key])
    ]
    assert not differing, differing[:5]
    for saved_scalars, loaded_scalars in zip(before.scalars, after.scalars):  # AdamW's step
        assert saved_scalars.keys() == loaded_scalars.keys()
        assert all(
            torch.equal(torch.as_tensor(saved_scalars[k]), torch.as_tensor(loaded_scalars[k])) for k in saved_scalars
        )
    # the weights through DeepSpeed's own consolidation too, the frozen DFL projection included (its buffers are
    # rank 0's BatchNorm statistics, which the load averaged over the ranks: compared below)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), loaded_tag)
    reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), saved_tag)
    parameters = [name for name in reference if not is_buffer(name)]
    assert len(parameters) == len(after.tensors) + 1  # + the frozen one
    assert all(torch.equal(weights[name], reference[name]) for name in parameters)
    assert all(torch.equal(weights[name], after.tensors[name]["fp32"]) for name in after.tensors)
    ema_before, ema_after = before.model_states["ema"], after.model_states["ema"]
    assert all(torch.equal(ema_before[name], ema_after[name]) for name in ema_before if not is_buffer(name))
    assert before.model_states["yolods"] == after.model_states["yolods"]  # epoch, batch, step counters, fitness
    assert before.model_states["global_steps"] == after.model_states["global_steps"]
    saved_ranks_states = [
        torch.load(checkpoints / saved_tag / f"yolods_rank{r}.pt", weights_only=False) for r in range(saved_ranks)
    ]
    for rank in range(loaded_ranks):  # BatchNorm statistics of the model and the EMA: the saved ranks' mean
        loaded_state = torch.load(checkpoints / loaded_tag / f"yolods_rank{rank}.pt", weights_only=False)
        for key in ("module_buffers", "ema_buffers"):
            for index, buffer in enumerate(loaded_state[key]):
                saved_buffers = torch.stack([state[key][index] for state in saved_ranks_states])
                assert torch.allclose(buffer, saved_buffers.mean(0), rtol=0, atol=1e-6), (key, index)


def assert_resharding_is_exact(run_dir: Path, work: Path, *, saved_ranks: int, zero_stage: int) -> Path:
    """The newest checkpoint of a run saved by `saved_ranks` (1 or 2), loaded and saved again on the other number.

    Returns the copy the probe ran in, whose newest checkpoint is now the probe's.
    """
    copy = work / f"probed_on{3 - saved_ranks}"
    shutil.copytree(run_dir, copy)
    source = (copy / "checkpoints" / "latest").read_text().strip()
    run_probe(copy, "probed", nproc=3 - saved_ranks)
    assert_same_state(copy / "checkpoints", (source, saved_ranks), ("probed", 3 - saved_ranks), zero_stage=zero_stage)
    return copy


# ------------------------------------------------------------------------------------------------------------
# Training across the change, against the run left alone


@pytest.fixture(scope="module")
def reference(shapes_data, tmp_path_factory) -> list[dict[str, str]]:
    """The learning job on 2 ranks at ZeRO-0, left alone (ZeRO 1-3 train the same maths: test_world_size)."""
    project = tmp_path_factory.mktemp("elastic_reference")
    assert_ok(run_train(job_args(shapes_data, project, "alone", 0), nproc=2))
    return results_without_time(project / "alone")


def assert_continues_like(rows: list[dict[str, str]], reference: list[dict[str, str]], *, same_stage: bool) -> None:
    """Each epoch once, no jump in the train loss, and a final mAP50 within the seeds' spread of the run left alone.

    Before the first change of ranks the run is the run left alone, digit for digit at the same ZeRO stage (other
    stages sum gradients in another order: the 4th digit differs). After the change each rank's augmentation draws
    and BatchNorm's micro batch differ, so the run takes another path, as another seed would. A jump is a train loss
    further from the run left alone's, in any epoch, than the largest change of any train loss between two of that
    run's consecutive epochs (0.64, box loss from epoch 1 to 2; the moved runs stayed within 0.26). On 3 epochs of 32
    images mAP50 barely leaves 0, so the mAP bound only catches a collapse or a blow-up; that the state comes
    through a change of ranks intact is checked bit for bit (assert_same_state), not through these outcomes.
    """
    assert [row["epoch"] for row in rows] == [row["epoch"] for row in reference]
    if same_stage:
        assert rows[0] == reference[0], "the epoch before any change of ranks differs from the run left alone"
    alone = [[float(row[name]) for row in reference] for name in LOSSES]
    noise = max(abs(later - earlier) for losses in alone for earlier, later in itertools.pairwise(losses))
    for row, alone_row in zip(rows, reference):
        for name in LOSSES:
            assert abs(float(row[name]) - float(alone_row[name])) <= noise, (name, noise, row, alone_row)
    assert abs(float(rows[-1][MAP50]) - float(reference[-1][MAP50])) <= SEED_MAP50_SPREAD, (rows[-1], reference[-1])


@pytest.mark.parametrize("zero_stage", [2])  # ZeRO-0 checkpoints load as saved; the re-split is ZeRO 1-3's
def test_a_run_moves_from_2_ranks_to_1_and_back(zero_stage, reference, shapes_data, tmp_path):
    """Stopped during epoch 2 on 2 ranks, resumed on 1, stopped during epoch 3, finished on 2 again.

    At ZeRO-2 the checkpoint saved on 2 ranks is also loaded on 1 and compared bit for bit (1 -> 2 bit for bit:
    test_zero3_checkpoint_moves_between_rank_counts).
    """
    run_dir = tmp_path / "moved"
    args = job_args(shapes_data, tmp_path, "moved", zero_stage)
    stop_after_epochs(train_command(args, nproc=2), run_dir, epochs=1, log=tmp_path / "on2.log")
    if zero_stage:
        assert_resharding_is_exact(run_dir, tmp_path, saved_ranks=2, zero_stage=zero_stage)
    resume = ["--resume", str(run_dir)]
    on1 = stop_after_epochs(train_command(resume, nproc=1), run_dir, epochs=2, log=tmp_path / "on1.log")
    assert resharded_line(on1).split(":")[0].endswith("from 2 to 1 rank"), resharded_line(on1)
    back_on2 = run_train(resume, nproc=2)
    assert_ok(back_on2)
    assert "from 1 to 2 ranks" in resharded_line(back_on2.stdout + back_on2.stderr)
    assert_continues_like(results_without_time(run_dir), reference, same_stage=zero_stage == 0)


def test_zero3_checkpoint_moves_between_rank_counts(shapes_data, tmp_path):
    """ZeRO-3 partitions every parameter: a 1-rank checkpoint loads on 2 ranks bit for bit, and that one on 1 rank
    trains on to the end. With SGD, whose momentum DeepSpeed's universal checkpoint would not carry."""
    run_dir = tmp_path / "zero3"
    sgd = ("--optimizer", "SGD", "--lr0", "0.01")
    args = job_args(shapes_data, tmp_path, "zero3", 3, "--epochs", "1", "--save_period_steps", "2", *sgd)
    stop_when(mid_epoch_checkpoint(run_dir), train_command(args, nproc=1), log=tmp_path / "on1.log")
    probed = assert_resharding_is_exact(run_dir, tmp_path, saved_ranks=1, zero_stage=3)
    finished = run_train(["--resume", str(probed)], nproc=1)  # from the probe's 2-rank checkpoint
    assert_ok(finished)
    assert "from 2 to 1 rank" in resharded_line(finished.stdout + finished.stderr)
    assert [row["epoch"] for row in results_without_time(probed)] == ["1"]


# ------------------------------------------------------------------------------------------------------------
# torchrun restarts


def test_torchrun_restarts_a_killed_rank_and_the_run_continues_exactly(reference, shapes_data, tmp_path):
    """SIGKILL to rank 1 once a mid-epoch checkpoint exists; torchrun starts both ranks again, with the same flags.

    The restarted group finds its run directory, resumes from the mid-epoch checkpoint, and replays the data from
    there, so the results are the run left alone's, every digit.
    """
    run_dir = tmp_path / "restarted"
    args = job_args(shapes_data, tmp_path, "restarted", 0, "--save_period_steps", "3")
    command = [*torchrun_command(2), "--max-restarts=1", "-m", "yolods.train", *args]
    log = tmp_path / "job.log"
    process = start(command, log)
    wait_until(mid_epoch_checkpoint(run_dir), process, "a mid-epoch checkpoint")
    rank1 = [
        child
        for child in psutil.Process(process.pid).children(recursive=True)
        if child.environ().get("RANK") == "1" and "yolods.train" in child.cmdline()
    ]
    assert len(rank1) == 1, rank1
    rank1[0].kill()
    assert process.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert "continuing it from its newest complete checkpoint" in output, output[-3000:]
    assert "Resuming" in output and "batch" in output.split("Resuming", 1)[1].splitlines()[0], output[-3000:]
    assert results_without_time(run_dir) == reference  # every epoch once, every digit
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == ["restarted"]  # no restarted2
