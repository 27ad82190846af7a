"""Bad input: one line that names the culprit and the fix, a non-zero exit, no traceback, no hang."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import assert_ok, run_train, small_run_args


def assert_one_line_error(result, *fragments: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    # torchrun prints its own ChildFailedError traceback for any non-zero child; none may come from yolods.
    assert not re.search(r'File ".*yolods[/\\]', output), output[-3000:]
    if "torch.distributed.run" not in " ".join(result.args):
        assert "Traceback" not in output, output[-3000:]
    error_lines = [line for line in output.splitlines() if line.startswith("yolods: error:")]
    assert len(error_lines) == 1, output[-3000:]  # one voice: rank 0 alone reports it
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_missing_data_yaml(tmp_path):
    result = run_train(["--data", str(tmp_path / "nope.yaml"), "--project", str(tmp_path)])
    assert_one_line_error(result, "nope.yaml", "not found")


def test_unknown_model_name(shapes_data, tmp_path):
    result = run_train(small_run_args(shapes_data, tmp_path, "x", "--model", "yolov99z.yaml"))
    assert_one_line_error(result, "yolov99z.yaml", "unknown model")


def test_missing_weights_file_is_never_downloaded(shapes_data, tmp_path):
    result = run_train(small_run_args(shapes_data, tmp_path, "x", "--model", "yolov8n.pt"))
    assert_one_line_error(result, "yolov8n.pt", "never downloads")


def test_zero_stage_out_of_range(tmp_path):
    assert_one_line_error(run_train(["--zero", "5", "--project", str(tmp_path)]), "--zero 5", "0, 1, 2 or 3")


@pytest.mark.multirank
def test_batch_that_does_not_split_over_two_ranks(shapes_data, tmp_path):
    args = small_run_args(shapes_data, tmp_path, "x")
    args[args.index("--batch") + 1] = "7"
    assert_one_line_error(run_train(args, nproc=2, timeout=180), "--batch 7", "2 ranks", "--batch 6")


def test_config_that_disagrees_with_flags(shapes_data, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 3}}')
    result = run_train(small_run_args(shapes_data, tmp_path, "x", "--zero", "2", "--deepspeed_config", str(config)))
    assert_one_line_error(result, "--zero 2", "stage=3")


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--imgsz", "33"], ("--imgsz 33", "multiple of", "--imgsz 64")),  # up, where Ultralytics would round it
        (["--imgsz", "0"], ("--imgsz 0",)),
        (["--workers", "-1"], ("--workers -1",)),
        (["--model", "yolov8n-cls.yaml"], ("yolov8n-cls.yaml", "classify", "detection")),
        (["--model", "yolov8n-seg.yaml"], ("yolov8n-seg.yaml", "segment")),
        (["--model", "yolov8s-worldv2.yaml"], ("yolov8s-worldv2.yaml", "a WorldDetect head, not Detect")),
        # Ultralytics caps the batch at the 32 images: the large-batch rule would scale the lr for 64 a step
        (["--batch", "64"], ("--batch 64 is more than the 32 train images", "use --batch 32 or less")),
    ],
)
def test_bad_flag_values(flags, fragments, shapes_data, tmp_path):
    result = run_train(small_run_args(shapes_data, tmp_path, "x", *flags))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "x").exists(), "a failed start left a run directory"


@pytest.mark.parametrize(
    ("config", "fragments"),
    [
        ('{"zero_optimization": {"stage": 7}}', ("zero_optimization.stage=7",)),
        ('{"zero_optimisation": {"stage": 2}}', ("zero_optimisation", "did you mean zero_optimization")),
        ('{"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}}', ("reduce_bucket_sise", "reduce_bucket_size")),
        ('{"zero_optimization": ', ("invalid JSON",)),
        # DeepSpeed refused it only once the model was built, in a traceback (rc 1, a run directory left behind)
        ('{"fp16": {"enabled": true}}', ("fp16 section", "CPU accelerator refuses", "--precision fp16")),
    ],
)
def test_bad_deepspeed_config(config, fragments, shapes_data, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(config)
    result = run_train(small_run_args(shapes_data, tmp_path, "x", "--deepspeed_config", str(path)))
    assert_one_line_error(result, "--deepspeed_config", *fragments)
    assert not (tmp_path / "x").exists(), "a failed start left a run directory"


def write_data_yaml(root: Path, **entries) -> Path:
    import yaml

    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({"path": str(root), **entries}))
    return path


@pytest.mark.parametrize(
    "problem", ["empty image directory", "every image unreadable", "no labels", "every class id beyond nc", "no names"]
)
def test_bad_data_sets(problem, shapes_data, tmp_path):
    import shutil

    root = tmp_path / "data"
    if problem == "empty image directory":
        (root / "images" / "train").mkdir(parents=True)
        (root / "images" / "val").mkdir(parents=True)
        data_yaml = write_data_yaml(root, train="images/train", val="images/val", names={0: "a"})
        fragments = ("train images", "images/train", "the data.yaml's 'train:'", "Check that entry")
    elif problem == "every image unreadable":
        shutil.copytree(shapes_data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
        for image in (root / "images").rglob("*.jpg"):
            image.write_bytes(b"not an image")
        data_yaml = write_data_yaml(root, train="images/train", val="images/val", names={0: "a", 1: "b", 2: "c"})
        fragments = ("train images", "No valid images")
    elif problem == "no labels":  # Ultralytics raises a ValueError for a train split without one label
        root = tmp_path / "my data"  # a space in the path: its message was not recognised, a traceback followed
        shutil.copytree(shapes_data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
        shutil.rmtree(root / "labels")
        data_yaml = write_data_yaml(root, train="images/train", val="images/val", names={0: "a", 1: "b", 2: "c"})
        fragments = ("train images", "no image has a label", "labels/train/*.txt", "class x_center")
    elif problem == "every class id beyond nc":  # Ultralytics drops each such image; the hint named only images
        shutil.copytree(shapes_data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
        for label in (root / "labels").rglob("*.txt"):
            label.write_text("".join("7" + line[line.index(" ") :] for line in label.read_text().splitlines(True)))
        data_yaml = write_data_yaml(root, train="images/train", val="images/val", names={0: "a", 1: "b", 2: "c"})
        fragments = ("train images", "No valid images", "class ids below nc")
    else:
        shutil.copytree(shapes_data.parent, root, ignore=shutil.ignore_patterns("*.cache"))
        data_yaml = write_data_yaml(root, train="images/train", val="images/val")
        fragments = ("data.yaml", "'names' or 'nc' are required")
    result = run_train(small_run_args(data_yaml, tmp_path / "runs", "x"))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "runs" / "x").exists(), "a failed start left a run directory"


def run_dir_with_a_checkpoint(run_dir: Path, args_yaml: str) -> Path:
    """A run directory as --resume and --exist_ok see it: args.yaml and one complete checkpoint tag (no weights)."""
    from yolods.checkpoint import COMPLETE_MARKER

    (run_dir / "checkpoints" / "epoch1").mkdir(parents=True)
    (run_dir / "checkpoints" / "epoch1" / COMPLETE_MARKER).write_text('{"world_size": 1}')
    (run_dir / "args.yaml").write_text(args_yaml)
    return run_dir


@pytest.mark.parametrize("args_yaml", ["", "model: [unclosed\n", "- a list\n", "no_such_setting: 1\n"])
def test_a_damaged_args_yaml_is_named_on_resume(tmp_path, args_yaml):
    run_dir = run_dir_with_a_checkpoint(tmp_path / "run", args_yaml)
    result = run_train(["--resume", str(run_dir)])
    assert_one_line_error(result, f"{run_dir / 'args.yaml'} is not a yolods run's settings", "restore it")


@pytest.mark.parametrize(
    ("args_yaml", "named"),
    [
        ("epochs: twenty\n", "is not a yolods run's settings (epochs: 'twenty' is not int)"),  # was: as if a flag
        ("batch: -3\n", "holds a value no run can take (--batch -3 must be a positive"),  # was: a rank's ValueError
        ("exist_ok: 3\n", "(exist_ok: 3 is not bool)"),
    ],
)
def test_a_hand_edited_args_yaml_value_is_named_on_resume(tmp_path, args_yaml, named):
    """args.yaml's values pass the checks the flags pass (in process: the one-line path is the test above's)."""
    from yolods.checkpoint import load_run_config
    from yolods.errors import ConfigError

    run_dir = run_dir_with_a_checkpoint(tmp_path / "run", args_yaml)
    with pytest.raises(ConfigError, match=re.escape(f"{run_dir / 'args.yaml'} ") + ".*" + re.escape(named)):
        load_run_config(run_dir)
    (run_dir / "args.yaml").write_text("epochs: 2\nsave_period_min: 30\n")  # an int where a float is declared
    assert load_run_config(run_dir).save_period_min == 30


def test_a_run_whose_dataset_moved_resumes_with_the_new_path_only(shapes_data, tmp_path):
    """Ultralytics resumes a run whose data.yaml moved with the one given; a data.yaml still in place stays."""
    from yolods.config import RunConfig, given_flags, parse_args, resumed_config
    from yolods.errors import ConfigError

    run_dir = run_dir_with_a_checkpoint(tmp_path / "run", f"data: {tmp_path / 'gone' / 'data.yaml'}\n")
    result = run_train(["--resume", str(run_dir)])
    assert_one_line_error(result, "data.yaml is not there any more", "pass --data with its new path")

    saved = RunConfig(device="cpu", data=str(tmp_path / "gone" / "data.yaml"), resume=str(run_dir))
    argv = ["--resume", str(run_dir), "--data", str(shapes_data)]
    assert resumed_config(saved, parse_args(argv), given=given_flags(argv)).data == str(shapes_data)
    elsewhere = tmp_path / "copy" / "data.yaml"  # while the run's own data.yaml is in place, another is refused
    elsewhere.parent.mkdir()
    elsewhere.write_text(shapes_data.read_text())
    argv = ["--resume", str(run_dir), "--data", str(elsewhere)]
    with pytest.raises(ConfigError, match="would change the run"):
        resumed_config(RunConfig(device="cpu", data=str(shapes_data), resume="r"), parse_args(argv), given={"data"})


def test_a_run_whose_deepspeed_config_or_start_weights_are_gone_resumes(tmp_path):
    """The same for --deepspeed_config; a --model .pt that is gone needs no new path when the run has its own
    weights/last.pt (the architecture is all it is read for)."""
    from yolods.config import RunConfig, given_flags, parse_args, resumed_config
    from yolods.errors import ConfigError

    run_dir = tmp_path / "run"
    saved = RunConfig(device="cpu", deepspeed_config=str(tmp_path / "gone.json"), resume=str(run_dir))
    with pytest.raises(ConfigError, match=r"gone.json is not there any more; if it moved, pass --deepspeed_config"):
        resumed_config(saved, parse_args(["--resume", str(run_dir)]), given={"resume"})
    new_json = tmp_path / "ds.json"
    new_json.write_text("{}")
    argv = ["--resume", str(run_dir), "--deepspeed_config", str(new_json)]
    assert resumed_config(saved, parse_args(argv), given=given_flags(argv)).deepspeed_config == str(new_json)

    saved = RunConfig(device="cpu", model=str(tmp_path / "start.pt"), resume=str(run_dir))
    with pytest.raises(ConfigError, match=r"start.pt is not there any more; if it moved, pass --model"):
        resumed_config(saved, parse_args(["--resume", str(run_dir)]), given={"resume"})
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "weights" / "last.pt").write_bytes(b"")
    resumed = resumed_config(saved, parse_args(["--resume", str(run_dir)]), given={"resume"})
    assert resumed.model == str(run_dir / "weights" / "last.pt")


def test_relative_paths_are_recorded_absolute_so_a_resume_elsewhere_finds_the_same_files(
    shapes_data, tmp_path, monkeypatch
):
    """A run started with `--data data.yaml` and resumed from another directory holding a data.yaml of its own
    trained on that other dataset, without a word; names (yolov8n.yaml, synthetic) stay names."""
    from yolods.config import RunConfig, given_flags, parse_args, resumed_config

    monkeypatch.chdir(shapes_data.parent)
    cfg = parse_args(["--data", shapes_data.name, "--model", "yolov8n.yaml"])
    assert (cfg.data, cfg.model) == (str(shapes_data), "yolov8n.yaml")
    assert parse_args([]).data == "synthetic"
    # a run saved with the relative path (before this fix) compares equal to the absolute one given from here
    argv = ["--resume", "r", "--data", shapes_data.name]
    saved = RunConfig(device="cpu", data=shapes_data.name, resume="r")
    assert resumed_config(saved, parse_args(argv), given=given_flags(argv)).data == str(shapes_data)
    monkeypatch.chdir(tmp_path)  # elsewhere, with a data.yaml of the same name
    (tmp_path / shapes_data.name).write_text(shapes_data.read_text())
    resumed = resumed_config(
        RunConfig(device="cpu", data=cfg.data, resume="r"), parse_args(["--resume", "r"]), given={"resume"}
    )
    assert resumed.data == str(shapes_data)


def test_exist_ok_into_a_run_with_checkpoints_is_refused_and_keeps_them(shapes_data, tmp_path):
    """Starting afresh there would mix two runs: a later --resume would load the old checkpoint with new settings."""
    run_dir = run_dir_with_a_checkpoint(tmp_path / "runs" / "x", f"data: {shapes_data}\nmodel: yolov8n.yaml\n")
    result = run_train(small_run_args(shapes_data, tmp_path / "runs", "x", "--exist_ok"))
    assert_one_line_error(result, "already holds a run with checkpoints", f"--resume {run_dir.resolve()}")
    assert (run_dir / "args.yaml").read_text() == f"data: {shapes_data}\nmodel: yolov8n.yaml\n"
    assert list((run_dir / "checkpoints" / "epoch1").iterdir())


def test_resume_refuses_flags_that_would_change_the_run(shapes_data, tmp_path):
    """A run dir is enough for this check (it runs before any training); the resumed flags are compared first."""
    from yolods.checkpoint import COMPLETE_MARKER

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "epoch1").mkdir(parents=True)
    (run_dir / "checkpoints" / "epoch1" / COMPLETE_MARKER).write_text('{"world_size": 1}')
    (run_dir / "args.yaml").write_text(f"data: {shapes_data}\nepochs: 3\n")
    result = run_train(["--resume", str(run_dir), "--epochs", "9", "--lr0", "0.1"])
    assert_one_line_error(result, "--epochs 9 (run has 3)", "lr0=0.1", "drop those flags")


def test_resume_hints_name_the_run_directory_and_the_default(tmp_path):
    """Ultralytics' habit `resume=weights/last.pt` points at the run directory above; a flag the saved run left at its
    default says so instead of "run has None"."""
    from yolods.checkpoint import find_resume_dir
    from yolods.config import RunConfig, given_flags, parse_args, resumed_config
    from yolods.errors import ConfigError

    run_dir = run_dir_with_a_checkpoint(tmp_path / "run", "")
    (run_dir / "weights").mkdir()
    for inside in (run_dir / "weights" / "last.pt", run_dir / "weights"):
        with pytest.raises(ConfigError, match=f"pass the run directory, --resume {re.escape(str(run_dir))}$"):
            find_resume_dir(RunConfig(resume=str(inside)))
    argv = ["--resume", str(run_dir), "--zero", "2"]
    with pytest.raises(ConfigError, match=r"--zero 2 \(run has the default\) would change the run"):
        resumed_config(RunConfig(resume=str(run_dir)), parse_args(argv), given=given_flags(argv))


def test_a_data_yaml_passed_as_the_model_is_named(tmp_path):
    from yolods.errors import ConfigError
    from yolods.model import check_model_spec

    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    with pytest.raises(ConfigError, match=r"data.yaml: not a model yaml \(it has no backbone and head\)"):
        check_model_spec(str(data_yaml))


def test_an_image_size_a_p6_model_cannot_take_is_one_line(shapes_data, tmp_path):
    """96 is a multiple of 32 but not of a P6 model's largest stride 64: a shape mismatch deep in its head before."""
    args = small_run_args(shapes_data, tmp_path / "runs", "x", "--model", "yolov8n-p6.yaml", "--imgsz", "96")
    result = run_train(args)
    assert_one_line_error(
        result, "--imgsz 96 is not a positive multiple of yolov8n-p6.yaml's largest stride 64", "--imgsz 128"
    )
    assert not (tmp_path / "runs" / "x").exists(), "a failed start left a run directory"


@pytest.mark.parametrize(
    ("ranks", "zero", "box_gain", "fragment"),
    [
        (1, "0", "3.0e+38", "the train loss became NaN or infinite in epoch 1/2"),  # ZeRO-0 applies NaN steps
        (2, "2", "1.0e+38", "every optimizer step was skipped in epoch 1/2 (non-finite gradients)"),  # loss ~1e37
    ],
)
def test_a_diverged_run_stops_in_one_line_without_saving_the_epoch(
    ranks, zero, box_gain, fragment, shapes_data, tmp_path
):
    """A loss gain of ~1e38 makes the loss or the gradients non-finite from the first step. Before, the run trained
    on, exported weights whose NaNs the export had zeroed, and exited 0 with "best epoch 2: mAP50 0.000"."""
    extra = ("--zero", zero, "--hyp", f"box={box_gain}", "--imgsz", "64")
    result = run_train(small_run_args(shapes_data, tmp_path, "x", *extra, epochs=2), nproc=ranks)
    assert_one_line_error(result, fragment, "Lower --lr0")
    if ranks == 1:  # stderr's last line, after the run's summary (under torchrun its report of the exit follows)
        assert result.stderr.rstrip().splitlines()[-1].startswith("yolods: error:"), result.stderr[-2000:]
    run_dir = tmp_path / "x"
    assert not (run_dir / "weights" / "last.pt").exists() and not (run_dir / "checkpoints").exists()


def test_a_run_directory_another_job_trains_in_is_refused_and_left_as_it_is(shapes_data, tmp_path):
    """Two jobs in one run directory (a requeue while the first still runs, a command started twice) wrote the same
    results.csv rows twice and one died on the other's weights/best.pt.tmp. The job training there holds a flock on
    RUN/.yolods.lock (here this test does); a second is refused in one line and deletes nothing of the first's."""
    import fcntl

    run_dir = tmp_path / "x"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "results.csv").write_text("epoch,time\n1,2.0\n")  # the first job's, before its first checkpoint
    with (run_dir / ".yolods.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on node7\n")
        lock.flush()
        result = run_train(small_run_args(shapes_data, tmp_path, "x", "--exist_ok"))
    assert_one_line_error(result, f"{run_dir} is in use by another yolods job (pid 4242 on node7)", "another --name")
    assert (run_dir / "results.csv").read_text() == "epoch,time\n1,2.0\n"


def test_a_resume_onto_changed_data_names_what_changed(shapes_data, tmp_path):
    """A train set that lost images since the checkpoint died in a loader worker (IndexError on the saved mosaic
    buffer), one given another class died in torch's list of mismatched shapes; both are one line now."""
    import shutil

    import yaml

    from yolods.checkpoint import COMPLETE_MARKER

    data_root = tmp_path / "data"
    shutil.copytree(shapes_data.parent, data_root, ignore=shutil.ignore_patterns("*.cache"))
    config = {**yaml.safe_load(shapes_data.read_text()), "path": str(data_root)}
    data_yaml = data_root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(config))
    assert_ok(run_train(small_run_args(data_yaml, tmp_path, "run", "--imgsz", "64", epochs=1)))
    marker = tmp_path / "run" / "checkpoints" / "epoch1" / COMPLETE_MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "finished": False}))  # as if it went on

    removed = sorted((data_root / "images" / "train").glob("*.jpg"))[:5]
    kept = {path: path.read_bytes() for path in removed}
    for path in removed:
        path.unlink()
    result = run_train(["--resume", str(tmp_path / "run")])
    assert_one_line_error(result, "the train set now has 27 usable images, 32 when the checkpoint was saved")

    for path, image in kept.items():
        path.write_bytes(image)
    data_yaml.write_text(yaml.safe_dump({**config, "names": {**config["names"], len(config["names"]): "star"}}))
    result = run_train(["--resume", str(tmp_path / "run")])
    assert_one_line_error(result, "checkpoint epoch1 does not fit the model built now", "classes (nc, names)")
