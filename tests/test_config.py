"""Batch arithmetic and DeepSpeed config resolution: one-line errors naming both values."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from yolods.config import (
    ConfigError,
    RunConfig,
    default_deepspeed_config,
    parse_args,
    parse_hyp_overrides,
    resolve_deepspeed_config,
    resolve_run,
)

DS_CONFIGS = Path(__file__).parents[1] / "ds_configs"


def resolve(world_size: int = 2, nbs: int = 64, **fields):
    return resolve_deepspeed_config(RunConfig(device="cpu", **fields), world_size=world_size, nbs=nbs)


def test_global_batch_splits_into_micro_batches_and_accumulation():
    config, plan = resolve(world_size=4, batch=32, batch_from_flag=True)
    assert (plan.micro_batch, plan.accumulate, plan.global_batch) == (8, 2, 32)  # round(64 / 32) = 2
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 64


def test_batch_that_does_not_split_names_both_values_and_a_fix():
    with pytest.raises(ConfigError, match=r"--batch 10 does not split over 4 ranks.*--batch 8"):
        resolve(world_size=4, batch=10, batch_from_flag=True)


def test_micro_batch_from_the_config_when_no_batch_flag(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 12}))
    _, plan = resolve(world_size=2, deepspeed_config=str(path))
    assert plan.global_batch == 24


@pytest.mark.parametrize(
    ("content", "flags", "pattern"),
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            {"batch": 16, "batch_from_flag": True},
            r"--batch 16 gives 8 images per rank.*train_micro_batch_size_per_gpu=4",
        ),
        ({"zero_optimization": {"stage": 1}}, {"zero": 3}, r"--zero 3 disagrees with zero_optimization.stage=1"),
        ({"bf16": {"enabled": True}}, {"precision": "fp16"}, r"--precision fp16 disagrees .* bf16"),
        ({"train_batch_size": 100}, {"batch": 16, "batch_from_flag": True}, r"train_batch_size=100 .* = 64"),
        ({"optimizer": {"type": "Adam"}}, {}, r"defines an optimizer"),
        (
            {"zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": 3000}},
            {},
            r"stage3_module_granularity_threshold=3000 .* fails at the first backward",
        ),
    ],
)
def test_config_that_disagrees_with_flags(tmp_path, content, flags, pattern):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=pattern):
        resolve(deepspeed_config=str(path), **flags)


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        resolve(deepspeed_config=str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{ nope")
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        resolve(deepspeed_config=str(broken))


def test_user_bf16_section_gets_matching_buffers(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    config, _ = resolve(deepspeed_config=str(path))
    assert config["data_types"]["buffer_dtype"] == "bf16"
    assert config["gradient_clipping"] == 10.0  # Ultralytics' max_norm, not DeepSpeed's 1.0


@pytest.mark.parametrize(
    ("name", "stage", "precision"),
    [
        ("zero0_fp32", 0, "fp32"),
        ("zero1_bf16", 1, "bf16"),
        ("zero2_bf16", 2, "bf16"),
        ("zero2_fp16", 2, "fp16"),
        ("zero3_bf16", 3, "bf16"),
    ],
)
def test_shipped_configs_are_the_defaults(name, stage, precision):
    """ds_configs/*.json and the embedded defaults hold the same numbers (ds_configs/README.md explains them)."""
    assert json.loads((DS_CONFIGS / f"{name}.json").read_text()) == default_deepspeed_config(
        zero_stage=stage, precision=precision
    )


def test_cpu_defaults_drop_the_overlap_deepspeeds_cpu_accelerator_cannot_give():
    """No side streams on CPU, so nothing to overlap: no gradient hooks at ZeRO-1, no bucket copies at ZeRO-1/2."""
    for stage in (1, 2):
        zero = resolve(zero=stage, batch=16, world_size=2)[0]["zero_optimization"]
        assert not zero["overlap_comm"] and not zero["contiguous_gradients"]
        # ZeRO-1 reduces after backward in one bucket; ZeRO-2 keeps freeing gradients bucket by bucket
        assert (zero["reduce_bucket_size"] > 68_000_000) == (stage == 1)  # yolov8x's parameters
    zero3 = resolve(zero=3, batch=16, world_size=2)[0]["zero_optimization"]
    assert zero3 == default_deepspeed_config(zero_stage=3, precision="fp32")["zero_optimization"]
    for stage in (1, 2):  # the shipped files, and CUDA runs, keep the GPU settings
        cuda = default_deepspeed_config(zero_stage=stage, precision="bf16")["zero_optimization"]
        assert cuda["overlap_comm"] and cuda["contiguous_gradients"]


def test_offload_config_differs_from_zero2_only_by_offload():
    offload = json.loads((DS_CONFIGS / "zero2_offload_bf16.json").read_text())
    assert offload["zero_optimization"].pop("offload_optimizer") == {"device": "cpu", "pin_memory": True}
    assert offload.pop("zero_force_ds_cpu_optimizer") is False
    assert offload == default_deepspeed_config(zero_stage=2, precision="bf16")


def test_buckets_split_even_the_smallest_yolo():
    """DeepSpeed's 5e8-element default bucket holds a whole YOLO, so nothing overlaps with backward."""
    zero = default_deepspeed_config(zero_stage=2, precision="bf16")["zero_optimization"]
    yolov8n_params = 3_011_433
    assert zero["reduce_bucket_size"] < yolov8n_params and zero["overlap_comm"]


def test_hyp_settings_yolods_implements_or_leaves_at_their_default_are_accepted():
    hyp = parse_args(["--hyp", "freeze=10", "--hyp", "single_cls=True", "--hyp", "amp=True", "--hyp", "val=True"]).hyp
    assert hyp == {"freeze": 10, "single_cls": True, "amp": True, "val": True}
    # yolods.val hands its settings to Ultralytics' validator, which implements them: rect is a val setting there
    assert parse_hyp_overrides(["rect=False", "split=test"]) == {"rect": False, "split": "test"}
    with pytest.raises(ConfigError, match=r"--lr0 0\.02 and --hyp lr0=0\.5 disagree: pass one of them"):
        parse_args(["--lr0", "0.02", "--hyp", "lr0=0.5"])  # the flag won without a word
    # read as Ultralytics' `yolo KEY=VALUE` reads them: YAML 1.1 took 1e-3 for a string, and the run was refused
    assert parse_hyp_overrides(["box=1e-3", "freeze=[0, 30]", "val=true"]) == {
        "box": 1e-3,
        "freeze": [0, 30],
        "val": True,
    }
    # values that leave an unimplemented setting off, as its default does in Ultralytics' trainer
    off = parse_args(["--hyp", "time=0", "--hyp", "save_period=0", "--hyp", "pretrained=False"]).hyp
    assert off == {"time": 0, "save_period": 0, "pretrained": False}
    # --fraction as Ultralytics reads it: an image count stays a count (16.0 was refused as "invalid")
    assert [parse_args(["--fraction", text]).hyp["fraction"] for text in ("16", "0.5", "1")] == [16, 0.5, 1.0]


def test_parse_args_defaults_for_synthetic_and_real_data():
    synthetic = parse_args([])
    assert (synthetic.data, synthetic.epochs, synthetic.imgsz, synthetic.batch) == ("synthetic", 10, 128, 16)
    real = parse_args(["--data", "coco.yaml", "--local_rank=3"])
    assert (real.epochs, real.imgsz) == (100, 640)


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--zero", "5"], "--zero 5"),
        (["--precision", "fp8"], "fp8"),
        (["--hyp", "mosiac=0.5"], "mosiac"),
        (["--batch", "0"], "--batch 0"),
        # Ultralytics settings yolods would silently ignore: its own flag, or only Ultralytics' trainer implements it
        (["--hyp", "epochs=3"], r"--hyp epochs=3: yolods reads this from its own flag; pass --epochs"),
        (["--hyp", "amp=False"], r"--hyp amp=False is not supported: set the precision with --precision"),
        (["--hyp", "rect=True"], "rectangular training batches are not implemented"),
        (["--hyp", "multi_scale=0.5"], "multi-scale training is not implemented"),
        (["--hyp", "save_json=True"], r"yolods.val writes predictions.json: .*--save_json"),
        (["--hyp", "pretrained=False", "--model", "best.pt"], "or a model yaml to start from scratch"),
        (["--batch", "-1"], r"AutoBatch \(-1 or a memory fraction\) is not implemented"),
        # argparse's own mistakes, in one line with the fix; a flag is never abbreviated (--epoch trained 3 epochs)
        (["epochs=3"], r"unrecognized arguments: epochs=3; pass epochs=3 as --epochs 3 \(yolods takes flags"),
        (["mosaic=0"], r"pass mosaic=0 as --hyp mosaic=0"),
        (["nosuch=1"], r"nosuch is neither a flag of python -m yolods.train nor an Ultralytics setting"),
        (["--epoch", "3"], r"unrecognized arguments: --epoch 3; did you mean --epochs"),
        (["--batch", "x"], r"argument --batch: invalid int value: 'x'"),
        (["--fraction", "half"], r"argument --fraction: 'half' is neither an image count \(16\) nor a share \(0.5\)"),
    ],
)
def test_bad_flags(argv, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_args(argv)


def test_a_named_musgd_is_refused_under_zero_1_to_3():
    """`auto` falls back to SGD there (Muon cannot orthogonalise flat partitions); a MuSGD the user named was
    replaced by SGD(lr0=0.01) without a word."""
    for zero in (1, 2, 3):
        with pytest.raises(ConfigError, match=f"--optimizer MuSGD needs --zero 0: .* ZeRO-{zero} optimises flat"):
            resolve_run(parse_args(["--optimizer", "MuSGD", "--zero", str(zero), "--device", "cpu"]), world_size=2)
    assert resolve_run(parse_args(["--optimizer", "musgd", "--device", "cpu"]), world_size=2).hyp.optimizer == "musgd"


def test_fp16_autocast_clips_at_every_stage_as_asked(tmp_path):
    """fp16 at ZeRO 1-3 clips at Ultralytics' 10 like every other precision (TrainStep scales DeepSpeed's threshold by
    the loss scale); a file's own threshold is taken as written."""
    for zero in (0, 1, 2, 3):
        assert resolve(zero=zero, precision="fp16")[0]["gradient_clipping"] == 10.0
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 1.0, "torch_autocast": {"enabled": True, "dtype": "float16"}}))
    assert resolve(zero=1, deepspeed_config=str(path))[0]["gradient_clipping"] == 1.0


def test_deepspeed_monitors_write_beside_yolods_logs(tmp_path):
    from yolods.config import place_monitor_outputs

    config = {"tensorboard": {"enabled": True}, "csv_monitor": {"enabled": True, "output_path": "/elsewhere"}}
    place_monitor_outputs(config, tmp_path)
    assert config["tensorboard"] == {
        "enabled": True,
        "output_path": str(tmp_path / "deepspeed"),
        "job_name": "tensorboard",
    }
    assert config["csv_monitor"]["output_path"] == "/elsewhere"  # the user's choice stands


def test_resume_finds_the_newest_run_with_a_checkpoint(tmp_path):
    import os

    from yolods.checkpoint import COMPLETE_MARKER, find_resume_dir

    for age_s, name in ((200, "old"), (100, "new")):
        (tmp_path / name / "checkpoints" / "epoch1").mkdir(parents=True)
        (tmp_path / name / "args.yaml").write_text("{}")
        marker = tmp_path / name / "checkpoints" / "epoch1" / COMPLETE_MARKER
        marker.write_text('{"world_size": 1}')
        os.utime(marker, (marker.stat().st_atime - age_s, marker.stat().st_mtime - age_s))
    # a newer run whose only checkpoint never completed (no marker) is not resumable
    (tmp_path / "unfinished" / "checkpoints" / "epoch1").mkdir(parents=True)
    (tmp_path / "unfinished" / "args.yaml").write_text("{}")
    (tmp_path / "no_checkpoint").mkdir()
    (tmp_path / "no_checkpoint" / "args.yaml").write_text("{}")
    assert find_resume_dir(RunConfig(project=str(tmp_path), resume="")) == (tmp_path / "new").resolve()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        find_resume_dir(RunConfig(project=str(tmp_path), resume=str(tmp_path / "no_checkpoint")))


def test_communication_dtype_flag(tmp_path):
    config, _ = resolve(zero=2, communication_dtype="bf16")
    assert config["communication_data_type"] == "bf16"
    assert "communication_data_type" not in resolve(zero=2)[0]  # DeepSpeed's default: the gradients' dtype
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"communication_data_type": "fp16"}))
    with pytest.raises(ConfigError, match="--communication_dtype bf16 disagrees with communication_data_type=fp16"):
        resolve(zero=2, communication_dtype="bf16", deepspeed_config=str(path))


def test_mistakes_are_found_before_any_process_group(shapes_data, tmp_path):
    """resolve_run checks the whole run for a world size it is told, with no process group (train.py calls it
    before dist.init_distributed): a batch that disagrees with the JSON on 2 ranks, a bad --hyp value."""
    import torch.distributed

    from yolods.config import resolve_run

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    flags = ["--data", str(shapes_data), "--device", "cpu"]
    with pytest.raises(ConfigError, match="--batch 8 gives 4 images per rank on 2 ranks"):
        resolve_run(parse_args([*flags, "--batch", "8", "--deepspeed_config", str(config)]), world_size=2)
    with pytest.raises(ConfigError, match="mosaic"):
        resolve_run(parse_args([*flags, "--hyp", "mosaic=lots"]), world_size=2)
    with pytest.raises(ConfigError, match="--profile 1,x"):
        resolve_run(parse_args([*flags, "--profile", "1,x"]), world_size=1)
    # an unknown optimizer was a rank's NotImplementedError, a freeze beyond the model's layers went unnoticed
    with pytest.raises(ConfigError, match="--optimizer Foo: unknown; use one of SGD"):
        resolve_run(parse_args([*flags, "--optimizer", "Foo"]), world_size=1)
    with pytest.raises(ConfigError, match=r"--hyp freeze=\[0, 30\]: .* layer indices below 23"):
        resolve_run(parse_args([*flags, "--hyp", "freeze=[0,30]"]), world_size=1)
    assert resolve_run(parse_args(flags), world_size=2).batch.micro_batch == 8
    # NHWC images at ZeRO 1-3 on CUDA killed an H200 run (cuDNN, misaligned parameter views); the check needs no GPU
    nhwc = replace(parse_args([*flags, "--zero", "2", "--hyp", "channels_last=True"]), device="cuda")
    with pytest.raises(ConfigError, match=r"channels_last=True with ZeRO-2: .*use --zero 0"):
        resolve_run(nhwc, world_size=2)
    assert resolve_run(replace(nhwc, zero=0), world_size=2).hyp.channels_last is True
    assert not torch.distributed.is_initialized()


def test_resume_on_another_number_of_ranks_keeps_the_global_batch(tmp_path):
    from yolods.config import check_batch_resplit

    run = RunConfig(device="cpu", batch=8, batch_from_flag=True, resume="runs/train/exp")
    check_batch_resplit(run, saved_world_size=2, world_size=4)  # 2 per rank instead of 4: fine
    with pytest.raises(
        ConfigError, match=r"global batch 8 \(saved on 2 ranks\) does not split over 3 ranks.*e\.g\. 2 or 4"
    ):
        check_batch_resplit(run, saved_world_size=2, world_size=3)
    pinned = tmp_path / "ds.json"
    pinned.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(
        ConfigError, match=r"fixes train_micro_batch_size_per_gpu=4.*on 2 ranks cannot be re-split over 1"
    ):
        check_batch_resplit(
            RunConfig(device="cpu", deepspeed_config=str(pinned), resume="r"), saved_world_size=2, world_size=1
        )


def test_save_periods_may_change_on_resume_and_nothing_else_new():
    from yolods.config import given_flags, resumed_config

    saved = RunConfig(device="cpu", resume="runs/train/exp")
    argv = ["--resume", "runs/train/exp", "--save_period_steps", "50", "--save_period_min", "5"]
    resumed = resumed_config(saved, parse_args(argv), given=given_flags(argv))
    assert (resumed.save_period_steps, resumed.save_period_min) == (50, 5.0)
    assert resumed_config(saved, parse_args(["--resume", "x"]), given={"resume"}).save_period_min == 30.0
    with pytest.raises(ConfigError, match="--save_period_steps and --save_period_min must be 0"):
        parse_args(["--save_period_min", "-1"])
