"""`python -m yolods.bench --tune`: the fastest DeepSpeed config for this machine, model and image size, in minutes.

    python -m yolods.bench --tune --model s --imgsz 640                                  # 1 rank, 5 minutes
    torchrun --nproc_per_node 8 -m yolods.bench --tune --model s --imgsz 640 --budget-min 10
    deepspeed --num_gpus 8 --module yolods.bench --tune --model s --imgsz 640

Coordinate descent, one setting at a time from the best so far, each candidate measured by the bench's runner
(runner.measure_training: built through yolods.build, the TrainStep yolods.train runs, burn-in then timed steps,
synthetic input: one batch made on the device, so the loader's speed does not decide) on every rank of this job:

1. ZeRO stage (--zero; default 0,1,2,3) at yolods' default buckets and the given micro batch and precision;
2. reduce_bucket_size (--reduce-bucket-size; default 2e6,2e7,2e8 elements) at the best stage (none at ZeRO-0);
3. allgather_bucket_size (ZeRO-3: stage3_prefetch_bucket_size; --allgather-bucket-size) likewise;
4. micro batch: doubled while it gains, at most 3 times, and only while its peak memory, extrapolated from the
   points measured, stays within the budget (--memory-budget-gib; default the GPU's memory, or on CPU 80% of the
   memory available at start shared by this node's ranks); from a single point the extrapolation scales the whole
   peak, so on a CPU such a doubling is measured instead, and any candidate whose measured peak passes the budget
   is not eligible; one --micro-batch value is where the doubling starts, a list of several the micro batches to
   try instead;
5. precision (--precision; default fp32,bf16, with fp16 on CUDA only: on CPU it is ~50x slower).

A candidate replaces the best so far only when faster by more than TUNE_MARGIN: differences below that are noise
on a shared machine, and the earlier candidate is the simpler one (lower stage, yolods' default buckets). Before
each candidate, if the time it is expected to take (the median of those measured, scaled by its micro batch) would
overrun --budget-min, the search stops with the best so far. Rank 0 decides and broadcasts every decision, so all
ranks run the same candidates. On one rank a candidate that fails (out of memory) is recorded and the search goes
on; on several, the failure ends the job, as in the sweep.

Writes into --out (default runs/tune): ds_tuned.json, a DeepSpeed config for `yolods.train --deepspeed_config`
(checked by yolods.ds_validation and resolve_run at this world size), tune.md and tune.json (every candidate with
img/s and peak memory per rank), and prints the command that trains with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from yolods import dist
from yolods.bench.engines import bench_plan
from yolods.bench.markdown import table
from yolods.bench.memory import release_memory
from yolods.bench.results import run_context
from yolods.bench.runner import measure_training
from yolods.bench.sweep import BenchConfig, count_label, expand, parse_count, split_list
from yolods.config import (
    BUCKET_ELEMENTS,
    SYNTHETIC,
    ConfigError,
    RunConfig,
    default_deepspeed_config,
    resolve_run,
    write_json,
)

TUNE_STEPS, TUNE_WARMUP_STEPS = 6, 2
TUNE_MARGIN = 0.03  # a candidate must beat the best so far by this much: less is noise on a shared machine
DEFAULT_BUCKETS = (2_000_000, 20_000_000, 200_000_000)
MICRO_BATCH_DOUBLINGS = 3
CPU_MEMORY_SHARE = 0.8  # of the memory available at start, shared by this node's ranks
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
GIB = 2**30


@dataclass(frozen=True)
class TuneSpace:
    """The values each coordinate may take."""

    stages: tuple[int, ...]
    reduce_buckets: tuple[int, ...]
    allgather_buckets: tuple[int, ...]
    micro_batches: tuple[int, ...] | None  # None: doubling from the starting micro batch
    precisions: tuple[str, ...]
    memory_budget_bytes: int


@dataclass(frozen=True)
class Trial:
    """One candidate: what it changed, and what it measured (None where it did not run or failed)."""

    index: int
    phase: str
    config: BenchConfig
    status: str  # ok, failed, skipped
    imgs_per_s: float | None = None
    step_time_s: float | None = None
    peak_mem_bytes: int | None = None
    wall_s: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Tuner:
    """The search on every rank: candidates are measured together, decisions come from rank 0."""

    def __init__(self, space: TuneSpace, *, device: torch.device, budget_s: float, keep_going: bool):
        self.space = space
        self.device = device
        self.deadline = time.monotonic() + budget_s
        self.keep_going = keep_going
        self.trials: list[Trial] = []
        self.best: Trial | None = None
        self.out_of_time = False

    def search(self, base: BenchConfig) -> Trial:
        """All five coordinates in turn; returns the best trial."""
        for stage in self.space.stages:
            self.try_candidate("zero_stage", replace(base, zero_stage=stage))
        if self.best is None:
            raise RuntimeError("no ZeRO stage ran: see tune.md for each candidate's error")
        if self.best.config.zero_stage != 0:  # ZeRO-0 all-reduces in DeepSpeed's fixed buckets
            for bucket in self.space.reduce_buckets:
                if bucket != _bucket(self.best.config, "reduce_bucket_size"):
                    self.try_candidate("reduce_bucket_size", replace(self.best.config, reduce_bucket_size=bucket))
            for bucket in self.space.allgather_buckets:
                if bucket != _bucket(self.best.config, "allgather_bucket_size"):
                    self.try_candidate("allgather_bucket_size", replace(self.best.config, allgather_bucket_size=bucket))
        for micro_batch in self._micro_batches():
            self.try_candidate("micro_batch", _with_micro_batch(self.best.config, micro_batch))
        for precision in self.space.precisions:
            if precision != self.best.config.precision:
                self.try_candidate("precision", replace(self.best.config, precision=precision))
        return self.best

    def _micro_batches(self) -> Iterator[int]:
        """Explicit micro batches, or doubling from the best while each doubling wins and fits the budget."""
        assert self.best is not None
        if self.space.micro_batches is not None:
            yield from (mb for mb in self.space.micro_batches if mb != self.best.config.micro_batch)
            return
        for _ in range(MICRO_BATCH_DOUBLINGS):
            best_before = self.best
            candidate = _with_micro_batch(best_before.config, best_before.config.micro_batch * 2)
            predicted, points = self._predicted_peak(candidate)
            # From one point the prediction scales the whole peak, torch's own ~0.5 GiB included: on a GPU that
            # errs on the safe side of an out-of-memory; on a CPU there is none to fear, so measure and judge the
            # measured peak (try_candidate) instead.
            trusted = points > 1 or self.device.type == "cuda"
            if trusted and predicted > self.space.memory_budget_bytes:
                self._record_skip(
                    "micro_batch",
                    candidate,
                    f"predicted peak {predicted / GIB:.2f} GiB > budget {self.space.memory_budget_bytes / GIB:.2f}",
                )
                return
            yield candidate.micro_batch
            if self.best is best_before:  # the doubling did not win: larger ones will not either
                return

    def _predicted_peak(self, candidate: BenchConfig) -> tuple[float, int]:
        """Peak memory at `candidate`'s micro batch, and how many measured points it rests on: linear through the
        two largest measured micro batches of the same settings, or proportional to one (an overestimate: part of
        the peak does not grow with the batch)."""
        settings = replace(candidate, micro_batch=0, global_batch=0)
        points = sorted(
            {
                trial.config.micro_batch: trial.peak_mem_bytes
                for trial in self.trials
                if trial.ok
                and trial.peak_mem_bytes
                and replace(trial.config, micro_batch=0, global_batch=0) == settings
            }.items()
        )
        if not points:
            return 0.0, 0
        (mb_a, peak_a), (mb_b, peak_b) = (points[-2], points[-1]) if len(points) > 1 else ((0, 0), points[-1])
        per_image = (peak_b - peak_a) / (mb_b - mb_a)
        return peak_b + per_image * (candidate.micro_batch - mb_b), len(points)

    def try_candidate(self, phase: str, cfg: BenchConfig) -> None:
        """Measure `cfg` on every rank unless the budget is spent; it becomes the best if it wins by the margin."""
        expected_s = self._expected_s(cfg)
        overrun = bool(self.trials) and time.monotonic() + expected_s > self.deadline
        if dist.broadcast_object(self.out_of_time or overrun):  # rank 0's clock decides for every rank
            self.out_of_time = True
            self._record_skip(phase, cfg, f"time budget: needs ~{expected_s:.0f} s more")
            return
        started = time.monotonic()
        trial = self._measure(phase, cfg)
        trial = dist.broadcast_object(replace(trial, wall_s=time.monotonic() - started))
        best = self.best
        budget = self.space.memory_budget_bytes
        if trial.ok and trial.peak_mem_bytes and trial.peak_mem_bytes > budget:
            trial = replace(
                trial, note=f"peak {trial.peak_mem_bytes / GIB:.2f} GiB > budget {budget / GIB:.2f}: not eligible"
            )
        elif trial.ok and (best is None or trial.imgs_per_s > best.imgs_per_s * (1 + TUNE_MARGIN)):
            gain = "" if best is None else f"+{(trial.imgs_per_s / best.imgs_per_s - 1) * 100:.0f}% over #{best.index}"
            trial = replace(trial, note=f"best so far {gain}".strip())
            self.best = trial
        elif trial.ok:
            change = (trial.imgs_per_s / best.imgs_per_s - 1) * 100
            trial = replace(trial, note=f"{change:+.0f}% vs #{best.index}: kept #{best.index}")
        self.trials.append(trial)
        if dist.is_main_process():
            print(f"yolods.bench --tune [{trial.index}] {phase}: {cfg.label}: {_summary(trial)}", flush=True)

    def _measure(self, phase: str, cfg: BenchConfig) -> Trial:
        index = len(self.trials) + 1
        try:
            measured = measure_training(cfg, device=self.device, data_yaml=None, links=None)
        except Exception as error:
            if not self.keep_going:
                raise
            release_memory()
            message = " ".join(str(error).split())[:200]
            return Trial(
                index=index, phase=phase, config=cfg, status="failed", note=f"{type(error).__name__}: {message}"
            )
        if measured is None:  # ranks other than 0: rank 0's trial is broadcast
            return Trial(index=index, phase=phase, config=cfg, status="ok")
        return Trial(
            index=index,
            phase=phase,
            config=cfg,
            status="ok",
            imgs_per_s=measured["imgs_per_s"],
            step_time_s=measured["step_time_s"]["median"],
            peak_mem_bytes=measured["peak_mem_bytes"],
        )

    def _expected_s(self, cfg: BenchConfig) -> float:
        """Median seconds a candidate took, scaled by micro batch (a larger batch's steps take longer)."""
        measured = [trial for trial in self.trials if trial.status != "skipped"]
        if not measured:
            return 0.0
        return statistics.median(trial.wall_s * cfg.micro_batch / trial.config.micro_batch for trial in measured)

    def _record_skip(self, phase: str, cfg: BenchConfig, reason: str) -> None:
        self.trials.append(Trial(index=len(self.trials) + 1, phase=phase, config=cfg, status="skipped", note=reason))


def _bucket(cfg: BenchConfig, key: str) -> int:
    """A bucket setting as it runs: None is yolods' default for the stage and device (ZeRO-1 on CPU: one bucket)."""
    value = getattr(cfg, key)
    if value is not None:
        return value
    zero = default_deepspeed_config(zero_stage=cfg.zero_stage, precision=cfg.precision, device=cfg.device)
    return zero["zero_optimization"].get(key, BUCKET_ELEMENTS)


def _with_micro_batch(cfg: BenchConfig, micro_batch: int) -> BenchConfig:
    ranks = cfg.global_batch // cfg.micro_batch
    return replace(cfg, micro_batch=micro_batch, global_batch=micro_batch * ranks)


def _summary(trial: Trial) -> str:
    if not trial.ok:
        return f"{trial.status}: {trial.note}"
    return (
        f"{trial.imgs_per_s:.1f} img/s, peak {trial.peak_mem_bytes / GIB:.2f} GiB/rank, {trial.wall_s:.0f} s; "
        f"{trial.note}"
    )


# ----------------------------------------------------------------------------------------------------------------
# The command line, the tuned config and the table


def tune_space(args: argparse.Namespace, *, device: str) -> TuneSpace:
    """The candidates the flags allow (each LIST flag narrows its coordinate), and the memory budget per rank."""
    stages = tuple(int(stage) for stage in split_list(args.zero)) or (0, 1, 2, 3)
    default_precisions = ("bf16", "fp32", "fp16") if device == "cuda" else ("fp32", "bf16")
    precisions = tuple(split_list(args.precision)) or default_precisions
    if device == "cpu" and "fp16" in precisions:
        raise ConfigError("--tune --precision fp16 on CPU: fp16 runs ~50x slower there and overflows; use fp32,bf16")
    listed = tuple(int(mb) for mb in split_list(args.micro_batch))
    micro_batches = listed if len(listed) > 1 else None  # one value: where the doubling starts
    return TuneSpace(
        stages=stages,
        reduce_buckets=tuple(parse_count(v) for v in split_list(args.reduce_bucket_size)) or DEFAULT_BUCKETS,
        allgather_buckets=tuple(parse_count(v) for v in split_list(args.allgather_bucket_size)) or DEFAULT_BUCKETS,
        micro_batches=micro_batches,
        precisions=precisions,
        memory_budget_bytes=_memory_budget(args.memory_budget_gib, device=device),
    )


def _memory_budget(gib: float | None, *, device: str) -> int:
    if gib is not None:
        return int(gib * GIB)
    if device == "cuda":
        return torch.cuda.mem_get_info(dist.get_local_rank())[1]
    available_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable")
    )
    return int(available_kib * 1024 * CPU_MEMORY_SHARE / max(1, dist.get_local_world_size()))


def base_config(args: argparse.Namespace, space: TuneSpace, *, world_size: int) -> BenchConfig:
    """The starting point: the first stage, precision and micro batch, the model and image size given."""
    if args.deepspeed_config:
        raise ConfigError("--tune builds its configs from yolods' defaults: drop --deepspeed_config")
    overrides = {
        "engine": ["deepspeed"],
        "zero": [str(space.stages[0])],
        "precision": [space.precisions[0]],
        "micro_batch": [str(space.micro_batches[0])] if space.micro_batches else args.micro_batch,
        "reduce_bucket_size": None,
        "allgather_bucket_size": None,
        "steps": TUNE_STEPS if args.steps is None else args.steps,
        "warmup_steps": TUNE_WARMUP_STEPS if args.warmup_steps is None else args.warmup_steps,
    }
    configs = expand(argparse.Namespace(**{**vars(args), **overrides}), world_size=world_size)
    if configs and configs[0].input != "synthetic":
        raise ConfigError("--tune measures synthetic input (one batch on the device, no loader): drop --input real")
    if len(configs) != 1:
        raise ConfigError(
            "--tune searches one model, image size, input and setting of each other flag: give one value of each "
            f"(these flags expand to {len(configs)} configurations)"
        )
    return configs[0]


def tuned_ds_config(cfg: BenchConfig, *, world_size: int, note: str) -> dict[str, Any]:
    """The DeepSpeed config `cfg` ran with, for any --batch: yolods fills the batch keys from the flags."""
    config = copy.deepcopy(bench_plan(cfg, world_size=world_size).ds_config)
    for key in (*BATCH_KEYS, "comms_logger"):
        config.pop(key, None)
    config["wall_clock_breakdown"] = False
    if cfg.precision == "fp32":
        config["torch_autocast"] = {"enabled": False}  # explicit: yolods' default on CUDA would be bf16
    return {"_tuned": note, **config}


def check_tuned_config(path: Path, cfg: BenchConfig, *, world_size: int) -> None:
    """What yolods.train does with the written file at this world size; it must run what was measured."""
    from yolods.ds_validation import validate_deepspeed_config

    written = json.loads(path.read_text())
    validate_deepspeed_config(written, source=str(path))
    run = RunConfig(
        model=cfg.model,
        data=SYNTHETIC,
        imgsz=cfg.imgsz,
        batch=cfg.global_batch,
        batch_from_flag=True,
        deepspeed_config=str(path),
        device=cfg.device,
    )
    plan = resolve_run(run, world_size=world_size)
    measured = bench_plan(cfg, world_size=world_size)
    # internal invariant: the file resolves to the configuration measured
    assert (plan.zero_stage, plan.precision, plan.batch.micro_batch) == (
        measured.zero_stage,
        measured.precision,
        cfg.micro_batch,
    ), (plan.zero_stage, plan.precision, plan.batch.micro_batch)
    assert plan.ds_config["zero_optimization"] == measured.ds_config["zero_optimization"]


def train_command(cfg: BenchConfig, *, path: Path, world_size: int) -> str:
    """The command that trains with the tuned config on this job's ranks (the data is the user's)."""
    local = dist.get_local_world_size()
    nodes = max(1, world_size // max(1, local))
    if world_size == 1:
        launcher = "python -m yolods.train"
    elif nodes == 1:
        launcher = f"torchrun --nproc_per_node {local} -m yolods.train"
    else:
        launcher = f"deepspeed --hostfile hosts --num_nodes {nodes} --num_gpus {local} --module yolods.train"
    flags = [
        f"--model {cfg.model}",
        "--data YOUR_DATA.yaml",
        f"--imgsz {cfg.imgsz}",
        f"--batch {cfg.global_batch}",
        f"--deepspeed_config {path}",
    ]
    if cfg.activation_checkpointing:
        flags.append("--activation_checkpointing")
    if cfg.device == "cpu" and torch.cuda.is_available():
        flags.append("--device cpu")  # yolods.train would pick the GPU
    return " ".join([launcher, *flags])


def tune_markdown(trials: list[Trial], *, winner: Trial, command: str, context: dict[str, Any]) -> str:
    """tune.md: the winner, the command, then every candidate in the order tried."""
    rows = []
    for trial in trials:
        cfg = trial.config
        rows.append(
            [
                str(trial.index),
                trial.phase,
                f"ZeRO-{cfg.zero_stage}",
                count_label(_bucket(cfg, "reduce_bucket_size")) if cfg.zero_stage else "-",
                count_label(_bucket(cfg, "allgather_bucket_size")) if cfg.zero_stage else "-",
                str(cfg.micro_batch),
                cfg.precision,
                f"{trial.imgs_per_s:.1f}" if trial.imgs_per_s else "-",
                f"{trial.step_time_s * 1e3:.0f}" if trial.step_time_s else "-",
                f"{trial.peak_mem_bytes / GIB:.2f}" if trial.peak_mem_bytes else "-",
                f"{trial.wall_s:.0f}" if trial.wall_s else "-",
                trial.note if trial.ok else f"{trial.status}: {trial.note}",
            ]
        )
    headers = ["#", "phase", "stage", "reduce bucket", "gather bucket", "mb/rank", "precision", "img/s", "step ms"]
    headers += ["peak GiB/rank", "s", "verdict"]
    cfg = winner.config
    return "\n".join(
        [
            "# yolods.bench --tune",
            "",
            f"{cfg.model} at imgsz {cfg.imgsz}, {cfg.input} input, {context['world_size']} rank(s) on "
            f"{context['hardware'].get('gpu') or context['hardware'].get('cpu', 'this machine')}; "
            f"load average {context['load_avg_start'][0]:.1f} at start, {context['load_avg_end'][0]:.1f} at end.",
            "",
            f"**Winner: #{winner.index}**, {winner.imgs_per_s:.1f} img/s: ZeRO-{cfg.zero_stage}, {cfg.precision}, "
            f"micro batch {cfg.micro_batch}/rank. Train with it:",
            "",
            f"    {command}",
            "",
            f"Each candidate: {cfg.warmup_steps} burn-in + {cfg.steps} timed steps of the TrainStep yolods.train runs. "
            f"A candidate wins only when faster than the best so far by more than {TUNE_MARGIN:.0%}. Peak memory is "
            "measured in this process (CUDA: max allocated; CPU: resident set after a reset, which may keep earlier "
            "candidates' freed pages): `--fit` measures each point in a fresh process.",
            "",
            *table(headers, rows),
            "",
        ]
    )


def run_tune(args: argparse.Namespace) -> int:
    """The --tune mode of the bench command line; returns the exit code."""
    if args.engine and split_list(args.engine) != ["deepspeed"]:
        raise ConfigError("--tune searches DeepSpeed's settings only: drop --engine")
    if args.repeat != 1:
        raise ConfigError(
            "--tune measures each candidate once (its margin, not repeats, guards the noise): drop --repeat"
        )
    world_size = dist.get_world_size()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    space = tune_space(args, device=device_type)
    base = base_config(args, space, world_size=world_size)
    for stage in space.stages:  # every stage resolves as yolods.train would, before any process group or model
        bench_plan(replace(base, zero_stage=stage), world_size=world_size)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist.init_distributed(base.device, verbose=False)
    device = dist.local_device(base.device)
    load_avg_start = list(os.getloadavg())
    started = time.monotonic()
    tuner = Tuner(space, device=device, budget_s=args.budget_min * 60, keep_going=world_size == 1)
    winner = tuner.search(base)
    context = {
        **run_context(device, label=args.interconnect, link_probe=None),
        "load_avg_start": load_avg_start,
        "load_avg_end": list(os.getloadavg()),
        "elapsed_s": time.monotonic() - started,
        "budget_min": args.budget_min,
    }
    out_dir = Path(args.out or "runs/tune")
    path = out_dir / "ds_tuned.json"
    command = train_command(winner.config, path=path, world_size=world_size)
    if dist.is_main_process():
        note = (
            f"yolods.bench --tune: {winner.imgs_per_s:.1f} img/s for {winner.config.model} at imgsz "
            f"{winner.config.imgsz}, micro batch {winner.config.micro_batch}/rank on {world_size} rank(s); see tune.md"
        )
        write_json(path, tuned_ds_config(winner.config, world_size=world_size, note=note))
        check_tuned_config(path, winner.config, world_size=world_size)
        record = {
            "winner": winner.index,
            "command": command,
            "trials": [{**asdict(trial), "config": trial.config.as_dict()} for trial in tuner.trials],
            "context": context,
        }
        (out_dir / "tune.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        (out_dir / "tune.md").write_text(tune_markdown(tuner.trials, winner=winner, command=command, context=context))
        print(f"yolods.bench --tune: wrote {path}, {out_dir / 'tune.md'}; train with:\n    {command}", flush=True)
    dist.shutdown()
    return 0
