"""End-to-end training through the real DeepSpeed engine: 2 ranks over gloo, real Ultralytics models and data."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import IMGSZ, assert_ok, run_train, small_run_args

pytestmark = pytest.mark.multirank

LOSSES = ("train/box_loss", "train/cls_loss", "train/dfl_loss")


def read_results(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "results.csv").open() as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


def total_train_loss(row: dict[str, float]) -> float:
    return sum(row[name] for name in LOSSES)


def assert_weights_load_and_validate(weights: Path, data_yaml: Path, *, num_classes: int) -> None:
    from ultralytics import YOLO

    model = YOLO(str(weights))
    assert len(model.names) == num_classes
    metrics = model.val(data=str(data_yaml), imgsz=IMGSZ, batch=8, device="cpu", plots=False, verbose=False, workers=0)
    assert 0.0 <= metrics.box.map50 <= 1.0
    val_images = Path(yaml.safe_load(data_yaml.read_text())["path"]) / "images" / "val"
    predictions = model.predict(next(val_images.glob("*.jpg")), imgsz=IMGSZ, verbose=False)
    assert len(predictions) == 1


@pytest.mark.parametrize("zero_stage", [0])  # ZeRO-2 and 3: the bf16 configs below; ZeRO-1 shares ZeRO-2's optimizer
def test_two_ranks_train_at_every_zero_stage(zero_stage, shapes_data, projects):
    name = f"zero{zero_stage}"
    shm_buffers = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    assert_ok(run_train(small_run_args(shapes_data, projects, name, "--zero", str(zero_stage)), nproc=2))
    # DeepSpeed maps this buffer when it loads its shared-memory comm op, which yolods leaves out (yolods.dist)
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_buffers
    run_dir = projects / name
    rows = read_results(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert total_train_loss(rows[-1]) < total_train_loss(rows[0])
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == zero_stage
    assert_weights_load_and_validate(run_dir / "weights" / "best.pt", shapes_data, num_classes=3)


def assert_ema_followed_the_partitioned_model(run_dir: Path) -> None:
    """Under ZeRO-3 the EMA must be updated from gathered parameters, not left at the initial weights.

    After a handful of updates the EMA's decay is ~0, so the exported EMA sits next to the trained weights
    (consolidated from the ZeRO-3 shards) and far from where training started.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import init_seeds

    trained = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))
    ema = torch.load(run_dir / "weights" / "last.pt", weights_only=False)["ema"].float().state_dict()
    init_seeds(0)  # yolods seeds rank 0 with --seed (0) before building the model
    initial = DetectionModel("yolov8n.yaml", nc=3, verbose=False).state_dict()
    names = [name for name in trained if name.endswith(".weight") and trained[name].ndim == 4]
    with torch.no_grad():  # the consolidated ZeRO-3 tensors still require grad
        ema_to_trained = sum(float((ema[n] - trained[n]).norm()) for n in names)
        initial_to_trained = sum(float((initial[n] - trained[n]).norm()) for n in names)
    assert initial_to_trained > 0 and ema_to_trained < 0.2 * initial_to_trained, (ema_to_trained, initial_to_trained)


def test_zero2_run_outputs(zero2_run, shapes_data):
    rows = read_results(zero2_run)
    assert total_train_loss(rows[-1]) < total_train_loss(rows[0])
    config = json.loads((zero2_run / "ds_config.json").read_text())
    # global batch 8 = 4 per rank x 2 ranks; nbs 8: no accumulation
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["train_batch_size"] == 4 * 2 * config["gradient_accumulation_steps"]
    assert config["gradient_clipping"] == 10.0
    assert (zero2_run / "args.yaml").is_file()
    checkpoints = zero2_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("epoch*")) == ["epoch2", "epoch3"]  # the two newest are kept
    assert (checkpoints / "latest").read_text().strip() == "epoch3"
    assert_weights_load_and_validate(zero2_run / "weights" / "last.pt", shapes_data, num_classes=3)


@pytest.mark.parametrize("config", ["zero2_bf16.json", "zero3_bf16.json"])
def test_bf16_autocast_configs_train(config, shipped_config_run, shapes_data):
    run_dir = shipped_config_run(config)
    rows = read_results(run_dir)
    assert total_train_loss(rows[-1]) < total_train_loss(rows[0])
    assert json.loads((run_dir / "ds_config.json").read_text())["torch_autocast"]["dtype"] == "bfloat16"
    assert_weights_load_and_validate(run_dir / "weights" / "best.pt", shapes_data, num_classes=3)
    if config.startswith("zero3"):
        assert_ema_followed_the_partitioned_model(run_dir)


def test_deepspeed_bf16_section_runs(shapes_data, projects, tmp_path):
    """A user's own config with DeepSpeed's `bf16` section (not torch_autocast) must also train."""
    config = tmp_path / "user_bf16.json"
    config.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    assert_ok(
        run_train(
            small_run_args(shapes_data, projects, "user_bf16", "--deepspeed_config", str(config), epochs=1), nproc=2
        )
    )
    assert_weights_load_and_validate(projects / "user_bf16" / "weights" / "last.pt", shapes_data, num_classes=3)


def test_finetune_from_produced_weights_adapts_classes(zero2_run, shapes_data, projects, tmp_path):
    """--model best.pt on a data set with 5 class names: the head is rebuilt for 5 classes, training runs."""
    data = yaml.safe_load(shapes_data.read_text())
    data["names"] = {i: f"class{i}" for i in range(5)}
    five_class_yaml = tmp_path / "five.yaml"
    five_class_yaml.write_text(yaml.safe_dump(data))
    weights = zero2_run / "weights" / "best.pt"
    assert_ok(run_train(small_run_args(five_class_yaml, projects, "finetune", "--model", str(weights), epochs=1)))
    assert_weights_load_and_validate(projects / "finetune" / "weights" / "last.pt", five_class_yaml, num_classes=5)


def test_default_run_with_no_arguments(tmp_path):
    """`python -m yolods.train` alone: synthetic shapes, yolov8n; it learns visibly, says where its results are,
    and prints none of the libraries' noise. Only --epochs is given, 5 of the default 10, to keep the suite inside
    15 minutes: the whole default takes about 100 s here and reached mAP50 0.81 (2026-11-29; 0.45 after 5 epochs)."""
    result = run_train(["--epochs", "5"], cwd=tmp_path)  # as a user runs it: every core
    assert_ok(result)
    output = result.stdout + result.stderr
    run_dir = (tmp_path / "runs" / "train" / "exp").resolve()
    rows = read_results(run_dir)
    assert len(rows) == 5
    assert rows[-1]["metrics/mAP50(B)"] >= 0.3, rows[-1]  # the demo proves itself (0.45 after 5 epochs)
    assert (run_dir / "weights" / "best.pt").is_file()
    assert "5/5 epochs completed in" in output and f"best.pt      {run_dir}/weights/best.pt" in output, output[-2000:]
    assert f"tensorboard --logdir {run_dir}" in output
    for noise in ("Setting accelerator", "CUDA_HOME", "built successfully", "ultralytics.nn.modules.conv.Conv"):
        assert noise not in output, noise


def test_corrupt_image_is_skipped_with_a_warning(shapes_data, projects, tmp_path):
    data_root = tmp_path / "corrupt"
    shutil.copytree(shapes_data.parent, data_root)
    (data_root / "labels" / "train.cache").unlink(missing_ok=True)
    (data_root / "images" / "train" / "000000.jpg").write_bytes(b"not a jpeg")
    data = yaml.safe_load(shapes_data.read_text())
    data["path"] = str(data_root)
    data_yaml = data_root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data))
    result = run_train(small_run_args(data_yaml, projects, "corrupt", epochs=1))
    assert_ok(result)
    assert "000000.jpg" in result.stdout + result.stderr and "corrupt" in (result.stdout + result.stderr).lower()
    assert (projects / "corrupt" / "weights" / "last.pt").is_file()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_freeze_keeps_the_first_layers_as_loaded(zero_stage, zero2_run, shapes_data, projects):
    """Ultralytics' `freeze=10` when fine-tuning: the backbone's weights stay as loaded, the head trains, at ZeRO-0
    (the optimizer skips parameters without gradients) and ZeRO-3 (DeepSpeed partitions only trained ones)."""
    import torch

    source = zero2_run / "weights" / "best.pt"
    name = f"freeze_zero{zero_stage}"
    args = small_run_args(
        shapes_data, projects, name, "--model", str(source), "--zero", str(zero_stage), "--hyp", "freeze=10", epochs=1
    )
    assert_ok(run_train(args, nproc=2))

    def parameters(weights: Path) -> dict[str, torch.Tensor]:
        model = torch.load(weights, map_location="cpu", weights_only=False)["ema"]
        return {name: tensor.float() for name, tensor in model.named_parameters()}

    before, after = parameters(source), parameters(projects / name / "weights" / "last.pt")
    frozen = [key for key in before if int(key.split(".")[1]) < 10]
    trained = [key for key in before if int(key.split(".")[1]) >= 10 and ".dfl" not in key]
    assert frozen and trained
    # the EMA of a constant is that constant, up to the rounding of its update
    assert max((after[key] - before[key]).abs().max().item() for key in frozen) < 1e-6
    assert max((after[key] - before[key]).abs().max().item() for key in trained) > 1e-3


def test_single_cls_trains_one_class_named_item(shapes_data, projects):
    """Ultralytics' `single_cls`: every box is class 0, the head has one class, and the weights call it 'item'."""
    args = small_run_args(shapes_data, projects, "single_cls", "--hyp", "single_cls=True", epochs=1)
    assert_ok(run_train(args))
    from ultralytics import YOLO

    model = YOLO(str(projects / "single_cls" / "weights" / "last.pt"))
    assert model.names == {0: "item"}
    metrics = model.val(data=str(shapes_data), imgsz=IMGSZ, batch=8, device="cpu", plots=False, single_cls=True)
    assert 0.0 <= metrics.box.map50 <= 1.0 and len(metrics.box.ap_class_index) <= 1


def test_fp16_at_zero2_lowers_the_loss_scale_and_clips_as_zero0_does(shapes_data, tmp_path):
    """Two DeepSpeed 0.19.8 faults of fp16 autocast at ZeRO 1-3, each of which yolods works around.

    It skips a step whose gradients overflowed without lowering the GradScaler's scale, so every later step overflowed
    too and the run trained nothing: yolods backs the scale off as torch's GradScaler does, and the scale follows
    ZeRO-0's step for step. It clips the still-scaled gradients at `gradient_clipping`: yolods scales the threshold,
    so ZeRO-2 clips at 10 as ZeRO-0 does and takes ZeRO-0's steps (SGD, whose step grows with the gradient; run
    unclipped, ZeRO-2's box loss a step later was 4.5% off ZeRO-0's and its gradient norm 13%)."""
    from test_metrics import scalars

    series = {}
    for zero in ("0", "2"):
        extra = ("--zero", zero, "--precision", "fp16", "--optimizer", "SGD", "--imgsz", "64")  # 64 px: 4x faster
        assert_ok(run_train(small_run_args(shapes_data, tmp_path, f"z{zero}", *extra, epochs=2)))
        series[zero] = {
            tag: [event.value for event in events] for tag, events in scalars(tmp_path / f"z{zero}").items()
        }
    scales = series["2"]["train/loss_scale"]
    assert scales == series["0"]["train/loss_scale"] and min(scales) < max(scales)  # overflowed, then backed off
    norms = {zero: series[zero]["train/grad_norm"] for zero in series}
    first_applied = next(i for i, norm in enumerate(norms["0"]) if math.isfinite(norm))
    assert norms["2"][first_applied] == pytest.approx(norms["0"][first_applied], rel=1e-3)
    assert norms["0"][first_applied] > 10 * 10  # so the first step applied was clipped, by a factor over 10
    after = slice(first_applied + 1, first_applied + 3)  # the steps that follow the clipped one
    assert series["2"]["train/box_loss"][after] == pytest.approx(series["0"]["train/box_loss"][after], rel=2e-3)


def test_fp16_scale_grows_once_per_growth_interval_of_steps_under_zero():
    """DeepSpeed 0.19.8 updates the GradScaler once per parameter group: with 3 groups and an interval of 2 the scale
    grew to 512 in 6 steps (2, 8, 16, 64, 128, 512), and mid-step, between groups. yolods counts steps instead."""
    import subprocess
    import sys

    from conftest import free_port, train_env

    probe = [sys.executable, str(Path(__file__).with_name("grad_scaler_probe.py")), "--zero", "1,2,3"]
    result = subprocess.run(
        [*probe, "--port", str(free_port())], env=train_env(), capture_output=True, text=True, timeout=180
    )
    assert_ok(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("scales ")]
    assert [line.split(":", 1)[0] for line in lines] == ["scales 1", "scales 2", "scales 3"]
    for line in lines:
        assert json.loads(line.split(":", 1)[1]) == [1.0, 2.0, 2.0, 4.0, 4.0, 8.0], line


def test_val_losses_over_more_ranks_than_val_images_are_those_of_one_rank(shapes_data, tmp_path):
    """One val image on 2 ranks: rank 1's shard is empty. The val losses are the mean over the ranks' batches, so
    they match the 1-rank run's (a mean of the ranks' means halved them: 0.198 against 0.397). Weights frozen (lr 0)
    and each global batch split as at 1 rank (--paired_data), so that only the number of ranks differs."""
    config = yaml.safe_load(shapes_data.read_text())
    one_image = tmp_path / "val.txt"
    one_image.write_text(f"{sorted((Path(config['path']) / config['val']).iterdir())[0]}\n")
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({**config, "val": str(one_image)}))
    frozen = ("--optimizer", "SGD", "--lr0", "0", "--momentum", "0", "--weight_decay", "0", "--paired_data")
    frozen += ("--hyp", "warmup_bias_lr=0", "--imgsz", "64")
    losses = {}
    for ranks in (1, 2):
        assert_ok(run_train(small_run_args(data_yaml, tmp_path, f"on{ranks}", *frozen, epochs=1), nproc=ranks))
        row = read_results(tmp_path / f"on{ranks}")[-1]
        losses[ranks] = [row[f"val/{name}"] for name in ("box_loss", "cls_loss", "dfl_loss")]
    assert losses[2] == pytest.approx(losses[1], rel=0.01)


def test_grayscale_data_trains_a_one_channel_model_that_predicts_like_ultralytics(shapes_data, tmp_path):
    """data.yaml `channels: 1`: the images load as grayscale, so the model's first layer must take one channel (as
    Ultralytics' trainer builds it), and yolods.predict must read images as Ultralytics reads them for that model."""
    from conftest import run_module
    from ultralytics import YOLO

    gray_yaml = tmp_path / "gray.yaml"
    gray_yaml.write_text(shapes_data.read_text() + "\nchannels: 1\n")  # its path: is absolute
    assert_ok(run_train(small_run_args(gray_yaml, tmp_path, "gray", epochs=1)))
    best = tmp_path / "gray" / "weights" / "best.pt"
    model = YOLO(str(best))
    assert model.model.yaml["channels"] == 1 and model.model.model[0].conv.in_channels == 1

    val_images = shapes_data.parent / "images" / "val"
    settings = ["--imgsz", str(IMGSZ), "--conf", "0.001"]
    assert_ok(
        run_module(
            "yolods.predict",
            ["--model", str(best), "--source", str(val_images), *settings, "--project", str(tmp_path / "pred")],
        )
    )
    ours = json.loads((tmp_path / "pred" / "exp" / "predictions.json").read_text())
    theirs = model.predict(str(val_images), imgsz=IMGSZ, conf=0.001, verbose=False)
    assert len(ours) == sum(len(result.boxes) for result in theirs) > 0


def test_verbose_adds_deepspeed_info_lines_and_the_layer_table(shapes_data, zero2_run, tmp_path):
    """README: `--verbose` adds Ultralytics' layer table and DeepSpeed's own messages. DeepSpeed's logger starts at
    WARNING, so before `show_deepspeed_info_messages` the flag added the table alone."""
    result = run_train(small_run_args(shapes_data, tmp_path, "verbose", "--verbose", epochs=1))
    assert_ok(result)
    output = result.stdout + result.stderr
    assert "DeepSpeed info: version=" in output and "[INFO]" in output
    assert "params  module" in output  # Ultralytics' layer table
    assert "[INFO]" not in (zero2_run / "train.log").read_text()  # without the flag: neither
