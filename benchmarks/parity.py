"""Accuracy parity: the Ultralytics trainer against yolods on the same model, data, hyperparameters and epochs.

    python benchmarks/parity.py                       # synthetic shapes, CPU, 5 seeds per row (hours on 2 cores)
    python benchmarks/parity.py --rows ultralytics,zero0-1rank-fp32,zero2-2rank-fp32 --seeds 5
    python benchmarks/parity.py --data path/to/data.yaml --device cuda --epochs 100 --imgsz 640 --batch 64 \\
        --rows ultralytics,zero0-1rank-bf16,zero2-8rank-bf16 --out-dir benchmarks/results/mydata

Each run is a fresh process: `ultralytics.YOLO(model).train(...)` (one process, `python -m
yolods.bench.ultralytics_child` with the network refused), and `python -m yolods.train` (1 rank) or `torchrun -m
yolods.train` (N ranks) at the same GLOBAL batch, every row with the same seeds 0..N-1. Seeds are paired: with
the same seed yolods at 1 rank draws what the Ultralytics trainer draws (weights, data order, augmentation) and
reproduces its run (fp32, `--workers 0`, the same torch thread count: `--threads`), so each seed gives a paired
difference, free of the seed-to-seed spread; at N ranks the same images make each global batch. An N-rank run
draws each rank's augmentation from its own stream, so it is not paired with the 1-process run beyond its data
order and initial weights; other rows at N ranks are therefore also paired with the plain ZeRO-0 row at N ranks,
which shares their images and augmentation streams (as do `-syncbn` and `-comm` rows). A `-paired` row runs
yolods with `--paired_data`: its ranks train on the 1-rank run's augmented images themselves, so it is paired with
the Ultralytics run by design, apart from BatchNorm over each rank's share and the arithmetic of N ranks.

The bar: a yolods row passes when the 95% confidence interval (Student t over seeds) of its mean paired difference
in final mAP50-95 lies within +-0.01. Writes OUT_DIR/parity.md and OUT_DIR/parity.json; exits 0 when every row
passes, 1 when a row does not, 2 when a run failed.

Row names: `ultralytics`, or `zero{0,1,2,3}-{N}rank-{fp32,bf16,fp16}` for yolods, optionally followed by
`-comm{fp32,bf16,fp16}` (`--communication_dtype`), `-syncbn` (`--sync_bn`) and `-paired` (`--paired_data`), e.g.
`zero2-2rank-fp32-commbf16`, `zero2-2rank-fp32-paired`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from yolods.bench.environment import gpu, library_versions, machine, source_state
from yolods.bench.ultralytics_child import NETWORK_MARKER, ChildSpec, child_command, child_env

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROWS = (
    "ultralytics",
    "zero0-1rank-fp32",
    "zero0-2rank-fp32",
    "zero1-2rank-fp32",
    "zero2-2rank-fp32",
    "zero3-2rank-fp32",
    "zero2-2rank-bf16",
)
LOSS_COLUMNS = ("train/box_loss", "train/cls_loss", "train/dfl_loss")
MAP50_COLUMN, MAP50_95_COLUMN = "metrics/mAP50(B)", "metrics/mAP50-95(B)"
MIN_TOLERANCE = 0.01  # the bar: the 95% CI of the mean paired difference within +-this, in mAP50-95
# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96 is within 4%).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
T_975 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
ROW_PATTERN = re.compile(
    r"^zero(?P<zero>[0-3])-(?P<ranks>[1-9][0-9]*)rank-(?P<precision>fp32|bf16|fp16)"
    r"(?:-comm(?P<communication_dtype>fp32|bf16|fp16))?(?P<sync_bn>-syncbn)?(?P<paired_data>-paired)?$"
)


@dataclass(frozen=True)
class Row:
    """One trainer setting of the table."""

    name: str
    trainer: str  # "ultralytics" or "yolods"
    zero: int | None = None
    ranks: int = 1
    precision: str = "fp32"
    communication_dtype: str | None = None  # yolods' --communication_dtype (the gradient reduction's dtype)
    sync_bn: bool = False  # yolods' --sync_bn
    paired_data: bool = False  # yolods' --paired_data: the 1-rank run's augmented images at N ranks

    @property
    def label(self) -> str:
        if self.trainer == "ultralytics":
            return "Ultralytics (reference)"
        label = f"yolods ZeRO-{self.zero}, {self.ranks} rank{'s' if self.ranks > 1 else ''}, {self.precision}"
        if self.communication_dtype:
            label += f", gradients reduced in {self.communication_dtype}"
        return label + (", SyncBN" if self.sync_bn else "") + (", paired data" if self.paired_data else "")


def parse_row(name: str) -> Row:
    """`ultralytics` or `zero2-2rank-bf16` -> Row; ValueError with the accepted forms otherwise."""
    if name == "ultralytics":
        return Row(name=name, trainer="ultralytics")
    match = ROW_PATTERN.match(name)
    if not match:
        raise ValueError(
            f"--rows: {name!r} is not 'ultralytics' or zero{{0-3}}-{{N}}rank-{{fp32,bf16,fp16}}"
            "[-comm{fp32,bf16,fp16}][-syncbn][-paired]"
        )
    return Row(
        name=name,
        trainer="yolods",
        zero=int(match["zero"]),
        ranks=int(match["ranks"]),
        precision=match["precision"],
        communication_dtype=match["communication_dtype"],
        sync_bn=bool(match["sync_bn"]),
        paired_data=bool(match["paired_data"]),
    )


# ----------------------------------------------------------------------------------------------------------------
# Statistics and the bar


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for a single value, None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def t_quantile(degrees_of_freedom: int) -> float:
    """Two-sided 95% quantile of Student's t."""
    return T_975[degrees_of_freedom - 1] if degrees_of_freedom <= len(T_975) else 1.96


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    """Per-seed `values - reference` over the seeds both have: mean, sample std, 95% CI of the mean, and how many
    seeds agree exactly (results.csv rounds to 5 decimals)."""
    seeds = sorted(set(values) & set(reference))
    diffs = [round(values[seed] - reference[seed], 5) for seed in seeds]
    mean, std = mean_std(diffs)
    ci95 = None
    if len(diffs) > 1:
        half_width = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs))
        ci95 = [mean - half_width, mean + half_width]
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "std": std, "ci95": ci95, "exact": diffs.count(0.0)}


def judge(paired: dict[str, Any], *, tolerance: float = MIN_TOLERANCE) -> dict[str, Any]:
    """Equivalence: a row passes when the 95% CI of its mean paired difference lies within +-tolerance (it
    needs 2 seeds or more)."""
    ci95 = paired["ci95"]
    passed = ci95 is not None and -tolerance <= ci95[0] and ci95[1] <= tolerance
    return {"diff": paired["mean"], "ci95": ci95, "tolerance": tolerance, "passed": passed}


# ----------------------------------------------------------------------------------------------------------------
# Runs


def read_results_csv(path: Path) -> list[dict[str, float]]:
    """results.csv (Ultralytics' and yolods' share its columns) as a list of floats per epoch."""
    with path.open() as file:
        rows = list(csv.DictReader(file))
    return [{key.strip(): float(value) for key, value in row.items() if value not in (None, "")} for row in rows]


def snapshot_yolods(work_dir: Path) -> dict[str, Any]:
    """Copy the yolods package as it is now into WORK_DIR/code/HASH; every run imports that copy (PYTHONPATH).

    A long benchmark in a repository others commit to would otherwise measure several versions of yolods.
    Returns where the copy is and what it is: git commit, uncommitted changes under yolods/, content hash.
    """
    source = Path(importlib.util.find_spec("yolods").submodule_search_locations[0])
    staging = work_dir / "code" / f"staging-{os.getpid()}" / "yolods"
    shutil.rmtree(staging.parent, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(staging)).encode() + b"\0" + path.read_bytes())
    sha = digest.hexdigest()[:16]
    target = work_dir / "code" / sha / "yolods"  # content-addressed: a later invocation never rewrites it
    if target.exists():
        shutil.rmtree(staging.parent)
    else:
        staging.parent.rename(target.parent)
    state = source_state(source, short=True)
    code = {
        "source": str(source),
        "snapshot": str(target.parent),
        "git_commit": state.commit if state else "unknown",
        "uncommitted_changes": list(state.changes) if state else [],
        "sha256": sha,
    }
    # Runs start in the caller's directory (relative paths in a data.yaml resolve as for a direct run), unless
    # the interpreter would import a yolods/ found there instead of the copy (Python < 3.11 has no PYTHONSAFEPATH).
    for cwd in (Path.cwd(), work_dir):
        code["run_cwd"] = str(cwd)
        probe = [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('yolods').origin)"]
        found = subprocess.run(probe, cwd=cwd, env=run_env(code, threads=1), capture_output=True, text=True)
        found = found.stdout.strip()
        if found and Path(found).resolve().is_relative_to(target.resolve()):
            return code
    raise RuntimeError(f"runs would not import the yolods copy in {target} (they import {found})")


def run_env(code: dict[str, Any], *, threads: int) -> dict[str, str]:
    """The environment of every run: child_env (no launcher variables, offline Ultralytics), the yolods copy first
    on sys.path, not the working directory, and `threads` torch threads per process (the thread count changes
    how CPU kernels sum, so paired runs need the same)."""
    python_path = os.pathsep.join(filter(None, [code["snapshot"], os.environ.get("PYTHONPATH")]))
    return child_env(PYTHONPATH=python_path, PYTHONSAFEPATH="1", OMP_NUM_THREADS=str(threads))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def yolods_command(row: Row, *, settings: dict[str, Any], seed: int, run_dir: Path) -> list[str]:
    """`python -m yolods.train` for 1 rank, torchrun for more, at the same global batch."""
    args = [
        "--model",
        settings["model"],
        "--data",
        settings["data"],
        "--epochs",
        str(settings["epochs"]),
        "--imgsz",
        str(settings["imgsz"]),
        "--batch",
        str(settings["batch"]),
        "--workers",
        str(settings["workers"]),
        "--seed",
        str(seed),
        "--zero",
        str(row.zero),
        "--precision",
        row.precision,
        "--device",
        settings["device"],
        "--project",
        str(run_dir.parent),
        "--name",
        run_dir.name,
        "--exist_ok",
    ]
    if row.communication_dtype:
        args += ["--communication_dtype", row.communication_dtype]
    if row.sync_bn:
        args.append("--sync_bn")
    if row.paired_data:
        args.append("--paired_data")
    for key, value in {"plots": False, **settings["hyp"]}.items():  # no results.png: the reference draws no plots
        args += ["--hyp", f"{key}={value}"]
    if row.ranks == 1:
        return [sys.executable, "-m", "yolods.train", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={row.ranks}"]
    return [*launcher, f"--master_port={free_port()}", "-m", "yolods.train", *args]


def ultralytics_command(*, settings: dict[str, Any], seed: int, run_dir: Path) -> list[str]:
    """Ultralytics' own trainer in one fresh process (yolods.bench.ultralytics_child, from the yolods copy), with
    every non-loopback connection refused and marked in its log: the reference must not download anything."""
    train = dict(
        data=settings["data"],
        epochs=settings["epochs"],
        imgsz=settings["imgsz"],
        batch=settings["batch"],
        workers=settings["workers"],
        seed=seed,
        deterministic=True,
        device="cpu" if settings["device"] == "cpu" else "0",
        plots=False,
        amp=False,  # fp32 reference; amp=True would also run check_amp, which downloads weights
        project=str(run_dir.parent),
        name=run_dir.name,
        exist_ok=True,
        verbose=False,
        val=True,
    )
    train.update(settings["hyp"])
    # keep_torch_threads: train on OMP_NUM_THREADS threads, as yolods does, not Ultralytics' cores - 1
    return child_command(ChildSpec(model=settings["model"], train=train, block_network=True, keep_torch_threads=True))


def run_one(
    row: Row, *, settings: dict[str, Any], seed: int, work_dir: Path, code: dict[str, Any], reuse: bool
) -> dict[str, Any]:
    """Train one (row, seed) in a fresh process and return its per-epoch record (yolods from the copy in `code`)."""
    run_dir = work_dir / row.name / f"seed{seed}"
    record_path = run_dir / "parity_run.json"
    if reuse and record_path.exists():
        record = json.loads(record_path.read_text())
        same_code = row.trainer == "ultralytics" or record.get("yolods_code", {}).get("sha256") == code["sha256"]
        if record.get("settings") == settings and record.get("returncode") == 0 and same_code:
            print(f"parity: reusing {row.name} seed {seed} from {run_dir}", flush=True)
            return record
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier attempt's checkpoints and rows must not count
    run_dir.mkdir(parents=True)
    if row.trainer == "ultralytics":
        command = ultralytics_command(settings=settings, seed=seed, run_dir=run_dir)
    else:
        command = yolods_command(row, settings=settings, seed=seed, run_dir=run_dir)
    log_path = run_dir / "train.log"
    started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    started = time.perf_counter()
    print(f"parity: {row.name} seed {seed}: {shlex.join(command)}", flush=True)
    with log_path.open("w") as log:
        completed = subprocess.run(
            command,
            cwd=code["run_cwd"],
            env=run_env(code, threads=max(1, settings["threads"] // row.ranks)),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    wall_s = time.perf_counter() - started
    log_text = log_path.read_text(errors="replace")
    record: dict[str, Any] = {
        "row": row.name,
        "seed": seed,
        "command": shlex.join(command),
        "returncode": completed.returncode,
        "started_utc": started_utc,
        "wall_s": round(wall_s, 1),
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "run_dir": str(run_dir),
        "network_attempts": log_text.count(NETWORK_MARKER) + log_text.count("Downloading"),
        "settings": settings,
    }
    if row.trainer == "yolods":
        record["yolods_code"] = code
    csv_path = run_dir / "results.csv"
    if completed.returncode != 0 or not csv_path.exists():
        record["returncode"] = completed.returncode or -1
        record["error_tail"] = log_text.splitlines()[-25:]
        print(f"parity: {row.name} seed {seed} FAILED (exit {completed.returncode}); log: {log_path}", flush=True)
    else:
        epochs = read_results_csv(csv_path)
        keep = ("epoch", *LOSS_COLUMNS, MAP50_COLUMN, MAP50_95_COLUMN)
        record["epochs"] = [{key: epoch[key] for key in keep if key in epoch} for epoch in epochs]
        record["final"] = {"mAP50": epochs[-1][MAP50_COLUMN], "mAP50-95": epochs[-1][MAP50_95_COLUMN]}
        record["train_time_s"] = epochs[-1].get("time")
        print(
            f"parity: {row.name} seed {seed}: mAP50 {record['final']['mAP50']:.4f} "
            f"mAP50-95 {record['final']['mAP50-95']:.4f} in {wall_s:.0f} s",
            flush=True,
        )
    if record["network_attempts"]:
        print(f"parity: WARNING {row.name} seed {seed} tried to reach the network; see {log_path}", flush=True)
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


# ----------------------------------------------------------------------------------------------------------------
# Table


def summarise(rows: list[Row], records: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per row: seeds, mean/std of final mAP50 and mAP50-95, mean per-epoch losses, wall time; for yolods rows
    the paired difference to Ultralytics' run of the same seed (mAP50-95, wall-time ratio) and the bar."""
    summaries = []
    for row in rows:
        done = [r for r in records[row.name] if r["returncode"] == 0]
        map50_mean, map50_std = mean_std([r["final"]["mAP50"] for r in done])
        map_mean, map_std = mean_std([r["final"]["mAP50-95"] for r in done])
        num_epochs = min((len(r["epochs"]) for r in done), default=0)
        per_epoch = {
            column: [round(statistics.fmean(r["epochs"][e][column] for r in done), 5) for e in range(num_epochs)]
            for column in (*LOSS_COLUMNS, MAP50_95_COLUMN)
        }
        summaries.append(
            {
                **asdict(row),
                "label": row.label,
                "seeds": [r["seed"] for r in records[row.name]],
                "failed_seeds": [r["seed"] for r in records[row.name] if r["returncode"] != 0],
                "mAP50_mean": map50_mean,
                "mAP50_std": map50_std,
                "mAP50-95_mean": map_mean,
                "mAP50-95_std": map_std,
                "per_epoch_mean": per_epoch,
                "load_avg_start_mean": statistics.fmean(r["load_avg_start"][0] for r in records[row.name])
                if records[row.name]
                else None,
                "wall_s_mean": round(statistics.fmean(r["wall_s"] for r in records[row.name]), 1)
                if records[row.name]
                else None,
                "runs": records[row.name],
            }
        )

    def by_seed(summary: dict[str, Any], value) -> dict[int, float]:
        return {r["seed"]: value(r) for r in summary["runs"] if r["returncode"] == 0}

    reference = next((s for s in summaries if s["trainer"] == "ultralytics"), None)
    for summary in summaries:
        if summary["trainer"] == "ultralytics" or reference is None:
            summary["paired"] = summary["bar"] = None
            continue
        final_map = lambda run: run["final"]["mAP50-95"]  # noqa: E731
        summary["paired"] = paired_difference(by_seed(summary, final_map), by_seed(reference, final_map))
        walls, reference_walls = by_seed(summary, lambda r: r["wall_s"]), by_seed(reference, lambda r: r["wall_s"])
        ratios = [walls[seed] / reference_walls[seed] for seed in sorted(set(walls) & set(reference_walls))]
        summary["wall_ratio_mean"] = round(statistics.fmean(ratios), 3) if ratios else None
        summary["bar"] = (
            judge(summary["paired"]) if not summary["failed_seeds"] else judge({"mean": None, "ci95": None})
        )
        summary["relative_diff"] = (
            summary["paired"]["mean"] / reference["mAP50-95_mean"]
            if summary["paired"]["mean"] is not None and reference["mAP50-95_mean"]
            else None
        )
        # Against plain ZeRO-0 at the same ranks: the same images per rank and the same augmentation streams, so
        # the difference is the row's own (ZeRO's arithmetic, --sync_bn, the reduction dtype), apart from what data
        # parallelism changes (per-rank BatchNorm batches and augmentation), which ZeRO-0's difference shows.
        base = same_ranks_zero0(summary, summaries)
        summary["paired_vs_zero0"] = (
            paired_difference(by_seed(summary, final_map), by_seed(base, final_map)) if base else None
        )
    return summaries


def same_ranks_zero0(summary: dict[str, Any], summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The plain ZeRO-0 row (no --sync_bn, no --communication_dtype) at `summary`'s ranks, precision and
    --paired_data, for a multi-rank yolods row other than itself (else None)."""
    if summary["trainer"] != "yolods" or summary["ranks"] < 2:
        return None
    base = next(
        (
            other
            for other in summaries
            if other["trainer"] == "yolods"
            and other["zero"] == 0
            and other["ranks"] == summary["ranks"]
            and other["precision"] == summary["precision"]
            and not other["communication_dtype"]
            and not other["sync_bn"]
            and other.get("paired_data", False) == summary.get("paired_data", False)
        ),
        None,
    )
    return None if base is None or base["name"] == summary["name"] else base


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    settings, summaries, env, code = report["settings"], report["rows"], report["environment"], report["yolods_code"]
    hyp = ", ".join(f"{k}={v}" for k, v in settings["hyp"].items()) or "Ultralytics defaults"
    lines = [
        "# Accuracy parity: Ultralytics trainer vs yolods",
        "",
        f"Produced by `{report['command']}` on {report['finished_utc'][:10]}: {report['wall_s'] / 60:.1f} min wall "
        f"({report['runs_wall_s'] / 60:.1f} min of training runs).",
        "",
        f"Setting: `{settings['model']}` from scratch on {settings['data_description']}, {settings['epochs']} epochs, "
        f"imgsz {settings['imgsz']}, global batch {settings['batch']}, device {settings['device']}, "
        f"hyperparameters: {hyp} (`optimizer=auto`: both pick the same optimizer and lr0). "
        f"Ultralytics runs fp32 (`amp=False`, `deterministic=True`) in one process"
        + (
            f", every process on {settings['threads']} torch threads (split over ranks). "
            if "threads" in settings
            else ". "
        )
        + "Seeds: "
        + ", ".join(f"{count} for {name}" for name, count in report["seeds"].items())
        + ".",
        "",
        "Final-epoch validation of the EMA weights (the last row of results.csv), mean ± sample std over seeds. "
        "Paired Δ: per seed, the yolods run minus the Ultralytics run of the same seed (which yolods at 1 rank, fp32, "
        "`--workers 0` reproduces), mean and 95% confidence interval (Student t); identical: seeds whose final "
        f"mAP50-95 agrees in every printed digit. The bar: the interval lies within ±{MIN_TOLERANCE}. "
        "Wall ratio: yolods' run time over Ultralytics' for the same seed, mean over seeds."
        + (
            " Rows with paired data ran `--paired_data`: their ranks train on the very images, augmentation "
            "included, of the 1-rank run of the same seed, so the pairing leaves only BatchNorm over each rank's "
            "share and the arithmetic of N ranks."
            if any(s.get("paired_data") for s in summaries)
            else ""
        ),
        "",
        "| row | seeds | mAP50 | mAP50-95 | mAP50-95 per seed | paired Δ mAP50-95 [95% CI] | identical | verdict "
        "| wall s/run | wall ratio | load at start |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        seeds = ",".join(str(seed) for seed in s["seeds"]) + (
            f" (failed: {s['failed_seeds']})" if s["failed_seeds"] else ""
        )
        per_seed = ", ".join(f"{r['final']['mAP50-95']:.4f}" for r in s["runs"] if r["returncode"] == 0)
        paired = s.get("paired")  # absent in tables written before paired seeds
        if s["bar"] is None:
            verdict, diff, identical = "reference", "", ""
        else:
            verdict = "**pass**" if s["bar"]["passed"] else "**FAIL**"
            diff = f"{s['bar']['diff']:+.4f}" if s["bar"]["diff"] is not None else "n/a"
            if s.get("relative_diff") is not None:
                diff += f" ({s['relative_diff']:+.1%})"
            if s["bar"].get("ci95"):
                diff += " [{:+.4f}, {:+.4f}]".format(*s["bar"]["ci95"])
            identical = f"{paired['exact']}/{len(paired['diffs'])}" if paired else "n/a"
        ratio = s.get("wall_ratio_mean")
        lines.append(
            f"| {s['label']} | {seeds} | {_fmt(s['mAP50_mean'])} ± {_fmt(s['mAP50_std'])} | "
            f"{_fmt(s['mAP50-95_mean'])} ± {_fmt(s['mAP50-95_std'])} | {per_seed} | {diff} | {identical} | {verdict} "
            f"| {_fmt(s['wall_s_mean'], 0)} | {_fmt(ratio, 2) if ratio is not None else ''} | {_fmt(s['load_avg_start_mean'], 1)} |"
        )
    against_zero0 = [s for s in summaries if s.get("paired_vs_zero0")]
    if against_zero0:
        lines += [
            "",
            "## Multi-rank rows against plain ZeRO-0 at the same ranks",
            "",
            "Paired by seed against yolods' plain ZeRO-0 row at the same ranks and precision: both see the same "
            "images on each rank and draw the same augmentation, so this difference is the row's own setting: "
            "ZeRO 1-3's arithmetic (partitioned gradient reduction, DeepSpeed's gradient norm, the fused optimizer "
            "kernel), `--sync_bn` (BatchNorm over the global batch), or the gradient reduction's dtype. What data "
            "parallelism itself changes against one process (BatchNorm over each rank's images, each rank's "
            "augmentation stream) is the plain ZeRO-0 row's difference to Ultralytics above.",
            "",
            "| row | against | paired Δ mAP50-95 [95% CI] | per-seed Δ |",
            "|---|---|---|---|",
        ]
        for s in against_zero0:
            paired = s["paired_vs_zero0"]
            base = same_ranks_zero0(s, summaries)
            diff = f"{paired['mean']:+.4f}" if paired["mean"] is not None else "n/a"
            if paired["ci95"]:
                diff += " [{:+.4f}, {:+.4f}]".format(*paired["ci95"])
            lines.append(
                f"| {s['label']} | {base['label']} | {diff} | {', '.join(f'{d:+.4f}' for d in paired['diffs'])} |"
            )
    num_epochs = max((len(s["per_epoch_mean"][LOSS_COLUMNS[0]]) for s in summaries), default=0)
    header = "| epoch | " + " | ".join(s["name"] for s in summaries) + " |"
    rule = "|---" * (len(summaries) + 1) + "|"
    lines += [
        "",
        "## Train losses per epoch (box / cls / dfl, mean over seeds, rank 0's images)",
        "",
        header,
        rule,
    ]
    for epoch in range(num_epochs):
        cells = []
        for s in summaries:
            values = [s["per_epoch_mean"][column] for column in LOSS_COLUMNS]
            cells.append(" / ".join(f"{v[epoch]:.3f}" for v in values) if epoch < len(values[0]) else "")
        lines.append(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    lines += ["", "## Validation mAP50-95 per epoch (mean over seeds)", "", header, rule]
    for epoch in range(num_epochs):
        cells = [
            f"{s['per_epoch_mean'][MAP50_95_COLUMN][epoch]:.4f}"
            if epoch < len(s["per_epoch_mean"][MAP50_95_COLUMN])
            else ""
            for s in summaries
        ]
        lines.append(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Environment",
        "",
        f"{env['cpu']} ({env['cpu_count']} cores){', ' + env['gpu'] if env.get('gpu') else ''}; "
        + ", ".join(f"{name} {version}" for name, version in env["versions"].items())
        + f". yolods under test: a copy of `yolods/` taken when the benchmark started, at commit {code['git_commit']}"
        + (
            f" plus uncommitted changes ({'; '.join(code['uncommitted_changes'])})"
            if code["uncommitted_changes"]
            else ""
        )
        + f" (content sha256 {code['sha256']}); every yolods run imports that copy.",
        "Wall time is reported, not judged: the machine is shared with other jobs, and the load column is the "
        "1-minute load average when each run started (mean over seeds; above the core count, runs slow down, "
        "one-process runs with a thread per core the most). Per-run commands, wall times, load averages and "
        "per-seed values: `parity.json`.",
        "",
    ]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Library versions and this machine, for parity.json and the table's Environment section."""
    gpus = gpu(torch.device("cuda", 0)) if torch.cuda.is_available() else None
    return {
        "versions": library_versions("torch", "torchvision", "deepspeed", "ultralytics", "numpy", "yolods"),
        **machine(),
        "gpu": f"{gpus['gpus_per_node']} x {gpus['gpu']}" if gpus else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/parity.py",
        description="Train with the Ultralytics trainer and with yolods on the same setting; compare mAP over seeds.",
    )
    parser.add_argument("--data", help="Ultralytics data.yaml; default: the synthetic shapes set, made in --work-dir")
    parser.add_argument("--num-train", type=int, default=256, help="synthetic train images (without --data)")
    parser.add_argument("--num-val", type=int, default=64, help="synthetic val images (without --data)")
    parser.add_argument("--model", default="yolov8n.yaml", help="Ultralytics model yaml, trained from scratch")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--imgsz", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16, help="GLOBAL batch, the same for every row")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers (Ultralytics forces 0 on CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, the same for every row (paired)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run (split over its ranks)"
    )
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated row names (see the docstring)")
    parser.add_argument(
        "--hyp", action="append", default=[], metavar="KEY=VALUE", help="Ultralytics setting for both trainers"
    )
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/parity"), help="run directories and synthetic data")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --work-dir with the same settings")
    parser.add_argument(
        "--render", type=Path, metavar="PARITY_JSON", help="only rewrite parity.md next to an existing parity.json"
    )
    return parser


def parse_hyp(pairs: list[str]) -> dict[str, Any]:
    import yaml

    hyp = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--hyp {pair!r} is not KEY=VALUE")
        hyp[key] = yaml.safe_load(value)
    return hyp


def resolve_benchmark_data(args: argparse.Namespace, work_dir: Path) -> tuple[str, str]:
    """The data.yaml a benchmark trains on and its description for the report: `--data` as given, else the
    drawn-shapes set generated (once, seed 0) under `work_dir` from --num-train, --num-val and --imgsz."""
    if args.data:
        return str(Path(args.data).resolve()), f"`{args.data}`"
    from yolods.data.synthetic import make_synthetic_dataset

    root = work_dir / f"shapes-{args.num_train}-{args.num_val}-{args.imgsz}"
    data_yaml = make_synthetic_dataset(root, num_train=args.num_train, num_val=args.num_val, imgsz=args.imgsz, seed=0)
    description = (
        f"the drawn-shapes set ({args.num_train} train / {args.num_val} val images, 3 classes, "
        f"`python -m yolods.data.synthetic OUT --num-train {args.num_train} --num-val {args.num_val} "
        f"--imgsz {args.imgsz} --seed 0`)"
    )
    return str(data_yaml), description


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(render_markdown(json.loads(args.render.read_text())))
        return 0
    try:
        rows = [parse_row(name.strip()) for name in args.rows.split(",") if name.strip()]
        hyp = parse_hyp(args.hyp)
    except ValueError as error:
        print(f"parity: error: {error}", file=sys.stderr)
        return 2
    work_dir = args.work_dir.resolve()
    data_yaml, data_description = resolve_benchmark_data(args, work_dir)
    settings = {
        "model": args.model,
        "data": data_yaml,
        "data_description": data_description,
        "epochs": args.epochs,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "workers": args.workers,
        "device": args.device,
        "hyp": hyp,
        "threads": args.threads,
    }
    code = snapshot_yolods(work_dir)
    print(f"parity: yolods under test: {code}", flush=True)
    seeds_of = {row.name: args.seeds for row in rows}
    started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    started = time.perf_counter()
    records: dict[str, list[dict[str, Any]]] = {row.name: [] for row in rows}
    # Seed-major order: a load spike from other jobs on a shared machine spreads over rows instead of hitting one.
    for seed in range(max(seeds_of.values(), default=0)):
        for row in rows:
            if seed < seeds_of[row.name]:
                records[row.name].append(
                    run_one(row, settings=settings, seed=seed, work_dir=work_dir, code=code, reuse=args.reuse)
                )
    env = environment()
    env.update(load_avg_start=[round(x, 2) for x in load_start], load_avg_end=[round(x, 2) for x in os.getloadavg()])
    command = "python benchmarks/parity.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    report = {
        "command": command,
        "started_utc": started_utc,
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),  # this invocation (less than the runs' sum with --reuse)
        "runs_wall_s": round(sum(r["wall_s"] for rs in records.values() for r in rs), 1),
        "bar": f"95% CI of the mean paired difference in final mAP50-95 within +-{MIN_TOLERANCE}",
        "settings": settings,
        "seeds": seeds_of,
        "yolods_code": code,
        "environment": env,
        "rows": summarise(rows, records),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "parity.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    (args.out_dir / "parity.md").write_text(markdown)
    print(markdown)
    failed_runs = any(s["failed_seeds"] for s in report["rows"])
    outside = any(s["bar"] is not None and not s["bar"]["passed"] for s in report["rows"])
    return 2 if failed_runs else 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
