"""`python -m yolods.bench --fit micro-batch|imgsz`: the largest per-rank micro batch (or image size) that fits.

    python -m yolods.bench --fit micro-batch --memory-budget-gib 6 --nproc 2 --zero 2 --activation-checkpointing off,on
    python -m yolods.bench --fit imgsz --model x --micro-batch 8 --zero 2,3 --nproc 8      # CUDA: each GPU's memory

For each configuration of the sweep flags, the value is doubled from the configuration's own until a point does
not fit (or --fit-max), then bisected between the last point that fit and the first that did not, to within an
eighth. Every point is a fresh job of `--nproc` ranks on this node (fit_child: one configuration, a few steps),
so its peak is its own: on CUDA torch.cuda.max_memory_allocated, on CPU the peak resident set size of each rank
process (VmHWM), libraries included, against `--memory-budget-gib` per rank, which CPU runs must pass (RSS has no
hard cap). A point fits when every rank's peak is within the budget and no rank ran out of memory. Synthetic input
only: a real loader's worker processes hold memory of their own that the rank's peak does not include.

Run it as one process (not under a launcher): it launches each point's ranks itself. Writes fit.jsonl (every
configuration with every point tried) and fit.md into --out (default runs/fit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from yolods import dist, env
from yolods.bench import provenance
from yolods.bench.fit_child import ChildSpec, child_command
from yolods.bench.markdown import table
from yolods.bench.sweep import BenchConfig, expand
from yolods.bench.ultralytics_child import child_env
from yolods.config import IMGSZ_MULTIPLE, ConfigError

FIT_STEPS, FIT_WARMUP_STEPS = 2, 1  # peak memory is reached by the second step: optimizer states exist after the first
POINT_TIMEOUT_S = 900
DEFAULT_LIMITS = {"micro-batch": 512, "imgsz": 2048}
UNITS = {"micro-batch": 1, "imgsz": IMGSZ_MULTIPLE}  # image sizes move in multiples of the model stride
GIB = 2**30


@dataclass(frozen=True)
class ProbePoint:
    """One point tried: the value, whether it fit, and what its job measured (None where it did not finish)."""

    value: int
    fits: bool
    status: str  # ok, over_budget, out_of_memory, failed
    peak_mem_bytes: int | None = None
    baseline_bytes: int | None = None  # rank 0's resident memory before the model (CPU; 0 on CUDA)
    imgs_per_s: float | None = None
    step_time_s: float | None = None
    message: str = ""


def largest_fitting(fits: Callable[[int], bool], *, start: int, limit: int, unit: int = 1) -> int:
    """The largest multiple of `unit` up to `limit` for which `fits` holds, assuming it holds up to some value.

    Doubles from `start` until a value does not fit (or `limit` is reached), then bisects between the last value
    that fit and the first that did not, until they are within an eighth of each other (or one unit). Starting
    from a value that does not fit, it bisects below it. Returns 0 when not even one unit fits.
    """
    if start < unit or start % unit or limit < start:
        raise ValueError(f"start {start} must be a multiple of {unit} between {unit} and limit {limit}")
    low, high = 0, None  # in units: the largest known to fit, the smallest known not to
    steps = start // unit
    while high is None:
        if fits(steps * unit):
            low = steps
            if steps * unit >= limit:
                return low * unit
            steps = min(steps * 2, limit // unit)
        else:
            high = steps
    while high - low > max(1, low // 8):
        middle = (low + high) // 2
        if fits(middle * unit):
            low = middle
        else:
            high = middle
    return low * unit


def probe_point(
    cfg: BenchConfig, *, value: int, nproc: int, budget_bytes: int | None, threads_per_rank: int
) -> ProbePoint:
    """Run `cfg` (at `value` of the searched axis) as a fresh job of `nproc` ranks and read every rank's verdict."""
    with tempfile.TemporaryDirectory(prefix="yolods-fit-") as workdir:
        spec = ChildSpec(config=cfg.as_dict(), out_dir=workdir, budget_bytes=budget_bytes)
        completed = subprocess.run(
            child_command(spec, nproc=nproc),
            env=child_env(OMP_NUM_THREADS=str(threads_per_rank)),
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=POINT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        verdicts = [json.loads(path.read_text()) for path in sorted(Path(workdir).glob("rank*.json"))]
    refused = next((v for v in verdicts if v["status"] in ("over_budget", "out_of_memory")), None)
    if refused is not None:  # the first rank to pass the budget ended the job; its peak is where it was stopped
        return ProbePoint(
            value=value,
            fits=False,
            status=refused["status"],
            peak_mem_bytes=refused.get("peak_mem_bytes"),
            message=refused.get("message", f"rank {refused['rank']}"),
        )
    main = next((v for v in verdicts if v["rank"] == 0), None)
    if completed.returncode != 0 or main is None:
        tail = " | ".join((completed.stdout + completed.stderr).strip().splitlines()[-3:])
        return ProbePoint(
            value=value, fits=False, status="failed", message=f"exit {completed.returncode}: {tail[-400:]}"
        )
    return ProbePoint(
        value=value,
        fits=True,
        status="ok",
        peak_mem_bytes=main["peak_mem_bytes"],
        baseline_bytes=main["baseline_bytes_per_rank"][0],
        imgs_per_s=main["imgs_per_s"],
        step_time_s=main["step_time_s"],
    )


def _threads_per_rank(nproc: int) -> int:
    """OMP_NUM_THREADS as the user set it, else this process's cores shared by the probe job's ranks.

    On a machine others are loading, more threads per rank than cores free made steps 15-40x slower here (yolov8n,
    imgsz 160, 8 images, 1 rank on 2 cores at load 6: 3.8-9.4 s per step with 2 threads, 0.24-0.26 s with
    OMP_NUM_THREADS=1), which costs --fit time but not memory.
    """
    user = env.USER_OMP_NUM_THREADS
    if user and user.isdigit() and int(user) > 0:
        return int(user)
    return max(1, len(os.sched_getaffinity(0)) // nproc)


def _at(cfg: BenchConfig, axis: str, value: int) -> BenchConfig:
    if axis == "imgsz":
        return replace(cfg, imgsz=value)
    return replace(cfg, micro_batch=value, global_batch=value * (cfg.global_batch // cfg.micro_batch))


def fit_configuration(
    cfg: BenchConfig, *, axis: str, limit: int, nproc: int, budget_bytes: int | None, say: Callable[[str], None]
) -> dict[str, Any]:
    """The search for one configuration: every point tried and the largest value that fit."""
    points: list[ProbePoint] = []
    threads = _threads_per_rank(nproc)

    def fits(value: int) -> bool:
        point = probe_point(
            _at(cfg, axis, value), value=value, nproc=nproc, budget_bytes=budget_bytes, threads_per_rank=threads
        )
        points.append(point)
        peak = f"{point.peak_mem_bytes / GIB:.2f} GiB" if point.peak_mem_bytes else "-"
        say(f"  {axis} {value}: {'fits' if point.fits else point.status} (peak {peak}) {point.message[:200]}")
        return point.fits

    start = cfg.imgsz if axis == "imgsz" else cfg.micro_batch
    largest = largest_fitting(fits, start=start, limit=max(limit, start), unit=UNITS[axis])
    return {
        "label": cfg.label,
        "axis": axis,
        "largest": largest,
        "budget_bytes": budget_bytes,
        "num_ranks": nproc,
        "points": [asdict(point) for point in sorted(points, key=lambda point: point.value)],
        "config": cfg.as_dict(),
    }


def fit_markdown(results: list[dict[str, Any]]) -> str:
    """fit.md: the answer per configuration, then every point tried."""
    summary = [
        [
            result["label"],
            str(result["largest"] or "nothing fits"),
            _gib(next((p["peak_mem_bytes"] for p in result["points"] if p["value"] == result["largest"]), None)),
            _gib(result["budget_bytes"]) if result["budget_bytes"] else "device memory",
        ]
        for result in results
    ]
    first = results[0]
    lines = [
        "# Largest per-rank value that fits the memory budget",
        "",
        f"Each point: a fresh job of {first['num_ranks']} rank(s), {first['config']['warmup_steps']} burn-in + "
        f"{first['config']['steps']} timed steps and one more for the model states; peak per rank (CUDA: max "
        "allocated; CPU: peak resident set, libraries included). Step times are from so few steps: rough.",
        "",
        *table(["configuration", "largest that fits", "its peak / rank", "budget / rank"], summary),
    ]
    for result in results:
        rows = [
            [
                str(point["value"]),
                "yes" if point["fits"] else point["status"],
                _gib(point["peak_mem_bytes"]),
                _gib(point["baseline_bytes"]),
                f"{point['step_time_s'] * 1e3:.0f}" if point["step_time_s"] else "-",
                f"{point['imgs_per_s']:.1f}" if point["imgs_per_s"] else "-",
            ]
            for point in result["points"]
        ]
        headers = [result["axis"], "fits", "peak GiB / rank", "before model GiB", "step ms", "img/s (rough)"]
        lines += ["", f"## {result['label']}", "", *table(headers, rows)]
    return "\n".join(lines) + "\n"


def _gib(value: int | None) -> str:
    return f"{value / GIB:.2f}" if value else "-"


def run_fit(args: argparse.Namespace) -> int:
    """The --fit mode of the bench command line; returns the exit code (2 for a user mistake, in one line)."""
    if dist.get_world_size() > 1:
        raise ConfigError(
            "--fit launches each probe point's ranks itself: run it as one process, with --nproc N for N ranks"
        )
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} must be at least 1")
    axis = args.fit
    sweep = {
        "engine": args.engine or ["deepspeed"],
        "steps": FIT_STEPS if args.steps is None else args.steps,
        "warmup_steps": FIT_WARMUP_STEPS if args.warmup_steps is None else args.warmup_steps,
    }
    expanded = expand(argparse.Namespace(**{**vars(args), **sweep}), world_size=args.nproc)
    configs = [cfg for cfg in expanded if cfg.engine != "ultralytics"]
    if not configs:
        raise ConfigError(
            "--fit probes yolods' engines (deepspeed, ddp), not the Ultralytics trainer: drop --engine ultralytics"
        )
    if any(cfg.input != "synthetic" for cfg in configs):
        raise ConfigError(
            "--fit measures synthetic input only (a loader's workers hold memory apart): drop --input real"
        )
    if configs and configs[0].device == "cpu" and args.memory_budget_gib is None:
        raise ConfigError("--fit on CPU needs --memory-budget-gib (resident memory per rank has no hard cap)")
    budget = int(args.memory_budget_gib * GIB) if args.memory_budget_gib else None
    limit = args.fit_max or DEFAULT_LIMITS[axis]
    out_dir = Path(args.out or "runs/fit")
    source = provenance.source_record()  # the yolods commit measured, and whether the tree was dirty
    results = []
    for cfg in configs:
        print(f"yolods.bench --fit {axis}: {cfg.label} on {args.nproc} rank(s)", flush=True)
        load_avg_start = list(os.getloadavg())  # on a shared machine, how much else was running
        result = fit_configuration(
            cfg, axis=axis, limit=limit, nproc=args.nproc, budget_bytes=budget, say=lambda m: print(m, flush=True)
        )
        results.append(
            {**result, "load_avg_start": load_avg_start, "load_avg_end": list(os.getloadavg()), "source": source}
        )
        print(f"  largest {axis} that fits: {result['largest'] or 'nothing'}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "fit.jsonl").open("a") as file:
        for result in results:
            file.write(json.dumps(result, sort_keys=True) + "\n")
    if results:
        (out_dir / "fit.md").write_text(fit_markdown(results))
    print(f"yolods.bench: wrote {out_dir / 'fit.md'} and appended to {out_dir / 'fit.jsonl'}", flush=True)
    return 0
