"""What rank 0 writes for people: TensorBoard scalars, profiler traces, results.csv/png, the console."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.multirank


def scalars(run_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_step_and_epoch_series(zero2_run):
    series = scalars(zero2_run)
    for tag in (
        "train/box_loss",
        "train/cls_loss",
        "train/dfl_loss",
        "lr/pg0",
        "lr/pg2",
        "throughput/imgs_per_s",
        "time/step_s",
        "time/data_wait_share",
        "train/grad_norm",
        "memory/peak_gib",
    ):
        steps = [event.step for event in series[tag]]
        assert len(steps) >= 3 and steps == sorted(set(steps)), (tag, steps)
    for tag in ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/precision(B)", "metrics/recall(B)", "val/box_loss"):
        assert [event.step for event in series[tag]] == [1, 2, 3], tag
    assert "train/loss_scale" not in series  # fp32: no loss scaling


def test_profile_writes_a_trace_per_rank_and_a_flops_summary(zero2_run):
    traces = sorted((zero2_run / "profile").glob("*.pt.trace.json"))
    assert [trace.name.split(".")[0] for trace in traces] == ["rank0", "rank1"]
    trace = json.loads(traces[0].read_text())
    assert any(event.get("name", "").startswith("train_step_") for event in trace["traceEvents"])
    assert "params" in (zero2_run / "flops_profile.txt").read_text().lower()
    log = (zero2_run / "train.log").read_text()  # rank 0 prints the summary's figures, not the tables
    assert re.search(r"params per GPU: +3\.0\d M", log) and "fwd FLOPS per GPU" in log
    assert "Aggregated Profile" not in log
    table = log[log.index("yolods: collectives on rank 0") :].splitlines()
    all_reduce = next(row.split() for row in table if row.startswith("all_reduce "))
    calls, megabytes, seconds, ms_per_call = int(all_reduce[1]), *map(float, all_reduce[2:5])
    assert calls > 0 and megabytes > 0 and ms_per_call == pytest.approx(seconds * 1e3 / calls, rel=0.01, abs=1e-3)


def test_results_csv_and_png(zero2_run):
    header = (zero2_run / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "time", "train/box_loss", "train/cls_loss", "train/dfl_loss"]
    assert {"metrics/mAP50(B)", "metrics/mAP50-95(B)", "val/box_loss", "lr/pg0"} <= set(header)
    assert (zero2_run / "results.png").stat().st_size > 10_000


def test_one_rank_prints_the_progress(zero2_run):
    log = (zero2_run / "train.log").read_text()
    assert log.count("yolods: 2 ranks, ZeRO-2") == 1
    assert log.count("Epoch   Mem(GiB)") == 3  # one header per epoch, from rank 0 alone


def test_plots_false_draws_no_results_png(tmp_path):
    """`--hyp plots=False` (Ultralytics' setting) leaves results.png out, as Ultralytics leaves its plots out."""
    from yolods.metrics import RunLogger

    for plot_results in (False, True):
        run_dir = tmp_path / str(plot_results)
        run_dir.mkdir()
        logger = RunLogger(run_dir, loss_names=("box_loss",), tensorboard=False, plot_results=plot_results)
        logger.log_epoch(0, {"train/box_loss": 1.0, "metrics/mAP50(B)": 0.5})
        assert (logger.plot() is not None) == plot_results == (run_dir / "results.png").exists()
        logger.close()


def test_a_resume_of_a_finished_run_reports_no_speed(tmp_path):
    """`--resume` of a run that had finished trains nothing: no "completed in 0.0 min (0.0 img/s)"."""
    from yolods.metrics import RunFacts, summary_text

    facts = dict(epochs_done=10, epochs=10, world_size=1, zero_stage=0, precision="fp32", data_yaml="d.yaml")
    idle = summary_text(
        RunFacts(wall_s=3.0, imgs_per_s=0.0, latest_checkpoint="epoch10", **facts), best=None, run_dir=tmp_path
    )
    assert "10/10 epochs completed (none now) on 1 rank" in idle and "img/s" not in idle
    trained = summary_text(
        RunFacts(wall_s=120.0, imgs_per_s=32.5, latest_checkpoint=None, **facts), best=None, run_dir=tmp_path
    )
    assert "10/10 epochs completed in 2.0 min (32.5 img/s overall) on 1 rank" in trained
    assert "yolods.val" not in trained and "yolods.predict" not in trained  # no best.pt to name
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "best.pt").touch()
    with_weights = summary_text(
        RunFacts(wall_s=120.0, imgs_per_s=32.5, latest_checkpoint=None, **facts), best=None, run_dir=tmp_path
    )
    assert "yolods.val --model" in with_weights and "--source path/to/images" in with_weights
    assert "results.csv" not in with_weights  # not written yet (a run stopped or diverged in its first epoch)
    (tmp_path / "data" / "images" / "val").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text(f"path: {tmp_path / 'data'}\nval: images/val\n")
    facts["data_yaml"] = str(tmp_path / "data.yaml")
    (tmp_path / "results.csv").write_text("epoch\n1\n")
    runnable = summary_text(
        RunFacts(wall_s=120.0, imgs_per_s=32.5, latest_checkpoint=None, **facts), best=None, run_dir=tmp_path
    )
    assert f"--source {tmp_path / 'data' / 'images' / 'val'}" in runnable and "results.csv" in runnable


def test_the_summary_names_the_epoch_best_pt_holds():
    """best.pt is replaced on a tie of Ultralytics' fitness (mAP50-95 in 8.4): the latest best epoch is named."""
    from yolods.metrics import best_epoch

    assert best_epoch([0.1, 0.3, 0.3, 0.2]) == 3
    assert best_epoch([0.0, 0.0]) == 2
    assert best_epoch([None, 0.2, None]) == 2
    assert best_epoch([]) is None


def test_a_tensorboard_step_covers_all_its_micro_batches():
    """With accumulation a step's point is the mean loss of its micro-batches and their summed time, not the last's."""
    import torch

    from yolods.engine import OptimizerStepWindow

    window = OptimizerStepWindow()
    for losses, seconds, data_wait_s in (([1.0, 2.0, 3.0], 0.2, 0.05), ([3.0, 4.0, 5.0], 0.3, 0.15)):
        window.add(torch.tensor(losses), images=16, seconds=seconds, data_wait_s=data_wait_s)
    assert window.mean_losses().tolist() == [2.0, 3.0, 4.0]
    assert window.seconds == pytest.approx(0.5) and window.imgs_per_s() == pytest.approx(64.0)
    assert window.data_wait_share() == pytest.approx(0.4)


def test_comm_totals_undo_deepspeed_logging_running_totals():
    """DeepSpeed 0.19.8 logs each call with its op's running timer total: 2, 3 and 4 ms calls log 2, 5 and 9 ms."""
    from yolods.profiling import comm_totals, comms_summary

    raw = {"all_reduce": {1024: [2, [2.0, 5.0], [], []], 4096: [1, [9.0], [], []]}}
    assert comm_totals(raw) == {"all_reduce": (3, 2 * 1024 + 4096, pytest.approx(0.009))}
    row = next(line for line in comms_summary(raw).splitlines() if line.startswith("all_reduce"))
    assert row.split()[1:5] == ["3", "0.01", "0.009", "3.000"]


def test_a_profile_window_past_the_last_step_says_so(tmp_path, capsys):
    """`--profile 50,1,1` on a 4-step run recorded nothing and said nothing; the flops step is never reached."""
    from types import SimpleNamespace

    from yolods.config import ProfileSpec
    from yolods.profiling import StepProfiler

    profiler = StepProfiler(
        ProfileSpec(wait=50, warmup=1, active=1), run_dir=tmp_path, engine=SimpleNamespace(device="cpu")
    )
    for _ in range(4):
        with profiler.step():
            pass
    profiler.close()
    assert "--profile 50,1,1 recorded no step: this run trained 4 steps" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["garbage row", "empty file", "cut-off header", "cut-off row"])
def test_a_damaged_results_csv_neither_stops_a_resume_nor_its_end(damage, tmp_path):
    """results.csv is appended to at each epoch end, so a crash or a full disk can leave a line cut off. Before, a
    resume failed on it (ValueError, IndexError), a cut-off row was glued to the next one for good, and a cut-off
    header failed a finished run's plot (TypeError, exit 1). Damaged lines are now left out, with a warning."""
    from yolods.metrics import RunLogger

    logger = RunLogger(tmp_path, loss_names=("box_loss",), tensorboard=False, plot_results=True)
    for epoch in range(3):
        logger.log_epoch(epoch, {"train/box_loss": 1.0 + epoch})
    header, *rows = logger.csv_path.read_text().splitlines(keepends=True)
    damaged = {
        "garbage row": header + "".join(rows) + 'garbage,"x\n',
        "empty file": "",
        "cut-off header": header[:12],
        "cut-off row": header + "".join(rows)[:-4],
    }[damage]
    logger.csv_path.write_text(damaged)
    logger.truncate_results(completed_epochs=2)  # as a resume from epoch 2 does
    logger.log_epoch(2, {"train/box_loss": 9.0})
    epochs = [row["epoch"] for row in logger.read_results()]
    assert epochs == (["1", "2", "3"] if damage in ("garbage row", "cut-off row") else ["3"])
    assert logger.csv_path.read_text().endswith("9.0\n") and logger.plot() is not None
