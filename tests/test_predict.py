"""yolods.predict: real 2-rank jobs predict every image and frame once, with Ultralytics' boxes; resume, unreadable
images, a failing rank and bad input."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, assert_ok, run_module, torchrun_command, train_env
from test_errors import assert_one_line_error

from yolods.errors import ConfigError

BATCH = 2


def predict_args(assets, project: Path, name: str, *extra: str, source: Path | None = None) -> list[str]:
    source = source or assets.source
    common = ["--model", str(assets.weights), "--source", str(source), "--batch", str(BATCH)]
    return [*common, "--project", str(project), "--name", name, *extra]


def record_counts(run_dir: Path) -> collections.Counter:
    """How often each image or frame has a complete record, over every rank's file."""
    counts = collections.Counter()
    for path in run_dir.glob("predictions_rank*.jsonl"):
        lines = path.read_text().splitlines(keepends=True)
        records = [json.loads(line) for line in lines if line.endswith("\n")]
        counts.update(record["key"] for record in records if "key" in record)
    return counts


@pytest.fixture(scope="module")
def two_rank_run(inference_assets, tmp_path_factory) -> Path:
    """9 images of mixed shapes and a 7-frame video, batch 2: 9 batches, 5 on rank 0 (the images), 4 on rank 1."""
    project = tmp_path_factory.mktemp("predict")
    result = run_module("yolods.predict", predict_args(inference_assets, project, "two", "--save"), nproc=2)
    assert_ok(result)
    (project / "two" / "predict.log").write_text(result.stdout + result.stderr)
    return project / "two"


@pytest.mark.multirank
def test_every_image_and_frame_once_with_ultralytics_boxes(two_rank_run, inference_assets, tmp_path):
    from ultralytics import YOLO

    counts = record_counts(two_rank_run)
    assert len(counts) == 9 + 7 and set(counts.values()) == {1}
    assert {path.name for path in two_rank_run.glob("predictions_rank*.jsonl")} == {
        "predictions_rank0.jsonl",
        "predictions_rank1.jsonl",
    }
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert [rank["images"] for rank in summary["per_rank"]] == [9, 7]
    assert "img/s" in (two_rank_run / "predict.log").read_text()

    # Ultralytics on one process, same source and batch, writing its own label files to compare with ours.
    with contextlib.redirect_stdout(io.StringIO()):
        expected = list(
            YOLO(str(inference_assets.weights)).predict(
                source=str(inference_assets.source),
                batch=BATCH,
                save_txt=True,
                save_conf=True,
                project=str(tmp_path),
                name="ultralytics",
                stream=True,
                verbose=False,
            )
        )
    assert len(expected) == 16 and sum(len(result.boxes) for result in expected) > 50
    ours = {path.name: path.read_text() for path in (two_rank_run / "labels").glob("*.txt")}
    theirs = {path.name: path.read_text() for path in (tmp_path / "ultralytics" / "labels").glob("*.txt")}
    assert ours == theirs  # same files (clip_1.txt ... for frames), same boxes, classes and scores to the digit

    detections = json.loads((two_rank_run / "predictions.json").read_text())
    assert len(detections) == sum(len(result.boxes) for result in expected)
    assert {"image_id", "category_id", "bbox", "score"} == set(detections[0])
    assert len(list(two_rank_run.glob("*.jpg"))) == 9 and len(list((two_rank_run / "clip_frames").glob("*.jpg"))) == 7


def test_a_rerun_skips_what_is_done(two_rank_run, inference_assets, tmp_path):
    """Lose the last records of both ranks (one cut mid-line), rerun on one rank: only those images are redone."""
    run_dir = tmp_path / "two"
    shutil.copytree(two_rank_run, run_dir)
    (run_dir / "predictions.json").unlink()
    rank0 = run_dir / "predictions_rank0.jsonl"
    kept = "".join(rank0.read_text().splitlines(keepends=True)[:4])  # 2 batches of 2 images kept
    rank0.write_text(kept + '{"not": "a record yolods wrote"}\n')  # skipped when read back
    rank1 = run_dir / "predictions_rank1.jsonl"
    rank1.write_bytes(rank1.read_bytes()[:-20])  # a record cut off by a kill: its batch is redone
    result = run_module("yolods.predict", predict_args(inference_assets, tmp_path, "two", "--save", "--exist_ok"))
    assert_ok(result)
    assert "10 done by an earlier run, skipped" in result.stderr  # 4 images + 3 whole video batches (6 frames)
    assert set(record_counts(run_dir).values()) == {1}
    assert (run_dir / "predictions.json").read_text() == (two_rank_run / "predictions.json").read_text()

    changed = run_module(
        "yolods.predict", predict_args(inference_assets, tmp_path, "two", "--save", "--exist_ok", "--conf", "0.5")
    )
    assert_one_line_error(changed, "other settings (conf=default; now conf=0.5)", "another --name")

    (run_dir / "predict_args.json").write_text('{"conf": ')  # cut off
    damaged = run_module("yolods.predict", predict_args(inference_assets, tmp_path, "two", "--save", "--exist_ok"))
    assert_one_line_error(damaged, "predict_args.json is damaged", "another --name")


def test_an_unreadable_image_is_skipped_and_listed(inference_assets, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for image in sorted(inference_assets.images.glob("*.jpg"))[:2]:
        shutil.copy(image, source)
    (source / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_module("yolods.predict", predict_args(inference_assets, tmp_path, "run", source=source))
    assert_ok(result)
    assert "cannot read" in result.stderr and "1 unreadable, skipped" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["unreadable"] == [str(source / "broken.jpg")] and summary["predicted_now"] == 2
    for image in source.iterdir():  # nothing readable left: an error, not an empty result
        if image.name != "broken.jpg":
            image.unlink()
    result = run_module("yolods.predict", predict_args(inference_assets, tmp_path, "none", source=source))
    assert_one_line_error(result, f"--source {source}: none of its 1 files could be read", "OpenCV can decode")


@pytest.mark.multirank
def test_an_error_on_one_rank_ends_the_job(inference_assets, tmp_path):
    probe = REPO / "tests" / "predict_fault_probe.py"
    command = [*torchrun_command(2), str(probe), "1", "2", "--", *predict_args(inference_assets, tmp_path, "x")]
    started = time.time()
    process = subprocess.Popen(command, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0, output[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, "processes left running"
    assert time.time() - started < 90
    errors = [line for line in output.splitlines() if line.startswith("yolods: rank 1: error:")]
    assert len(errors) == 1 and "injected" in errors[0], output[-3000:]


def test_bad_input_is_refused_before_any_work(inference_assets, tmp_path):
    from yolods.predict import plan_prediction

    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes.txt"  # a .txt source is a list of paths to Ultralytics, not a file to predict on
    notes.write_text("remember the milk\n")
    weights = str(inference_assets.weights)
    deepspeed_file = tmp_path / "mp_rank_00_model_states.pt"  # what a run's checkpoints/epochN/ holds
    deepspeed_file.write_bytes(b"not Ultralytics weights")
    cases = {
        "no such file or directory": ["--model", weights, "--source", str(tmp_path / "missing")],
        "No images or videos found": ["--model", weights, "--source", str(empty)],
        "weights file not found": ["--model", str(tmp_path / "best.pt"), "--source", str(empty)],
        "streams, webcams and URLs": ["--model", weights, "--source", "rtsp://camera/1"],
        "list of image and video paths, one per line, and remember the milk does not exist": [
            "--model",
            weights,
            "--source",
            str(notes),
        ],
        "both given": ["--model", weights, "--source", str(empty), "--half", "--bf16"],
        "the model has classes 0-2": ["--model", weights, "--source", str(inference_assets.source), "--classes", "5"],
        "a file of a DeepSpeed checkpoint, not weights; pass the run's weights/best.pt": [
            "--model",
            str(deepspeed_file),
            "--source",
            str(empty),
        ],
        "expected trained weights": ["--model", str(inference_assets.images / "x.jpg"), "--source", str(empty)],
        "--line_width -3: use a width in pixels from 1": [
            "--model",
            weights,
            "--source",
            str(empty),
            "--line_width",
            "-3",
        ],
        "--line_width 100000": ["--model", weights, "--source", str(empty), "--line_width", "100000"],
    }
    for fragment, argv in cases.items():
        with pytest.raises(ConfigError, match=fragment):
            plan_prediction(argv)
    result = run_module("yolods.predict", ["--model", weights, "--source", str(empty)])
    assert result.returncode == 2
    assert_one_line_error(result, str(empty), "No images or videos found")


def test_output_names_never_collide():
    """Label files and predictions.json's image_id stay one per image or frame: same stems in two folders, an image
    named like a video's frame (clip_1.jpg and clip.avi's frame 1), numeric stems naming one COCO id (1 and 001)."""
    from yolods.prediction import SourceListing, coco_image_id, output_bases, output_names

    listing = SourceListing(
        images=("a/001.jpg", "a/1.jpg", "a/clip_1.jpg", "b/clip_1.png", "a/img.jpg"),
        videos=(("a/clip.avi", 3),),
    )
    bases = output_bases(listing)
    assert bases == {
        "a/001.jpg": "001",
        "a/1.jpg": "1-2",
        "a/clip_1.jpg": "clip_1",
        "b/clip_1.png": "clip_1-2",
        "a/img.jpg": "img",
        "a/clip.avi": "clip-2",
    }
    names = [*(bases[image] for image in listing.images), *output_names(bases["a/clip.avi"], 3)]
    assert len({coco_image_id(name) for name in names}) == len(names) == 8
    assert coco_image_id("000000139") == 139  # COCO's numeric file names keep their numeric ids


def test_a_broken_video_is_skipped_wherever_it_sorts(inference_assets, tmp_path):
    """Ultralytics' loader opens the first video while listing: a broken one sorting first failed the source."""
    from yolods.prediction import list_source

    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(inference_assets.video, source / "z_clip.avi")
    (source / "a_broken.mp4").write_bytes(b"")  # a zero-byte download, say
    shutil.copy(sorted(inference_assets.images.glob("*.jpg"))[0], source / "image.jpg")
    listing = list_source(str(source))
    assert listing.images == (str(source / "image.jpg"),)
    assert [(Path(video).name, frames > 0) for video, frames in listing.videos] == [
        ("a_broken.mp4", False),
        ("z_clip.avi", True),
    ]
    result = run_module("yolods.predict", predict_args(inference_assets, tmp_path, "run", source=source))
    assert_ok(result)
    assert f"1 unreadable, skipped: {source / 'a_broken.mp4'}" in result.stderr

    with pytest.raises(ConfigError, match=r"OpenCV cannot open .*a_broken\.mp4, and there is nothing else"):
        list_source(str(source / "a_broken.mp4"))
    listed_twice = tmp_path / "list.txt"  # predicted once, under its own name (not as image and image-2)
    listed_twice.write_text("\n".join(str(source / name) for name in ("image.jpg", "z_clip.avi", "image.jpg")))
    listing = list_source(str(listed_twice))
    assert (listing.images, [video for video, _ in listing.videos]) == (
        (str(source / "image.jpg"),),
        [str(source / "z_clip.avi")],
    )
