"""Measure one configuration on every rank and merge the ranks' figures into one results line (rank 0).

build through yolods.build (engines.build_bench_engine) -> burn in -> timed window -> model states -> optional
comms log -> free. For DeepSpeed the step timed is yolods.step.TrainStep, the code `yolods.train` runs, fed raw
collated batches (inputs) and called with the iteration counting on, epoch 0, never the last of its epoch.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import torch

from yolods import dist
from yolods.bench import inputs
from yolods.bench.comm_model import CommSpec, Link, collective_time_s, comm_bytes_per_rank, step_collectives
from yolods.bench.engines import BenchEngine, build_bench_engine
from yolods.bench.measure import (
    all_gather_object,
    logged_comm_per_step,
    mean_phases,
    run_steps,
    step_stats,
    time_steps,
)
from yolods.bench.memory import ModelStateBytes, PeakMemory, release_memory
from yolods.bench.sweep import BenchConfig
from yolods.config import GRADIENT_CLIP_NORM

COMMS_LOGGER_STEPS = 3


def dataset_images(cfg: BenchConfig) -> int:
    """Images for real input: one epoch holds every step, so no loader restart lands in the timed window."""
    return (cfg.warmup_steps + cfg.steps + COMMS_LOGGER_STEPS + 3) * cfg.global_batch


def _batches(cfg: BenchConfig, bench: BenchEngine) -> Iterator[dict[str, Any]]:
    """Raw collated batches, as the train loader yields them: the step under test preprocesses them."""
    if cfg.input == "synthetic":
        num_classes, _ = inputs.shapes_num_classes()
        batch = inputs.synthetic_batch(
            micro_batch=cfg.micro_batch,
            imgsz=cfg.imgsz,
            num_classes=num_classes,
            device=bench.device,
            seed=cfg.seed + dist.get_rank(),
        )
        return inputs.repeat_batch(batch)
    assert bench.train_data is not None, "real input builds the train split"
    return inputs.real_batches(bench.train_data)


def _model_states_mid_step(bench: BenchEngine, batch: dict[str, Any], *, iteration: int) -> ModelStateBytes:
    """One more step, counted when its backward ends: gradients and optimizer states both exist then."""
    captured: list[ModelStateBytes] = []

    def at_phase_end(phase: str) -> None:
        if phase == "backward":
            captured.append(bench.model_states())

    bench.step.on_phase = at_phase_end
    try:
        bench.step(batch, iteration=iteration, epoch=0, last_in_epoch=False)
    finally:
        bench.step.on_phase = None
    (states,) = captured
    return states


def measure_training(
    cfg: BenchConfig, *, device: torch.device, data_yaml: str | None, links: dict[str, Link] | None
) -> dict[str, Any] | None:
    """Measure a DeepSpeed or DDP configuration on every rank; rank 0 gets the merged figures, others None."""
    peak = PeakMemory(device)
    peak.reset()
    rank_result, facts = _measure_this_rank(cfg, data_yaml=data_yaml, peak=peak)
    release_memory()  # the model, engine and batches went out of scope with the call
    per_rank = all_gather_object(rank_result)
    if not dist.is_main_process():
        return None
    return _merge(cfg, per_rank, links=links, peak_source=peak.source, **facts)


def _measure_this_rank(
    cfg: BenchConfig, *, data_yaml: str | None, peak: PeakMemory
) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's figures, and the facts about the configuration the results line records."""
    bench = build_bench_engine(
        cfg, data_yaml=data_yaml if cfg.input == "real" else None, synthetic_images=dataset_images(cfg)
    )
    batches = _batches(cfg, bench)
    iterations = itertools.count()  # the Trainer's iteration: never repeats, so every step is a boundary
    timers = bench.timers
    records, window_s = time_steps(
        bench.step,
        batches,
        iterations,
        steps=cfg.steps,
        warmup_steps=cfg.warmup_steps,
        device=bench.device,
        on_window_start=timers.reset if timers else None,
        after_step=timers.add_step if timers else None,
    )
    ds_breakdown = timers.per_step(steps=cfg.steps) if timers else None
    states = _model_states_mid_step(bench, next(batches), iteration=next(iterations))
    ema_update_s = bench.ema_update_s()  # after the timed window: these extra updates change no figure above
    logged = None
    if cfg.comms_logger and cfg.engine == "deepspeed":
        logged = logged_comm_per_step(
            lambda count: run_steps(bench.step, batches, iterations, count), steps=COMMS_LOGGER_STEPS
        )
    rank_result = {
        "step_times_s": [record.total_s for record in records],
        "breakdown_s": mean_phases(records),
        "window_s": window_s,
        "peak_mem_bytes": peak.peak_bytes(),
        "model_state_bytes": states.as_dict(),
        "ema_update_s": ema_update_s,
        "ds_wall_clock_breakdown_s": ds_breakdown,
        "comm_logged": logged,
    }
    plan, train_hyp = bench.plan, bench.train_hyp
    ds_config = plan.ds_config if cfg.engine == "deepspeed" else None
    facts = {
        "zero_stage": plan.zero_stage if ds_config else None,
        "num_params": bench.num_params,
        "spec": bench.spec,
        "ds_config": ds_config,
        "train_settings": {
            "optimizer": bench.optimizer_name,
            "lr0": train_hyp.lr0,
            "momentum": train_hyp.momentum,
            "weight_decay": train_hyp.weight_decay,
            "nbs": train_hyp.nbs,
            "gradient_clipping": (ds_config or {}).get("gradient_clipping", GRADIENT_CLIP_NORM),
            "ema": cfg.ema,
        },
    }
    bench.close()
    return rank_result, facts


def _merge(
    cfg: BenchConfig,
    per_rank: list[dict[str, Any]],
    *,
    zero_stage: int | None,
    num_params: int,
    spec: CommSpec,
    links: dict[str, Link] | None,
    ds_config: dict[str, Any] | None,
    train_settings: dict[str, Any],
    peak_source: str,
) -> dict[str, Any]:
    """One line's measured part from every rank's figures: throughput from the slowest window, memory maxima."""
    world_size = len(per_rank)
    window_s = max(rank["window_s"] for rank in per_rank)
    imgs_per_s = cfg.global_batch * cfg.steps / window_s
    phases = per_rank[0]["breakdown_s"].keys()
    collectives = step_collectives(spec)
    comm = {
        "spec": asdict(spec),
        "bytes_per_rank_per_step": comm_bytes_per_rank(spec, num_ranks=world_size),
        "collectives": [asdict(collective) for collective in collectives],
        "model_time_s": (  # with this job's probed links; the report also projects other links
            sum(collective_time_s(c, num_ranks=world_size, link=links[c.op]) for c in collectives) if links else None
        ),
        "logged_per_step": per_rank[0]["comm_logged"],
    }
    states_per_rank = [rank["model_state_bytes"] for rank in per_rank]
    return {
        "engine": cfg.engine,
        "zero_stage": zero_stage,
        "precision": cfg.precision,
        "micro_batch": cfg.micro_batch,
        "global_batch": cfg.global_batch,
        "imgsz": cfg.imgsz,
        "model": cfg.model,
        "input": cfg.input,
        "label": replace(cfg, zero_stage=zero_stage).label,  # a DeepSpeed JSON's stage is known only now
        "steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "imgs_per_s": imgs_per_s,
        "imgs_per_s_per_rank": imgs_per_s / world_size,
        "step_time_s": step_stats(per_rank[0]["step_times_s"]),
        "breakdown_s": {phase: statistics.fmean(rank["breakdown_s"][phase] for rank in per_rank) for phase in phases},
        "breakdown_s_per_rank": [rank["breakdown_s"] for rank in per_rank],
        "ds_wall_clock_breakdown_s": per_rank[0]["ds_wall_clock_breakdown_s"],
        "peak_mem_bytes": max(rank["peak_mem_bytes"] for rank in per_rank),
        "peak_mem_bytes_per_rank": [rank["peak_mem_bytes"] for rank in per_rank],
        "peak_mem_source": peak_source,
        "model_state_bytes": {key: max(states[key] for states in states_per_rank) for key in states_per_rank[0]},
        "model_state_bytes_per_rank": states_per_rank,
        "ema_update_s": max(rank["ema_update_s"] for rank in per_rank) if cfg.ema else None,
        "num_params": num_params,
        "comm": comm,
        "config": {**cfg.as_dict(), "resolved_deepspeed_config": ds_config, "train_settings": train_settings},
    }


def measure_ultralytics(cfg: BenchConfig, *, data_yaml: str) -> dict[str, Any]:
    """The Ultralytics trainer at world size 1 (rank 0 only), in the same line format."""
    from yolods.bench.ultralytics_baseline import run_baseline

    result = run_baseline(cfg, data_yaml=data_yaml)
    steps = len(result["step_times_s"])
    imgs_per_s = cfg.micro_batch * steps / result["window_s"]
    return {
        "engine": "ultralytics",
        "zero_stage": None,
        "precision": cfg.precision,
        "micro_batch": cfg.micro_batch,
        "global_batch": cfg.micro_batch,
        "imgsz": cfg.imgsz,
        "model": cfg.model,
        "input": "real",
        "label": cfg.label,
        "steps": steps,
        "warmup_steps": max(cfg.warmup_steps, 1),
        "imgs_per_s": imgs_per_s,
        "imgs_per_s_per_rank": imgs_per_s,
        "step_time_s": step_stats(result["step_times_s"]),
        "breakdown_s": None,  # only batch boundaries are visible from a callback
        "peak_mem_bytes": result["peak_mem_bytes"],
        "peak_mem_bytes_per_rank": [result["peak_mem_bytes"]],
        "peak_mem_source": result["peak_mem_source"],
        "model_state_bytes": None,
        "num_params": None,
        "comm": None,
        "config": {**cfg.as_dict(), "torch_threads": result["torch_threads"]},
    }
