"""Memory options in the bench (issue 13): activation checkpointing and communication dtype axes, ZeRO-Offload
configs, the --fit probe's search, and --tune's coordinate descent; then real 2-rank jobs of each, at sizes that
take seconds.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest
import torch
from conftest import REPO, assert_ok, run_module, run_train, torchrun_command, train_env

from yolods.bench import tune
from yolods.bench.fit import largest_fitting
from yolods.bench.report_options import option_pairs
from yolods.bench.sweep import BenchConfig, build_parser, expand
from yolods.config import BUCKET_ELEMENTS, ConfigError, default_deepspeed_config
from yolods.ds_offload import offload_problem
from yolods.ds_validation import validate_deepspeed_config

DS_CONFIGS = REPO / "ds_configs"
TINY = ["--model", "yolov8n.yaml", "--imgsz", "64", "--steps", "1", "--warmup-steps", "1"]


# ----------------------------------------------------------------------------------------------------------------
# The sweep's new axes


def test_checkpointing_axis_covers_both_engines_and_comm_dtype_only_deepspeed():
    args = build_parser().parse_args(
        ["--activation-checkpointing", "off,on", "--communication-dtype", "fp32,bf16", "--zero", "2"]
    )
    configs = expand(args, world_size=1)
    labels = [cfg.label for cfg in configs]
    assert sum(cfg.engine == "ddp" for cfg in configs) == 2  # DDP with and without checkpointing, no comm dtype
    assert "ZeRO-2 fp32 yolov8n@160 mb8 synthetic act-ckpt comm-bf16" in labels
    assert all(cfg.communication_dtype is None for cfg in configs if cfg.engine != "deepspeed")
    (ultralytics,) = [cfg for cfg in configs if cfg.engine == "ultralytics"]  # one baseline: it cannot checkpoint
    assert not ultralytics.activation_checkpointing


def test_an_option_is_reported_against_the_line_without_it():
    def line(**config):
        return {
            "engine": "deepspeed", "zero_stage": 2, "precision": "bf16", "model": "yolov8n.yaml", "imgsz": 160,
            "micro_batch": 8, "input": "synthetic", "world_size": 2, "num_nodes": 1,
            "config": {"device": "cpu", **config},
        }  # fmt: skip

    offloaded = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    lines = [
        line(),
        line(activation_checkpointing=True),
        line(communication_dtype="bf16"),
        line(deepspeed_config="ds_configs/zero2_offload_bf16.json", resolved_deepspeed_config=offloaded),
        line(
            activation_checkpointing=True, communication_dtype="bf16"
        ),  # compared with the ckpt line, and the bf16 one
    ]
    pairs = {(option, id(without), id(with_)) for option, without, with_ in option_pairs(lines)}
    assert pairs == {
        ("activation checkpointing", id(lines[0]), id(lines[1])),
        ("communication dtype", id(lines[0]), id(lines[2])),
        ("offload", id(lines[0]), id(lines[3])),
        ("activation checkpointing", id(lines[2]), id(lines[4])),
        ("communication dtype", id(lines[1]), id(lines[4])),
    }


# ----------------------------------------------------------------------------------------------------------------
# Offload: the shipped configs, and what DeepSpeed would refuse or ignore


def test_zero3_offload_config_differs_from_zero3_only_by_offload():
    offload = json.loads((DS_CONFIGS / "zero3_offload_bf16.json").read_text())
    zero = offload["zero_optimization"]
    assert zero.pop("offload_optimizer") == {"device": "cpu", "pin_memory": True}
    assert zero.pop("offload_param") == {"device": "cpu", "pin_memory": True}
    assert offload.pop("zero_force_ds_cpu_optimizer") is False
    assert offload == default_deepspeed_config(zero_stage=3, precision="bf16")


@pytest.mark.parametrize(
    ("zero", "extra", "expected"),
    [
        ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, {}, '"zero_force_ds_cpu_optimizer": false'),
        ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, {"zero_force_ds_cpu_optimizer": False}, "stage 1, 2"),
        ({"stage": 2, "offload_param": {"device": "cpu"}}, {}, "offload_param at stage 2"),
        ({"stage": 3, "offload_param": {"device": "cpu"}}, {}, None),  # no optimizer offload: any optimizer runs
        ({"stage": 3, "offload_optimizer": {"device": "none"}}, {}, None),
    ],
)
def test_offload_settings_deepspeed_refuses_or_ignores_are_one_line(zero, extra, expected):
    problem = offload_problem({"zero_optimization": zero, **extra})
    assert problem is None if expected is None else expected in problem
    if expected is not None:
        with pytest.raises(ConfigError, match="zero_optimization"):
            validate_deepspeed_config({"zero_optimization": zero, **extra}, source="my.json")


# ----------------------------------------------------------------------------------------------------------------
# --fit: doubling then bisection


def test_largest_fitting_is_within_an_eighth_below_the_limit_and_monotone_in_it():
    answers = []
    for threshold in range(0, 300):
        tried = []

        def fits(value, threshold=threshold, tried=tried):
            tried.append(value)
            return value <= threshold

        answer = largest_fitting(fits, start=4, limit=256)
        assert answer <= min(threshold, 256) and min(threshold, 256) - answer <= max(1, answer // 8)
        assert len(tried) <= 12
        answers.append(answer)
    assert answers == sorted(answers)  # a larger budget never gives a smaller answer
    assert largest_fitting(lambda value: value <= 500, start=64, limit=2048, unit=32) in (448, 480)
    assert largest_fitting(lambda value: False, start=2, limit=8) == 0


# ----------------------------------------------------------------------------------------------------------------
# --tune: coordinate descent with a fake measurement (no processes)


def _speed(cfg: BenchConfig) -> float:
    """img/s of a made-up machine: ZeRO-1 fastest, 2e7 reduce buckets help, micro batch helps up to 8, bf16 helps."""
    speed = {0: 100.0, 1: 120.0, 2: 110.0, 3: 40.0}[cfg.zero_stage]
    speed *= 1.1 if cfg.reduce_bucket_size == 20_000_000 else 1.0
    speed *= {2: 1.0, 4: 1.3, 8: 1.5, 16: 1.51}.get(cfg.micro_batch, 1.0)
    return speed * (1.2 if cfg.precision == "bf16" else 1.0)


def _fake_measure(cfg, **_):
    return {
        "imgs_per_s": _speed(cfg),
        "step_time_s": {"median": cfg.global_batch / _speed(cfg)},
        "peak_mem_bytes": (1 + cfg.micro_batch) * 2**30,
    }


def _space(**changes) -> tune.TuneSpace:
    space = tune.TuneSpace(
        stages=(0, 1, 2, 3),
        reduce_buckets=tune.DEFAULT_BUCKETS,
        allgather_buckets=tune.DEFAULT_BUCKETS,
        micro_batches=None,
        precisions=("fp32", "bf16"),
        memory_budget_bytes=64 * 2**30,
    )
    return replace(space, **changes)


CPU = torch.device("cpu")
BASE = BenchConfig(
    engine="deepspeed", model="yolov8n.yaml", imgsz=64, micro_batch=2, global_batch=4, precision="fp32",
    zero_stage=0, input="synthetic",
)  # fmt: skip


def test_tune_descends_one_coordinate_at_a_time(monkeypatch):
    monkeypatch.setattr(tune, "measure_training", _fake_measure)
    tuner = tune.Tuner(_space(), device=CPU, budget_s=600, keep_going=True)
    best = tuner.search(BASE)
    assert (best.config.zero_stage, best.config.reduce_bucket_size, best.config.micro_batch, best.config.precision) == (
        1, 20_000_000, 8, "bf16"
    )  # fmt: skip
    phases = [trial.phase for trial in tuner.trials]
    # ZeRO-1's default on CPU is one whole-model bucket, so all 3 bucket candidates are new; 16 gains less than
    # the margin: the doubling stops there
    assert phases == ["zero_stage"] * 4 + ["reduce_bucket_size"] * 3 + ["allgather_bucket_size"] * 2 + [
        "micro_batch"
    ] * 3 + ["precision"]
    sixteen = next(trial for trial in tuner.trials if trial.config.micro_batch == 16)
    assert "kept" in sixteen.note and best.config.global_batch == 16


def test_tune_stops_doubling_at_the_memory_budget_and_the_search_at_the_time_budget(monkeypatch):
    monkeypatch.setattr(tune, "measure_training", _fake_measure)
    tuner = tune.Tuner(_space(stages=(0,), memory_budget_bytes=6 * 2**30), device=CPU, budget_s=600, keep_going=True)
    assert tuner.search(BASE).config.micro_batch == 4  # 8 would need 9 GiB: linear through 2 (3 GiB) and 4 (5 GiB)
    assert tuner.trials[-2].status == "skipped" and "predicted peak" in tuner.trials[-2].note
    hurried = tune.Tuner(_space(), device=CPU, budget_s=0, keep_going=True)
    hurried.search(BASE)  # the first candidate always runs; nothing else fits in no time
    assert [trial.status for trial in hurried.trials] == ["ok"] + ["skipped"] * 5  # 3 stages, 1 doubling, 1 precision


def test_tune_on_cpu_measures_past_a_one_point_prediction_and_keeps_only_what_fits(monkeypatch):
    """From one point the prediction scales the whole peak (torch's own memory too): on a CPU, where nothing runs
    out, the doubling is measured and its measured peak judged; on a GPU the prediction still stops it."""
    monkeypatch.setattr(tune, "measure_training", _fake_measure)
    space = _space(stages=(0,), memory_budget_bytes=int(4.5 * 2**30), precisions=("fp32",))
    cpu = tune.Tuner(space, device=CPU, budget_s=600, keep_going=True)
    assert cpu.search(BASE).config.micro_batch == 2  # micro batch 4 peaked at 5 GiB
    four = next(trial for trial in cpu.trials if trial.config.micro_batch == 4)
    assert four.status == "ok" and "5.00 GiB > budget 4.50: not eligible" in four.note
    gpu = tune.Tuner(space, device=torch.device("cuda"), budget_s=600, keep_going=True)
    gpu.search(BASE)
    assert any(trial.status == "skipped" and "predicted peak 6.00 GiB" in trial.note for trial in gpu.trials)


def test_tuned_config_is_what_yolods_train_resolves_at_that_world_size(tmp_path):
    winner = replace(BASE, zero_stage=2, reduce_bucket_size=20_000_000, precision="fp32", micro_batch=4, global_batch=8)
    path = tmp_path / "ds_tuned.json"
    path.write_text(json.dumps(tune.tuned_ds_config(winner, world_size=2, note="test")))
    written = json.loads(path.read_text())
    assert not set(tune.BATCH_KEYS) & set(written)  # yolods fills them from --batch
    assert written["zero_optimization"]["reduce_bucket_size"] == 20_000_000
    assert written["zero_optimization"]["allgather_bucket_size"] == BUCKET_ELEMENTS
    assert written["torch_autocast"] == {"enabled": False}  # fp32 said explicitly: CUDA's default would be bf16
    tune.check_tuned_config(path, winner, world_size=2)


# ----------------------------------------------------------------------------------------------------------------
# Real jobs on 2 gloo ranks


@pytest.mark.multirank
def test_tune_on_two_ranks_writes_a_config_yolods_train_trains_with(tmp_path, shapes_data):
    out = tmp_path / "tune"
    completed = subprocess.run(
        [*torchrun_command(2), "-m", "yolods.bench", "--tune", *TINY, "--zero", "0,2", "--reduce-bucket-size", "2e6",
         "--allgather-bucket-size", "2e6", "--micro-batch", "2,4", "--precision", "fp32", "--out", str(out)],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert_ok(completed)
    record = json.loads((out / "tune.json").read_text())
    assert [trial["phase"] for trial in record["trials"]][:2] == ["zero_stage", "zero_stage"]
    assert all(trial["status"] == "ok" and trial["imgs_per_s"] > 0 for trial in record["trials"])
    assert "| 1 | zero_stage | ZeRO-0 |" in (out / "tune.md").read_text()
    config = json.loads((out / "ds_tuned.json").read_text())
    validate_deepspeed_config(config, source="ds_tuned.json")
    assert "torchrun --nproc_per_node 2 -m yolods.train" in record["command"]
    winner = next(trial for trial in record["trials"] if trial["index"] == record["winner"])
    train = ["--deepspeed_config", str(out / "ds_tuned.json"), "--batch", str(winner["config"]["global_batch"])]
    args = ["--data", str(shapes_data), "--epochs", "1", "--imgsz", "64", "--workers", "0", "--project", str(tmp_path)]
    assert_ok(run_train([*args, "--name", "tuned", *train], nproc=2))
    assert (tmp_path / "tuned" / "weights" / "last.pt").is_file()


@pytest.mark.multirank
def test_offload_configs_take_steps_on_two_ranks_and_a_refused_one_is_one_line(tmp_path):
    out = tmp_path / "bench"
    configs = ",".join(str(DS_CONFIGS / name) for name in ("zero2_offload_bf16.json", "zero3_offload_bf16.json"))
    completed = subprocess.run(
        [*torchrun_command(2), "-m", "yolods.bench", *TINY, "--micro-batch", "2", "--engine", "deepspeed",
         "--deepspeed_config", configs, "--out", str(out)],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert_ok(completed)
    lines = [json.loads(text) for text in (out / "results.jsonl").read_text().splitlines()]
    assert [line["zero_stage"] for line in lines] == [2, 3]
    for line in lines:
        assert line["imgs_per_s"] > 0 and line["model_state_bytes"]["in_host_memory"] > 0
    refused = tmp_path / "offload_without_force.json"
    config = json.loads((DS_CONFIGS / "zero2_offload_bf16.json").read_text())
    del config["zero_force_ds_cpu_optimizer"]
    refused.write_text(json.dumps(config))
    result = run_train(["--deepspeed_config", str(refused), "--project", str(tmp_path)])
    assert result.returncode == 2
    (error,) = [text for text in result.stderr.splitlines() if "error" in text]
    assert '"zero_force_ds_cpu_optimizer": false' in error and "Traceback" not in result.stderr


@pytest.mark.multirank
def test_fit_probes_fresh_two_rank_jobs_against_the_budget(tmp_path):
    common = ["--fit", "micro-batch", *TINY, "--fit-max", "2", "--nproc", "2", "--zero", "2", "--out", str(tmp_path)]
    assert_ok(run_module("yolods.bench", [*common, "--micro-batch", "2", "--memory-budget-gib", "16"], timeout=300))
    # below what the interpreter and its libraries take: the watchdog ends the point's ranks as soon as they start
    assert_ok(run_module("yolods.bench", [*common, "--micro-batch", "1", "--memory-budget-gib", "0.2"], timeout=300))
    roomy, tight = (json.loads(text) for text in (tmp_path / "fit.jsonl").read_text().splitlines())
    assert roomy["largest"] == 2 and [point["value"] for point in roomy["points"]] == [2]
    for point in roomy["points"]:
        assert point["fits"] and point["baseline_bytes"] < point["peak_mem_bytes"] <= roomy["budget_bytes"]
    assert tight["largest"] == 0 and [(p["value"], p["status"]) for p in tight["points"]] == [(1, "over_budget")]
    assert "nothing fits" in (tmp_path / "fit.md").read_text()


def test_fit_and_tune_mistakes_are_one_line(capsys, monkeypatch):
    from yolods.bench.cli import main

    assert main(["--fit", "imgsz", "--device", "cpu"]) == 2
    assert "needs --memory-budget-gib" in capsys.readouterr().err
    assert main(["--tune", "--fit", "imgsz"]) == 2
    assert "two modes" in capsys.readouterr().err
    assert main(["--tune", "--device", "cpu", "--precision", "fp16"]) == 2
    assert "fp16 on CPU" in capsys.readouterr().err
    assert main(["--tune", "--device", "cpu", "--deepspeed_config", str(DS_CONFIGS / "zero2_bf16.json")]) == 2
    assert "drop --deepspeed_config" in capsys.readouterr().err
    assert main(["--tune", "--device", "cpu", "--input", "real"]) == 2
    assert "drop --input real" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under a launcher, before the process group exists
    assert main(["--fit", "imgsz", "--device", "cpu", "--memory-budget-gib", "4"]) == 2
    assert "run it as one process" in capsys.readouterr().err
