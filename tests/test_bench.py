"""yolods.bench: the analytical model and the ZeRO-paper formulas without processes, then one end-to-end run.

The end-to-end test runs the bench on one process (real input, the Ultralytics baseline) and on two gloo ranks
(synthetic input, DDP and ZeRO-2), then the report, at sizes that take seconds.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from yolods.bench import comm_model as cm
from yolods.bench.analysis import ratio_vs, select_lines
from yolods.bench.cli import sweep_schedule
from yolods.bench.measure import StepRecord, mean_phases, step_stats, time_steps
from yolods.bench.memory import model_state_bytes
from yolods.bench.report import _earlier_runs_note
from yolods.bench.results import REQUIRED_KEYS, append_line, make_line, read_lines
from yolods.bench.sweep import build_parser, expand, parse_count
from yolods.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
PSI = 3_000_000  # about yolov8n


# ----------------------------------------------------------------------------------------------------------------
# Communication model


def test_ring_bytes_per_rank():
    assert cm.bytes_sent_per_rank(cm.ALL_REDUCE, 100.0, 4) == pytest.approx(150.0)  # 2(N-1)/N
    assert cm.bytes_sent_per_rank(cm.ALL_GATHER, 100.0, 4) == pytest.approx(75.0)  # (N-1)/N
    assert cm.bytes_sent_per_rank(cm.REDUCE_SCATTER, 100.0, 4) == pytest.approx(75.0)
    assert cm.bytes_sent_per_rank(cm.ALL_REDUCE, 100.0, 1) == 0.0


def test_ring_time_is_latency_per_hop_and_call_plus_bytes_over_bandwidth():
    link = cm.Link(bandwidth_bytes_per_s=1e9, latency_s=1e-5)
    collective = cm.Collective(cm.ALL_REDUCE, 4e8, calls=3, phase="backward", overlappable=True)
    expected = 3 * 2 * 7 * 1e-5 + 2 * 7 / 8 * 4e8 / 1e9
    assert cm.collective_time_s(collective, num_ranks=8, link=link) == pytest.approx(expected)
    assert cm.collective_time_s(collective, num_ranks=1, link=link) == 0.0


def test_exposed_time_hides_all_but_the_last_bucket_when_compute_is_long():
    assert cm.exposed_time_s(compute_s=1.0, comm_s=0.4, calls=4, overlappable=True) == pytest.approx(0.1)
    # communication longer than compute: what the compute could not cover stays exposed
    assert cm.exposed_time_s(compute_s=1.0, comm_s=2.0, calls=4, overlappable=True) == pytest.approx(2.0 - 0.75)
    assert cm.exposed_time_s(compute_s=1.0, comm_s=0.4, calls=4, overlappable=False) == pytest.approx(0.4)


def test_zero2_sends_one_and_a_half_times_ddp_in_deepspeed_0_19():
    """All-reduced gradient buckets (multi-rank bucket all-reduce) plus the parameter all-gather: 3 Psi, not 2."""
    ddp = cm.CommSpec(zero_stage=None, num_params=PSI)
    zero2 = cm.CommSpec(zero_stage=2, num_params=PSI)
    ratio = cm.comm_bytes_per_rank(zero2, num_ranks=8) / cm.comm_bytes_per_rank(ddp, num_ranks=8)
    assert ratio == pytest.approx(1.5, rel=1e-3)
    ops = [(c.op, c.phase, c.overlappable) for c in cm.step_collectives(zero2)]
    assert (cm.ALL_GATHER, "after_step", False) in ops


def test_zero0_reduces_after_backward_without_overlap():
    (collective,) = cm.step_collectives(cm.CommSpec(zero_stage=0, num_params=PSI))
    assert (collective.op, collective.phase, collective.overlappable, collective.calls) == (
        cm.ALL_REDUCE,
        "after_backward",
        False,
        1,
    )


def test_zero3_gathers_parameters_per_module_and_the_partitioned_ema_adds_no_collective():
    spec = cm.CommSpec(zero_stage=3, num_params=PSI, stage3_gather_calls=120)
    collectives = cm.step_collectives(spec)
    assert [c.calls for c in collectives if c.op == cm.ALL_GATHER] == [120]
    assert any(c.op == cm.REDUCE_SCATTER for c in collectives)


def test_one_rank_step_is_the_compute_and_zero_partitions_the_optimizer():
    compute = cm.ComputeTimes(forward_s=0.1, backward_s=0.2, optimizer_s=0.04)
    link = cm.Link(1e9, 1e-5)
    one = cm.estimate_step(compute, cm.CommSpec(zero_stage=None, num_params=PSI), num_ranks=1, link=link)
    assert one.step_s == pytest.approx(compute.total_s) and one.comm_s == 0
    two = cm.estimate_step(
        compute, cm.CommSpec(zero_stage=2, num_params=PSI), num_ranks=2, link=link, can_overlap=False
    )
    assert two.step_s == pytest.approx(0.3 + 0.02 + two.exposed_comm_s)
    assert two.exposed_comm_s == pytest.approx(two.comm_s)  # no overlap: all of it on the critical path


def test_projection_efficiency_falls_with_nodes_and_rises_with_bandwidth():
    compute = cm.ComputeTimes(forward_s=0.008, backward_s=0.016, optimizer_s=0.001)
    spec = cm.CommSpec(zero_stage=None, num_params=11_000_000)
    slow = cm.project_scaling(compute, spec, topology=cm.h100_cluster(100), micro_batch=16)
    fast = cm.project_scaling(compute, spec, topology=cm.h100_cluster(400), micro_batch=16)
    efficiencies = [point.efficiency for point in slow]
    assert efficiencies == sorted(efficiencies, reverse=True)
    assert all(f.efficiency >= s.efficiency for f, s in zip(fast, slow))
    assert slow[0].num_ranks == 8 and slow[-1].num_nodes == 256


@pytest.mark.parametrize("op", [cm.ALL_REDUCE, cm.ALL_GATHER, cm.REDUCE_SCATTER])
def test_fit_link_recovers_latency_and_bandwidth(op):
    truth = cm.Link(bandwidth_bytes_per_s=2e9, latency_s=3e-4)
    sizes = [4096.0, 2.0**20, 2.0**23, 2.0**25]
    seconds = [
        cm.collective_time_s(cm.Collective(op, size, 1, "backward", False), num_ranks=4, link=truth) for size in sizes
    ]
    fitted = cm.fit_link(op=op, num_ranks=4, message_bytes=sizes, seconds=seconds)
    assert fitted.bandwidth_bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert fitted.latency_s == pytest.approx(3e-4, rel=1e-6)


def test_zero_paper_figure_1_numbers():
    """The paper's Figure 1: 7.5B parameters on 64 GPUs: 120, 31.4, 16.6 and 1.9 GB per device."""
    gigabytes = [
        cm.zero_model_state_bytes(stage=stage, num_params=7_500_000_000, num_ranks=64, state=cm.PAPER_MIXED_ADAM) / 1e9
        for stage in range(4)
    ]
    assert gigabytes == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.06)


def test_fp32_equivalent_and_deepspeed_as_implemented():
    psi, ranks = 1000, 4
    assert (
        cm.zero_model_state_bytes(stage=2, num_params=psi, num_ranks=ranks, state=cm.PAPER_FP32_ADAM)
        == 4 * psi + 12 * psi / ranks
    )
    # DeepSpeed keeps an fp32 master partition even for fp32 parameters; stage 1 has reduced its grads by then
    zero1 = cm.deepspeed_model_state_bytes(stage=1, num_params=psi, num_ranks=ranks, optimizer="AdamW")
    zero2 = cm.deepspeed_model_state_bytes(stage=2, num_params=psi, num_ranks=ranks, optimizer="AdamW")
    assert zero1 == zero2 == 4 * psi + (4 + 8 + 4) * psi / ranks
    assert cm.deepspeed_model_state_bytes(stage=0, num_params=psi, num_ranks=ranks, optimizer="SGD") == 12 * psi


# ----------------------------------------------------------------------------------------------------------------
# Memory, timing, sweep, results lines


def test_model_state_bytes_counts_each_storage_once():
    model = torch.nn.Linear(100, 10)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 100)).sum().backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters()) * 4
    states = model_state_bytes(model, optimizer)
    assert states.params == params and states.grads == params
    assert states.optimizer == pytest.approx(2 * params, abs=64)  # exp_avg, exp_avg_sq (+ scalar step counters)


class _FakeStep:
    """Called as yolods.step.TrainStep is: a raw batch in, each phase's end reported through on_phase."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []
        self.on_phase = None
        self.phase_seen_in_warmup = False

    def __call__(self, batch, *, iteration, epoch, last_in_epoch):
        self.calls.append((iteration, epoch, last_in_epoch))
        self.phase_seen_in_warmup |= self.on_phase is not None and len(self.calls) <= 3
        for phase in ("preprocess", "forward", "backward", "optimizer"):
            time.sleep(0.002 if phase == "preprocess" else 0.0)
            if self.on_phase is not None:
                self.on_phase(phase)


def test_time_steps_times_the_step_callable_by_phase_and_excludes_burn_in():
    step = _FakeStep()
    iterations = itertools.count()
    records, window_s = time_steps(
        step, iter([{"x": i} for i in range(10)]), iterations, steps=4, warmup_steps=3, device=torch.device("cpu")
    )
    # every call as the Trainer makes it in epoch 0; the iteration counts on over burn-in and timed steps
    assert step.calls == [(i, 0, False) for i in range(7)] and next(iterations) == 7
    assert len(records) == 4 and window_s >= sum(r.total_s for r in records) * 0.99
    assert not step.phase_seen_in_warmup and step.on_phase is None  # phases are timed in the window only
    assert set(mean_phases(records)) == {"data_wait", "forward", "backward", "optimizer"}
    assert all(r.phases["data_wait"] >= 0.002 for r in records)  # data wait includes the preprocess phase
    assert all(sum(r.phases.values()) == pytest.approx(r.total_s) for r in records)
    stats = step_stats([0.3, 0.1, 0.2, 0.4])
    assert (stats["min"], stats["median"], stats["max"]) == (0.1, pytest.approx(0.25), 0.4)
    assert isinstance(records[0], StepRecord)


def test_time_steps_rejects_a_step_that_skips_a_phase():
    class Skipping(_FakeStep):
        def __call__(self, batch, *, iteration, epoch, last_in_epoch):
            if self.on_phase is not None:
                self.on_phase("forward")

    with pytest.raises(RuntimeError, match="expected"):
        time_steps(Skipping(), iter([{}] * 3), itertools.count(), steps=1, warmup_steps=0, device=torch.device("cpu"))


def test_synthetic_input_is_a_raw_batch_that_the_train_step_preprocesses():
    from yolods.bench.inputs import repeat_batch, synthetic_batch
    from yolods.data import preprocess_batch

    raw = synthetic_batch(micro_batch=2, imgsz=32, num_classes=3, device=torch.device("cpu"), seed=0)
    assert raw["img"].dtype == torch.uint8 and raw["img"].shape == (2, 3, 32, 32) and int(raw["img"].max()) > 200
    first = preprocess_batch(next(batches := repeat_batch(raw)), device=torch.device("cpu"), input_dtype=torch.float32)
    assert first["img"].dtype == torch.float32 and float(first["img"].max()) <= 1.0
    assert next(batches)["img"].dtype == torch.uint8  # each step gets the raw batch again


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_sweep_expands_comma_lists_and_repeated_flags_with_baselines():
    configs = expand(_args("--zero", "0,1", "--zero", "3", "--model", "n,s", "--device", "cpu"), world_size=1)
    engines = [c.engine for c in configs]
    assert engines.count("deepspeed") == 6 and engines.count("ddp") == 2 and engines.count("ultralytics") == 2
    assert {c.model for c in configs} == {"yolov8n.yaml", "yolov8s.yaml"}
    twice = _args("--zero", "0", "--model", "n,yolov8n.yaml", "--engine", "deepspeed", "--device", "cpu")
    twice = expand(twice, world_size=1)
    assert len(twice) == 1  # one model named twice was measured twice and reported as 2 repeats
    assert all(c.input == "real" for c in configs if c.engine == "ultralytics")
    assert configs[-1].engine == "ultralytics"  # the child-process baseline runs last
    # Ultralytics trains in fp32 only on CPU: no bf16 baseline there
    bf16 = expand(_args("--zero", "2", "--precision", "fp32,bf16", "--device", "cpu"), world_size=1)
    assert [(c.engine, c.precision) for c in bf16 if c.engine == "ultralytics"] == [("ultralytics", "fp32")]


def test_odd_repeats_measure_in_reverse_with_the_ultralytics_child_last():
    configs = expand(_args("--zero", "0,3", "--device", "cpu"), world_size=1)
    labels = [(cfg.engine, cfg.zero_stage) for cfg in configs]
    assert labels == [("ddp", None), ("deepspeed", 0), ("deepspeed", 3), ("ultralytics", None)]
    schedule = [(repeat, (cfg.engine, cfg.zero_stage)) for repeat, cfg in sweep_schedule(configs, 3)]
    assert schedule == [
        *[(0, label) for label in labels],
        *[(1, label) for label in [*labels[2::-1], labels[3]]],  # ZeRO-3 first, DDP last, Ultralytics still last
        *[(2, label) for label in labels],
    ]
    assert [cfg for _, cfg in sweep_schedule(configs, 1, reverse_first=True)] == [*configs[2::-1], configs[3]]
    assert _args("--reverse").reverse and not _args().reverse


def test_sweep_at_two_ranks_drops_ultralytics_and_splits_the_global_batch():
    configs = expand(_args("--batch", "16", "--zero", "2", "--device", "cpu"), world_size=2)
    assert {c.engine for c in configs} == {"deepspeed", "ddp"}
    assert {(c.micro_batch, c.global_batch) for c in configs} == {(8, 16)}
    with pytest.raises(ConfigError, match="does not split"):
        expand(_args("--batch", "15", "--device", "cpu"), world_size=2)
    with pytest.raises(ConfigError, match="keep one"):
        expand(_args("--batch", "16", "--micro-batch", "8", "--device", "cpu"), world_size=2)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--imgsz", "100"), "--imgsz 100 is not a positive multiple of the model stride 32: use e.g. --imgsz 128"),
        (("--micro-batch", "0"), "--micro-batch 0: images per rank must be at least 1"),  # named nbs=0
        (("--repeat", "0"), "--repeat 0: measure the sweep at least once"),  # ran once, silently
        (("--reduce-bucket-size", "-5"), "a bucket holds at least 1 element"),  # DeepSpeed's pydantic error, mid-run
        (("--workers", "-1"), "--workers -1: dataloader workers per rank are 0 or more"),  # torch's, mid-run
    ],
)
def test_bad_sweep_flags_are_named(flags, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        expand(_args(*flags, "--device", "cpu"), world_size=1)


def test_bucket_and_overlap_sweeps_apply_to_deepspeed_only():
    configs = expand(
        _args(
            "--zero",
            "2",
            "--reduce-bucket-size",
            "5e5,2M",
            "--overlap-comm",
            "on,off",
            "--engine",
            "deepspeed,ddp",
            "--device",
            "cpu",
        ),
        world_size=2,
    )
    deepspeed = [c for c in configs if c.engine == "deepspeed"]
    assert {(c.reduce_bucket_size, c.overlap_comm) for c in deepspeed} == {
        (500_000, True),
        (500_000, False),
        (2_000_000, True),
        (2_000_000, False),
    }
    assert [c.reduce_bucket_size for c in configs if c.engine == "ddp"] == [None]
    assert parse_count("512K") == 512_000


def test_a_deepspeed_json_sets_stage_and_precision_and_the_sweep_overrides_buckets(tmp_path):
    from yolods.bench.engines import bench_plan

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    configs = expand(
        _args("--deepspeed_config", str(path), "--reduce-bucket-size", "1M", "--device", "cpu"), world_size=2
    )
    deepspeed = next(c for c in configs if c.engine == "deepspeed")
    assert (deepspeed.zero_stage, deepspeed.precision) == (None, "bf16")  # the JSON's stage, resolved when run
    plan = bench_plan(deepspeed, world_size=2)  # resolve_run, as yolods.train resolves the run
    ds_config = plan.ds_config
    assert ds_config["zero_optimization"]["stage"] == 2 and plan.zero_stage == 2
    assert ds_config["zero_optimization"]["reduce_bucket_size"] == 1_000_000
    assert ds_config["gradient_accumulation_steps"] == 1  # every timed step is an optimizer step
    assert plan.batch.accumulate == 1 and plan.hyp.warmup_epochs == 0
    clash = expand(_args("--deepspeed_config", str(path), "--zero", "3", "--device", "cpu"), world_size=2)
    with pytest.raises(ConfigError, match="disagrees"):
        bench_plan(next(c for c in clash if c.engine == "deepspeed"), world_size=2)


def test_channels_last_sweep_reaches_the_hyperparameters_and_the_ultralytics_baseline():
    from types import SimpleNamespace

    from yolods.bench.engines import bench_plan
    from yolods.bench.ultralytics_baseline import _train_kwargs
    from yolods.model import training_memory_format

    configs = expand(
        _args("--zero", "0", "--precision", "fp32,bf16", "--channels-last", "on,off", "--device", "cpu"), world_size=1
    )
    deepspeed = [c for c in configs if c.engine == "deepspeed"]
    # the layout is outside the precision: a sweep cut short has every precision in the first layout
    assert [(c.channels_last, c.precision) for c in deepspeed] == [
        (True, "fp32"), (True, "bf16"), (False, "fp32"), (False, "bf16")
    ]  # fmt: skip
    assert deepspeed[0].label.endswith("NHWC") and deepspeed[2].label.endswith("NCHW")
    assert [c.channels_last for c in configs if c.engine == "ultralytics"] == [True, False]
    assert _train_kwargs(configs[-1], data_yaml="d.yaml", project=Path("p"))["channels_last"] is False
    plan = bench_plan(deepspeed[2], world_size=1)
    assert plan.hyp.channels_last is False
    assert training_memory_format(torch.device("cuda"), plan.hyp) == torch.contiguous_format
    assert training_memory_format(torch.device("cuda"), SimpleNamespace()) == torch.contiguous_format  # the default
    assert (
        training_memory_format(torch.device("cuda"), bench_plan(deepspeed[0], world_size=1).hyp) == torch.channels_last
    )
    assert (
        training_memory_format(torch.device("cpu"), bench_plan(deepspeed[0], world_size=1).hyp)
        == torch.contiguous_format
    )
    default = expand(_args("--zero", "0", "--device", "cpu"), world_size=1)
    assert {c.channels_last for c in default} == {None} and "NHWC" not in default[0].label
    with pytest.raises(ConfigError, match="--channels-last 'maybe'"):
        expand(_args("--channels-last", "maybe", "--device", "cpu"), world_size=1)


def test_keep_going_reports_a_failed_configuration_and_measures_the_next(tmp_path, monkeypatch, capsys):
    from yolods.bench import cli

    configs = [c for c in expand(_args("--zero", "0,3", "--engine", "deepspeed", "--device", "cpu"), world_size=1)]

    def measure(cfg, **kwargs):
        if cfg.zero_stage == 0:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {
            **{key: 1 for key in REQUIRED_KEYS if key not in ("world_size", "num_nodes")},
            "imgs_per_s_per_rank": 1.0,
            "step_time_s": {"median": 0.5},
        }

    monkeypatch.setattr(cli, "measure_training", measure)
    run = {"repeats": 1, "device": torch.device("cpu"), "links": None, "context": {"world_size": 1, "num_nodes": 1}}
    with pytest.raises(RuntimeError, match="out of memory"):
        cli._run_sweep(configs, out_dir=tmp_path, **run)
    assert cli._run_sweep(configs, out_dir=tmp_path, keep_going=True, **run) == 1
    assert len(read_lines(tmp_path / "results.jsonl")) == 1  # ZeRO-3's line
    assert "ZeRO-0 fp32 yolov8n@160 mb8 synthetic: FAILED, skipped (--keep-going): RuntimeError: CUDA out" in (
        capsys.readouterr().out
    )


def test_projection_calibration_prefers_the_goal_precision_and_default_layout_and_takes_a_given_rate():
    from yolods.bench.projection import Goal, goal_compute

    def line(engine, precision, channels_last, imgs_per_s, zero_stage=None):
        return {
            "engine": engine, "zero_stage": zero_stage, "precision": precision, "model": "yolov8s.yaml", "imgsz": 640,
            "micro_batch": 16, "input": "synthetic", "world_size": 1, "imgs_per_s": imgs_per_s,
            "label": f"{engine} {zero_stage} {precision} {channels_last}", "hardware": {"gpu": "NVIDIA H200"},
            "breakdown_s": {"data_wait": 0.001, "forward": 0.004, "backward": 0.008, "optimizer": 0.002},
            "config": {"device": "cuda", "channels_last": channels_last},
        }  # fmt: skip

    lines = [
        line("deepspeed", "fp32", False, 900.0, zero_stage=0),
        line("deepspeed", "bf16", True, 1200.0, zero_stage=0),  # NHWC images: not yolods' default
        line("deepspeed", "bf16", None, 1000.0, zero_stage=3),
        line("deepspeed", "bf16", False, 1100.0, zero_stage=0),
    ]
    compute, sentence, measured = goal_compute(lines, Goal(), assumed_imgs_per_s=600)
    assert measured and "deepspeed 0 bf16 False" in sentence and "1100 img/s" in sentence
    assert compute.total_s == pytest.approx(0.015)
    compute, sentence, measured = goal_compute(lines, Goal(), assumed_imgs_per_s=600, given_imgs_per_s=1600)
    assert measured and "--gpu-imgs-per-s" in sentence and compute.total_s == pytest.approx(16 / 1600)
    compute, sentence, measured = goal_compute([], Goal(), assumed_imgs_per_s=800)
    assert not measured and "ASSUMED" in sentence and compute.total_s == pytest.approx(16 / 800)


def test_results_line_has_the_required_keys_and_round_trips(tmp_path):
    measured = {key: 1 for key in REQUIRED_KEYS if key not in ("world_size", "num_nodes")}
    line = make_line(measured, context={"world_size": 2, "num_nodes": 1})
    assert set(REQUIRED_KEYS) <= set(line) and len(line["load_avg"]) == 3
    append_line(tmp_path, line)
    append_line(tmp_path, line)
    assert read_lines(tmp_path / "results.jsonl") == [line, line]


def _line(engine: str, imgs_per_s: float, *, run_id: str = "a", zero_stage: int | None = None, world_size: int = 2):
    return {
        "engine": engine, "zero_stage": zero_stage, "precision": "fp32", "model": "yolov8n.yaml", "imgsz": 160,
        "micro_batch": 8, "input": "synthetic", "world_size": world_size, "num_nodes": 1, "imgs_per_s": imgs_per_s,
        "run_id": run_id, "timestamp": run_id, "config": {"device": "cpu"},
    }  # fmt: skip


def test_report_takes_the_median_repeat_of_the_latest_run_and_ratios_against_ddp():
    lines = [
        _line("ddp", 100.0, run_id="a"),
        _line("ddp", 50.0, run_id="b"),
        _line("ddp", 80.0, run_id="b"),
        _line("ddp", 60.0, run_id="b"),
        _line("deepspeed", 90.0, run_id="b", zero_stage=2),
    ]
    selected = select_lines(lines)
    ddp = next(line for line in selected if line["engine"] == "ddp")
    assert (ddp["imgs_per_s"], ddp["repeats"], ddp["imgs_per_s_range"]) == (60.0, 3, [50.0, 80.0])
    assert "(1 line(s) of earlier runs of the same configurations left out)" in _earlier_runs_note(lines, selected)
    assert _earlier_runs_note(lines[1:], select_lines(lines[1:])) == ""  # nothing left out: nothing said
    zero2 = next(line for line in selected if line["engine"] == "deepspeed")
    assert ratio_vs(zero2, selected, "ddp") == pytest.approx(1.5)
    assert ratio_vs(zero2, selected, "ultralytics") is None  # Ultralytics: one rank, real input only
    # with repeats on both sides, ratios are paired repeat by repeat: load drift cancels
    paired = [
        *(_line("ddp", value, run_id="c") | {"timestamp": f"c{i}"} for i, value in enumerate([100.0, 50.0, 80.0])),
        *(_line("deepspeed", v, run_id="c", zero_stage=0) | {"timestamp": f"c{i}"} for i, v in enumerate([90, 45, 72])),
    ]
    selected = select_lines(paired)
    zero0 = next(line for line in selected if line["engine"] == "deepspeed")
    assert ratio_vs(zero0, selected, "ddp") == pytest.approx(0.9)  # the medians alone would say 72 / 80 = 0.9 too
    assert zero0["imgs_per_s_repeats"] == [90, 45, 72]


@pytest.mark.parametrize(
    ("zero2_repeats", "verdict"),
    [
        ([96.0, 97.0, 98.0], "met"),  # every pair above 0.95, tightly: the lower bound clears it
        ([90.0, 91.0, 92.0], "MISSED"),
        ([90.0, 96.0, 100.0], "unresolved"),  # mean 0.953, but the pairs scatter across the goal
        ([96.0, 90.0], "MISSED"),  # 2 pairs: too few for a bound, the median (0.93) decides
    ],
)
def test_report_goal_2_says_when_the_repeats_cannot_tell_a_ratio_from_the_goal(zero2_repeats, verdict):
    from yolods.bench.projection import Goal
    from yolods.bench.report import _zero_against_ddp_goal

    def repeats(engine, values, zero_stage=None):
        return [
            _line(engine, v, run_id="r", zero_stage=zero_stage) | {"timestamp": f"r{i}"} for i, v in enumerate(values)
        ]

    ddp = [100.0] * len(zero2_repeats)
    selected = select_lines([*repeats("ddp", ddp), *repeats("deepspeed", zero2_repeats, zero_stage=2)])
    rows = [row for row in _zero_against_ddp_goal(selected, Goal()) if row.startswith("| ZeRO-2")]
    assert len(rows) == 1 and rows[0].rstrip(" |").endswith(verdict), rows


# ----------------------------------------------------------------------------------------------------------------
# Honest numbers: efficiency never above 100%, held-out validation, provenance, assumptions (no training)

ZERO_SPECS = [cm.CommSpec(zero_stage=None, num_params=11_000_000)] + [
    cm.CommSpec(zero_stage=stage, num_params=11_000_000, stop_agreement=True, stage3_gather_calls=120)
    for stage in range(4)
]


def test_projection_never_exceeds_100_percent_though_zero_does_less_work_per_rank():
    """One GPU runs the whole optimizer update, each of N ZeRO ranks 1/N of it: against N x one GPU's img/s ZeRO-2
    on NVLink reads above 100% (the old report's 103%); against the same per-rank compute it cannot."""
    for spec, imgs_per_s, gbps in itertools.product(ZERO_SPECS, (50.0, 300.0, 1200.0, 5000.0), (25.0, 200.0, 800.0)):
        step_s = 16 / imgs_per_s
        compute = cm.ComputeTimes(forward_s=0.3 * step_s, backward_s=0.6 * step_s, optimizer_s=0.1 * step_s)
        for point in cm.project_scaling(compute, spec, topology=cm.h100_cluster(gbps), micro_batch=16):
            assert 0 < point.efficiency <= 1.0
            assert point.imgs_per_s == pytest.approx(point.efficiency * point.ideal_imgs_per_s)
    compute = cm.ComputeTimes(forward_s=0.0085, backward_s=0.017, optimizer_s=0.0011)
    zero2 = cm.CommSpec(zero_stage=2, num_params=11_000_000)
    (one_node,) = cm.project_scaling(compute, zero2, topology=cm.h100_cluster(200), micro_batch=16, node_counts=[1])
    assert 8 * 16 / compute.total_s < one_node.imgs_per_s  # above N x one GPU: the partitioned update
    assert one_node.efficiency < 1.0


def test_the_ema_runs_in_full_on_every_rank_below_zero3_while_zero_partitions_the_update():
    compute = cm.ComputeTimes(forward_s=0.1, backward_s=0.2, optimizer_s=0.04, ema_s=0.02)
    assert compute.total_s == pytest.approx(0.36)
    assert compute.on_ranks(cm.CommSpec(zero_stage=2, num_params=PSI), 4) == pytest.approx(0.3 + 0.01 + 0.02)
    assert compute.on_ranks(cm.CommSpec(zero_stage=3, num_params=PSI), 4) == pytest.approx(0.3 + 0.01 + 0.005)
    assert compute.on_ranks(cm.CommSpec(zero_stage=None, num_params=PSI), 4) == pytest.approx(0.36)


def test_yolods_stop_agreement_is_one_tiny_all_reduce_after_the_step():
    plain = cm.step_collectives(cm.CommSpec(zero_stage=0, num_params=PSI))
    with_stop = cm.step_collectives(cm.CommSpec(zero_stage=0, num_params=PSI, stop_agreement=True))
    (extra,) = [c for c in with_stop if c not in plain]
    assert (extra.op, extra.message_bytes, extra.calls, extra.phase) == (cm.ALL_REDUCE, 8, 1, "after_step")


def _probe(link: cm.Link, *, ranks: int = 2, jitter: dict[int, float] | None = None) -> dict:
    sizes = [4096, 2**20, 2**23, 2**25]
    ops = {}
    for op in (cm.ALL_REDUCE, cm.ALL_GATHER, cm.REDUCE_SCATTER):
        seconds = [
            cm.collective_time_s(cm.Collective(op, size, 1, "backward", False), num_ranks=ranks, link=link)
            * (jitter or {}).get(i, 1.0)
            for i, size in enumerate(sizes)
        ]
        fitted = cm.fit_link(op=op, num_ranks=ranks, message_bytes=sizes, seconds=seconds)
        ops[op] = {
            "message_bytes": sizes,
            "seconds": seconds,
            "latency_s": fitted.latency_s,
            "bandwidth_bytes_per_s": fitted.bandwidth_bytes_per_s,
        }
    return {"backend": "gloo", "ops": ops}


def _full_line(
    engine: str,
    world_size: int,
    imgs_per_s: float,
    *,
    zero_stage: int | None = None,
    forward_s: float = 0.1,
    source: dict | None = None,
    repeats: list[float] | None = None,
    probe: dict | None = None,
    logged: dict | None = None,
) -> dict:
    """A results line as the bench writes it, small and made up: enough for every report section."""
    spec = cm.CommSpec(zero_stage=zero_stage, num_params=PSI, stop_agreement=engine == "deepspeed")
    step_s = 8 * world_size / imgs_per_s
    line = {
        "schema": 2, "engine": engine, "zero_stage": zero_stage, "precision": "fp32", "model": "yolov8n.yaml",
        "imgsz": 160, "micro_batch": 8, "global_batch": 8 * world_size, "input": "synthetic", "label": None,
        "world_size": world_size, "num_nodes": 1, "ranks_per_node": world_size, "imgs_per_s": imgs_per_s,
        "imgs_per_s_per_rank": imgs_per_s / world_size, "steps": 10, "warmup_steps": 3, "run_id": "r",
        "timestamp": f"2026-11-29T00:00:0{world_size}+00:00", "load_avg": [2.0, 2.0, 2.0],
        "step_time_s": {"mean": step_s, "median": step_s, "p90": step_s, "min": step_s, "max": step_s},
        "breakdown_s": {"data_wait": 0.0, "forward": forward_s, "backward": 0.2, "optimizer": 0.04},
        "peak_mem_bytes": (900 + 50 * bool(zero_stage)) * 2**20, "peak_mem_source": "rss_peak",
        "model_state_bytes": {"params": 12 * PSI // 3, "grads": 4 * PSI, "optimizer": 8 * PSI, "total": 16 * PSI},
        "num_params": PSI,
        "comm": {"spec": vars(spec), "bytes_per_rank_per_step": 0.0, "logged_per_step": logged},
        "config": {"device": "cpu", "train_settings": {"optimizer": "AdamW"}},
        "versions": {"torch": "2.14.1", "yolods_commit": "abc"},
        "source": source if source is not None else {"commit": "abc", "dirty": False, "changes": [], "num_changes": 0},
        "hardware": {"cpu": "test CPU", "cpu_count": 2, "torch_threads_per_rank": 1},
        "interconnect": {"backend": "gloo", **({"probe": probe} if probe else {})},
    }  # fmt: skip
    if repeats:
        line["imgs_per_s_repeats"] = repeats
    return line


def test_provenance_tells_clean_dirty_and_unrecorded_lines_apart():
    from yolods.bench import provenance

    clean = _full_line("ddp", 1, 30.0)
    dirty = _full_line("ddp", 2, 40.0, source={"commit": "abc", "dirty": True, "changes": [" M yolods/x.py"]})
    legacy_dirty = {"versions": {"yolods_commit": "def-dirty"}}
    legacy = {"versions": {"yolods_commit": "def"}}  # before `source`: a clean tree looked the same
    assert provenance.line_source(clean) == ("abc", provenance.CLEAN)
    assert provenance.line_source(dirty) == ("abc", provenance.DIRTY)
    assert provenance.line_source(legacy_dirty) == ("def", provenance.DIRTY)
    assert provenance.line_source(legacy) == ("def", provenance.UNRECORDED)
    state = provenance.provenance([clean, dirty, legacy_dirty, legacy])
    assert (state.count(provenance.DIRTY), state.count(provenance.UNRECORDED), state.all_clean) == (2, 1, False)


def test_measured_efficiency_above_100_percent_is_reported_with_its_spread():
    from yolods.bench.analysis import measured_scaling

    lines = [
        _full_line("ddp", 1, 30.0, repeats=[28.0, 30.0, 33.0]),
        _full_line("ddp", 2, 61.0, repeats=[57.0, 61.0, 63.0]),  # paired ratios 2.04, 2.03, 1.91
    ]
    (row,) = measured_scaling(lines)
    assert row.efficiency == pytest.approx(61 / 30 / 2)  # the median paired ratio, over 2 ranks
    assert row.low == pytest.approx(57 / 66) and row.high == pytest.approx(63 / 56)
    assert "noise" in row.note  # the spread reaches below 100%
    lines[1] = _full_line("ddp", 2, 50.0, repeats=[49.0, 50.0, 51.0])
    assert measured_scaling(lines)[0].note == ""


def test_link_fits_and_the_step_are_scored_on_points_they_were_not_fitted_to():
    from yolods.bench import validation
    from yolods.bench.analysis import two_rank_checks

    link = cm.Link(bandwidth_bytes_per_s=1e9, latency_s=1e-4)
    exact = validation.probe_holdout([_full_line("ddp", 2, 40.0, probe=_probe(link))])
    assert len(exact) == 3 * 4  # 3 ops x (2 splits x 2 held-out sizes)
    assert max(abs(point.error) for point in exact) < 1e-9  # an exactly linear link is predicted exactly
    off = validation.probe_holdout([_full_line("ddp", 2, 40.0, probe=_probe(link, jitter={2: 2.0}))])
    at_8_mib = [p for p in off if p.check.endswith("at 8 MiB") and p.fitted_on == "probe at 4 KiB + 32 MiB"]
    assert all(p.error == pytest.approx(-0.5, abs=0.01) for p in at_8_mib)  # measured twice the line: -50%
    # in-step collectives: the probe's link at the logged calls and bytes (all-gather inputs are shards)
    logged = {"all_gather_into_tensor": {"calls": 3, "message_bytes": 4e6, "seconds": 0.01}}
    zero2 = _full_line("deepspeed", 2, 40.0, zero_stage=2, probe=_probe(link), logged=logged)
    (point,) = validation.logged_op_checks([zero2])
    assert point.predicted_s == pytest.approx(3 * 1e-4 + 0.5 * 8e6 / 1e9, rel=1e-6)
    assert validation.logged_op_prediction({**zero2, "zero_stage": 3}, "all_gather_into_tensor", logged[
        "all_gather_into_tensor"]) is None  # fmt: skip
    # the step: each line's compute slowdown is the median of the *other* lines' (leave one out)
    lines = [
        _full_line("ddp", 1, 80.0),
        _full_line("ddp", 2, 100.0, forward_s=0.15, probe=_probe(link)),
        _full_line("deepspeed", 1, 80.0, zero_stage=0),
        _full_line("deepspeed", 2, 100.0, zero_stage=0, forward_s=0.2, probe=_probe(link)),
    ]
    checks = {check.label: check for check in two_rank_checks(lines)}
    ddp, zero0 = checks["DDP fp32 yolov8n.yaml@160"], checks["ZeRO-0 fp32 yolov8n.yaml@160"]
    assert (ddp.forward_slowdown, ddp.heldout_slowdown) == (pytest.approx(1.5), pytest.approx(2.0))
    assert (zero0.forward_slowdown, zero0.heldout_slowdown) == (pytest.approx(2.0), pytest.approx(1.5))
    summaries = validation.summarize(validation.step_holdout(list(checks.values())))
    assert [summary.points for summary in summaries] == [2]


def test_bench_require_clean_refuses_a_dirty_tree_before_measuring(tmp_path, monkeypatch, capsys):
    from yolods.bench import cli

    dirty = {"commit": "abc123", "dirty": True, "changes": [" M yolods/step.py"], "num_changes": 1}
    monkeypatch.setattr(cli.provenance, "source_record", lambda: dirty)
    code = cli.main(["--engine", "ddp", "--zero", "0", "--require-clean", "--out", str(tmp_path)])
    assert code == 2 and "yolods/step.py" in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()
    # --fit and --tune measure too: they ran on a dirty tree and exited 0
    fit = ["--fit", "micro-batch", "--memory-budget-gib", "1", "--require-clean", "--out", str(tmp_path)]
    assert cli.main(fit) == 2 and "--require-clean" in capsys.readouterr().err


TINY_SWEEP = ["--model", "n", "--imgsz", "64", "--micro-batch", "2", "--steps", "1", "--warmup-steps", "1"]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        # each failed only after the link probe or the first configuration, or exited 0 having measured nothing
        (["--engine", "ultralytics", "--data", "nope.yaml"], "--data nope.yaml: file not found"),
        (["--engine", "ultralytics", "--precision", "bf16"], "Ultralytics trains in fp32 only on a CPU"),
        (["--engine", "ddp", "--device", "cuda"], "torch sees no CUDA device here"),
        (["--zero", "0", "--channels-last", "on,off"], "on a CPU yolods and Ultralytics both train NCHW"),
        (["--engine", "ddp", "--out", "{file}"], "is a file: name a directory"),
        (["--fit", "micro-batch", "--engine", "ultralytics", "--memory-budget-gib", "1"], "not the Ultralytics"),
        (["--fit", "micro-batch", "--memory-budget-gib", "-1"], "--memory-budget-gib -1 must be above 0"),
        # --tune ran, and skipped every larger micro batch
        (["--tune", "--memory-budget-gib", "0"], "--memory-budget-gib 0 must be above 0"),
        (["--tune", "--budget-min", "-5"], "--budget-min -5 must be above 0"),
        (["--tune", "--engine", "ddp"], "--tune searches DeepSpeed's settings only"),  # tuned DeepSpeed anyway
        (["--tune", "--repeat", "3"], "--tune measures each candidate once"),  # the repeat was ignored
    ],
)
def test_bench_inputs_that_cannot_run_are_one_line_before_measuring(flags, fragment, tmp_path, capsys):
    from yolods.bench import cli

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    (tmp_path / "afile").write_text("")
    flags = [flag.replace("{file}", str(tmp_path / "afile")) for flag in flags]
    out = [] if "--out" in flags else ["--out", str(tmp_path / "out")]
    assert cli.main([*TINY_SWEEP, *flags, *out]) == 2
    error = capsys.readouterr().err.strip()
    assert fragment in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--link-gbps", "foo"], "takes Gb/s numbers"),  # a ValueError traceback
        (["--link-gbps", "0"], "must be above 0 Gb/s"),  # ZeroDivisionError
        (["--ranks-per-node", "0"], "--ranks-per-node 0 must be at least 1"),
        (["--gpu-imgs-per-s", "-5"], "a rate must be above 0"),  # an AssertionError
        (["--goal-micro-batch", "0"], "--goal-micro-batch 0 must be at least 1"),
        (["--goal-imgsz", "100"], "--goal-imgsz 100 is not a positive multiple of the model stride 32"),
        (["--goal-imgsz", "0"], "--goal-imgsz 0 is not a positive multiple of the model stride 32"),
        (["--network-latency-us", "-5"], "must be at least 0"),  # reported with a negative latency
    ],
)
def test_report_flags_no_projection_can_use_are_one_line(flags, fragment, tmp_path, capsys):
    from yolods.bench.report import main

    assert main([str(tmp_path), *flags]) == 2
    assert fragment in capsys.readouterr().err


def test_report_leaves_out_foreign_and_truncated_lines_and_needs_a_yolods_line(tmp_path, capsys):
    from yolods.bench.report import main

    baseline = _line("ultralytics", 20.0, world_size=1)
    (tmp_path / "results.jsonl").write_text(json.dumps(baseline) + "\n" + '{"a": 1}\n' + json.dumps(baseline)[:40])
    assert main([str(tmp_path)]) == 2  # it crashed in the plots: no yolods line to plot
    err = capsys.readouterr().err
    assert "results.jsonl:2: not a bench line" in err and "results.jsonl:3: not JSON" in err
    assert "holds no yolods line (DeepSpeed or DDP) to report on (1 Ultralytics baseline line(s))" in err


def test_report_flags_dirty_rows_labels_assumptions_and_refuses_with_require_clean(tmp_path, monkeypatch):
    from yolods.bench import plots
    from yolods.bench.projection import Cluster, Goal
    from yolods.bench.report import DirtyResultsError, write_report

    for name in [name for name in vars(plots) if name.startswith("plot_")]:  # the end-to-end test draws them
        monkeypatch.setattr(plots, name, lambda *args, **kwargs: tmp_path / "not_drawn.png")

    link = cm.Link(bandwidth_bytes_per_s=1e9, latency_s=1e-4)
    dirty = {"commit": "abc", "dirty": True, "changes": [" M yolods/step.py"], "num_changes": 1}
    lines = [
        _full_line("ddp", 1, 80.0),
        _full_line("ddp", 2, 100.0, forward_s=0.15, probe=_probe(link)),
        _full_line("deepspeed", 1, 75.0, zero_stage=2),
        _full_line("deepspeed", 2, 95.0, zero_stage=2, forward_s=0.15, probe=_probe(link), source=dirty),
    ]
    for line in lines:
        append_line(tmp_path, line)
    options = {"goal": Goal(model="yolov8n.yaml"), "cluster": Cluster(), "assumed_imgs_per_s": 600.0}
    with pytest.raises(DirtyResultsError, match="1 of 4 configurations come from a dirty tree"):
        write_report(tmp_path, require_clean=True, **options)
    assert not (tmp_path / "report.md").exists()
    report = write_report(tmp_path, **options).read_text()
    assert "rows from a dirty tree: 1 of 4" in report
    assert "| `abc` | **dirty** | 1 |" in report
    for constant in ("per-GPU compute", "network latency per ring hop", "NVLink inside a node", "compute split"):
        assert f"**ASSUMED** {constant}" in report
    assert "| 300 img/s | 600 img/s | 900 img/s | 1200 img/s |" in report  # the sensitivity grid
    assert "## The communication model on points it was not fitted to" in report
    assert "| 1 -> 2 rank step |" in report
    projected = report[report.index("Scaling efficiency (global img/s)") :]
    percents = [float(cell) for cell in re.findall(r"(\d+(?:\.\d+)?)% \(", projected)]
    assert percents and max(percents) <= 100


# ----------------------------------------------------------------------------------------------------------------
# End to end: one process with real input and the Ultralytics baseline, two gloo ranks, then the report


def _run(command: list[str], *, timeout: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


TINY = ["--model", "yolov8n.yaml", "--imgsz", "64", "--micro-batch", "2", "--steps", "2", "--warmup-steps", "1"]


@pytest.mark.multirank
def test_bench_on_one_and_two_ranks_then_report(tmp_path):
    out = tmp_path / "bench"
    _run(
        [sys.executable, "-m", "yolods.bench", *TINY, "--engine", "deepspeed,ultralytics", "--zero", "0",
         "--input", "real", "--out", str(out)],
        timeout=180,
    )  # fmt: skip
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "yolods.bench", *TINY,
         "--engine", "deepspeed,ddp", "--zero", "2", "--input", "synthetic", "--comms-logger", "--out", str(out)],
        timeout=180,
    )  # fmt: skip
    lines = [json.loads(text) for text in (out / "results.jsonl").read_text().splitlines()]
    assert {(line["engine"], line["world_size"]) for line in lines} == {
        ("deepspeed", 1), ("ultralytics", 1), ("deepspeed", 2), ("ddp", 2)
    }  # fmt: skip
    for line in lines:
        assert set(REQUIRED_KEYS) <= set(line)
        assert line["imgs_per_s"] > 0 and line["peak_mem_bytes"] > 0
        assert isinstance(line["source"]["dirty"], bool)  # which code measured it (a git checkout here)
        if line["engine"] != "ultralytics":  # phases reported by the step itself (TrainStep.on_phase, DDPStepper)
            assert set(line["breakdown_s"]) == {"data_wait", "forward", "backward", "optimizer"}
            assert min(line["breakdown_s"].values()) > 0
    zero2 = next(line for line in lines if line["engine"] == "deepspeed" and line["world_size"] == 2)
    assert zero2["zero_stage"] == 2 and zero2["interconnect"]["probe"]["backend"] == "gloo"
    assert zero2["model_state_bytes"]["grads"] < zero2["model_state_bytes"]["params"]  # partitioned gradients
    whole_ema = 4 * zero2["num_params"]  # fp32 on every rank below ZeRO-3 (tests/test_world_size.py: 4P/N at 3)
    assert whole_ema <= zero2["model_state_bytes"]["ema"] < 1.05 * whole_ema and zero2["ema_update_s"] > 0
    assert "all_gather_into_tensor" in zero2["comm"]["logged_per_step"]
    _run([sys.executable, "-m", "yolods.bench.report", str(out)], timeout=120)
    report = (out / "report.md").read_text()
    assert "## Goals" in report and "ZeRO paper" in report and "Projection" in report
    assert "## Provenance" in report and "not fitted to" in report
    for png in (
        "throughput_vs_ranks",
        "throughput_vs_nodes",
        "scaling_efficiency",
        "memory_per_rank",
        "step_breakdown",
    ):
        assert (out / f"{png}.png").stat().st_size > 10_000
