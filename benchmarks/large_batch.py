"""Time to accuracy at a large global batch: Ultralytics' rule against yolods' recipe (`--large_batch_rule`).

    python benchmarks/large_batch.py      # the table: 2048 drawn-shapes images, imgsz 96, yolov8n from scratch,
                                          # 20 epochs, 1 process, batch 64/256/512 x 2 rules x 2 seeds: 10 runs,
                                          # ~1.5 h on a 2-core CPU (estimated from the run below)
    python benchmarks/large_batch.py --imgsz 64 --num-val 256 --out-dir benchmarks/results/large_batch  # 37 min:
                                          # the committed table (results/large_batch/large_batch.md)
    python benchmarks/large_batch.py --num-train 128 --num-val 32 --epochs 2 --batches 16,64 --nbs 16 --seeds 1  # smoke
    python benchmarks/large_batch.py --data coco.yaml --device cuda --ranks 8 --imgsz 640 --epochs 100 \\
        --batches 64,256,512 --out-dir benchmarks/results/coco

Every (batch, rule, seed) is a fresh `yolods.train` process (torchrun with --ranks > 1) at the same model, data and
epochs, from a copy of `yolods/` taken at the start (benchmarks/parity.py's snapshot), so commits made meanwhile
change nothing. A batch at or below nbs is run once per seed: there both rules are Ultralytics'. A batch above nbs
is run under `--large_batch_rule ultralytics` and `yolods` (and any ablation `--rules` names, such as
`lr+batchnorm`: yolods' rule without its weight-decay part). By default the whole global batch is one forward per
rank, as Ultralytics' `batch=B`; `--micro-batch M` reaches it by accumulation instead (a DeepSpeed JSON with
train_micro_batch_size_per_gpu=M and gradient_accumulation_steps, which yolods' rule counts as the same k; the
warmup then ramps the accumulation from 1, as Ultralytics does below nbs, so warmup takes more, smaller steps).

Writes OUT_DIR/large_batch.json (every run: command, per-epoch mAP and time, optimizer steps, the rule's start
line, git commit and dirty tree), large_batch.md (final mAP50-95 mean and spread, per-epoch mAP, optimizer steps,
wall time to reach --target-fraction of the smallest batch's final mAP) and large_batch.png (mAP50-95 against
epoch per batch and rule). Exits 2 when a run failed, else 0: the verdicts are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parity import (
    MAP50_95_COLUMN,
    environment,
    free_port,
    mean_std,
    read_results_csv,
    resolve_benchmark_data,
    run_env,
    snapshot_yolods,
)

from yolods.bench.environment import source_state

REPO_ROOT = Path(__file__).resolve().parent.parent
RULE_LINE = "large batch:"  # the start line yolods.train logs (yolods/large_batch.py: describe)
GOAL_FRACTION = 0.95  # issue 18: at 8 x nbs, yolods' mean mAP50-95 >= 0.95 x its value at nbs


def plan_rows(batches: list[int], *, nbs: int, rules: list[str]) -> list[dict[str, Any]]:
    """One row per (batch, rule); batches at or below nbs get a single row (rule 'both'), run with the default."""
    rows = []
    for batch in batches:
        for rule in ["both"] if batch <= nbs else rules:
            rows.append({"name": f"b{batch}-{rule}", "batch": batch, "rule": rule, "k": max(batch / nbs, 1.0)})
    return rows


def train_command(row: dict[str, Any], *, settings: dict[str, Any], seed: int, run_dir: Path) -> list[str]:
    """`python -m yolods.train` (torchrun for several ranks) for one row and seed."""
    args = ["--model", settings["model"], "--data", settings["data"], "--epochs", str(settings["epochs"])]
    args += ["--imgsz", str(settings["imgsz"]), "--workers", str(settings["workers"]), "--seed", str(seed)]
    args += ["--device", settings["device"], "--nbs", str(settings["nbs"])]
    args += ["--project", str(run_dir.parent), "--name", run_dir.name, "--exist_ok"]
    if row["rule"] != "both":
        args += ["--large_batch_rule", row["rule"]]
    if settings["sync_bn"]:
        args.append("--sync_bn")
    ranks, micro = settings["ranks"], settings["micro_batch"]
    per_rank = row["batch"] // ranks
    if micro and micro < per_rank:
        ds_json = run_dir / "accumulate.json"
        ds_json.write_text(
            json.dumps(
                {
                    "train_micro_batch_size_per_gpu": micro,
                    "gradient_accumulation_steps": per_rank // micro,
                    "zero_optimization": {"stage": settings["zero"]},
                }
            )
        )
        args += ["--deepspeed_config", str(ds_json)]
    else:
        args += ["--batch", str(row["batch"]), "--zero", str(settings["zero"])]
    for key, value in settings["hyp"].items():
        args += ["--hyp", f"{key}={value}"]
    if ranks == 1:
        return [sys.executable, "-m", "yolods.train", *args]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        f"--master_port={free_port()}",
    ]
    return [*launcher, "-m", "yolods.train", *args]


def optimizer_steps(run_dir: Path) -> int | None:
    """Optimizer steps the run took: yolods logs one TensorBoard point per step (x axis: DeepSpeed's global_steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    tag = "throughput/imgs_per_s"
    return len(events.Scalars(tag)) if tag in events.Tags()["scalars"] else None


def run_one(
    row: dict[str, Any], *, settings: dict[str, Any], seed: int, work_dir: Path, code: dict[str, Any], reuse: bool
) -> dict[str, Any]:
    """Train one (row, seed) in a fresh process; returns its record (written as run.json in its run dir)."""
    run_dir = work_dir / row["name"] / f"seed{seed}"
    record_path = run_dir / "run.json"
    if reuse and record_path.exists():
        record = json.loads(record_path.read_text())
        if record["settings"] == settings and record["returncode"] == 0 and record["code"]["sha256"] == code["sha256"]:
            print(f"large_batch: reusing {row['name']} seed {seed} from {run_dir}", flush=True)
            return record
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier attempt's checkpoints, rows and step events must not count
    run_dir.mkdir(parents=True)
    command = train_command(row, settings=settings, seed=seed, run_dir=run_dir)
    log_path = run_dir / "train.log"
    print(f"large_batch: {row['name']} seed {seed}: {shlex.join(command)}", flush=True)
    started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    started = time.perf_counter()
    with log_path.open("w") as log:
        returncode = subprocess_run(
            command,
            cwd=code["run_cwd"],
            env=run_env(code, threads=max(1, (os.cpu_count() or 1) // settings["ranks"])),
            log=log,
        )
    wall_s = time.perf_counter() - started
    log_text = log_path.read_text(errors="replace")
    record: dict[str, Any] = {
        **row,
        "seed": seed,
        "command": shlex.join(command),
        "returncode": returncode,
        "started_utc": started_utc,
        "wall_s": round(wall_s, 1),
        "load_avg_start": round(load_start[0], 2),
        "run_dir": str(run_dir),
        "rule_line": next((line.strip() for line in log_text.splitlines() if RULE_LINE in line), None),
        "git_commit": code["git_commit"],
        "dirty": bool(code["uncommitted_changes"]),  # the yolods copy this run imported differs from the commit
        "settings": settings,
        "code": code,
    }
    csv_path = run_dir / "results.csv"
    if returncode != 0 or not csv_path.exists():
        record["returncode"] = returncode or -1
        record["error_tail"] = log_text.splitlines()[-25:]
        print(f"large_batch: {row['name']} seed {seed} FAILED (exit {returncode}); log: {log_path}", flush=True)
    else:
        epochs = read_results_csv(csv_path)
        record["epochs"] = [
            {"epoch": int(e["epoch"]), "mAP50-95": e[MAP50_95_COLUMN], "time_s": e["time"]} for e in epochs
        ]
        record["final_map"] = epochs[-1][MAP50_95_COLUMN]
        record["optimizer_steps"] = optimizer_steps(run_dir)
        print(
            f"large_batch: {row['name']} seed {seed}: mAP50-95 {record['final_map']:.4f}, "
            f"{record['optimizer_steps']} optimizer steps, {wall_s:.0f} s",
            flush=True,
        )
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def subprocess_run(command: list[str], *, cwd: str, env: dict[str, str], log) -> int:
    import subprocess

    return subprocess.run(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    ).returncode


# ----------------------------------------------------------------------------------------------------------------
# Summary


def time_to_target(record: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """(epoch, seconds since the run's start) of the first validation at or above `target`; (None, None) if never."""
    for epoch in record.get("epochs", []):
        if epoch["mAP50-95"] >= target:
            return epoch["epoch"], epoch["time_s"]
    return None, None


def summarise(rows: list[dict[str, Any]], records: dict[str, list[dict[str, Any]]], *, target_fraction: float):
    """Per row: final mAP50-95 mean/std/min/max, per-epoch mean, steps, wall time, time to the target mAP."""
    summaries = []
    for row in rows:
        done = [r for r in records[row["name"]] if r["returncode"] == 0]
        finals = [r["final_map"] for r in done]
        mean, std = mean_std(finals)
        num_epochs = min((len(r["epochs"]) for r in done), default=0)
        summaries.append(
            {
                **row,
                "seeds": [r["seed"] for r in records[row["name"]]],
                "failed_seeds": [r["seed"] for r in records[row["name"]] if r["returncode"] != 0],
                "final_map_mean": mean,
                "final_map_std": std,
                "final_map_min": min(finals, default=None),
                "final_map_max": max(finals, default=None),
                "map_per_epoch": [
                    statistics.fmean(r["epochs"][e]["mAP50-95"] for r in done) for e in range(num_epochs)
                ],
                "optimizer_steps": done[0]["optimizer_steps"] if done else None,
                "wall_s_mean": statistics.fmean(r["wall_s"] for r in done) if done else None,
                "rule_line": done[0]["rule_line"] if done else None,
                "git_commits": sorted({r["git_commit"] for r in records[row["name"]]}),
                "dirty": any(r["dirty"] for r in records[row["name"]]),
            }
        )
    reference = min(summaries, key=lambda s: s["batch"])  # the smallest batch (64 = nbs by default)
    target = None if reference["final_map_mean"] is None else target_fraction * reference["final_map_mean"]
    for summary in summaries:
        reached = [time_to_target(r, target) for r in records[summary["name"]] if r["returncode"] == 0 and target]
        summary["target_reached"] = sum(epoch is not None for epoch, _ in reached)
        hits = [(epoch, seconds) for epoch, seconds in reached if epoch is not None]
        summary["epochs_to_target_mean"] = statistics.fmean(e for e, _ in hits) if hits else None
        summary["time_to_target_s_mean"] = statistics.fmean(s for _, s in hits) if hits else None
        summary["ratio_to_reference"] = (
            summary["final_map_mean"] / reference["final_map_mean"]
            if summary["final_map_mean"] is not None and reference["final_map_mean"]
            else None
        )
    return summaries, reference, target


def verdicts(summaries: list[dict[str, Any]], *, nbs: int, reference_batch: int) -> list[str]:
    """Issue 18's goal, checked on this table: at 8 x nbs yolods >= 0.95 x batch nbs; never below Ultralytics' rule.

    The first needs a reference row at or below nbs; a table without one (a sweep at one large batch) skips it.
    """
    lines = []
    by_name = {s["name"]: s for s in summaries}
    for summary in summaries:
        if summary["rule"] != "yolods" or summary["final_map_mean"] is None:
            continue
        batch = summary["batch"]
        ultralytics = by_name.get(f"b{batch}-ultralytics")
        if ultralytics and ultralytics["final_map_mean"] is not None:
            diff = summary["final_map_mean"] - ultralytics["final_map_mean"]
            lines.append(
                f"- batch {batch}: yolods {summary['final_map_mean']:.4f} vs Ultralytics' rule "
                f"{ultralytics['final_map_mean']:.4f} ({diff:+.4f}): {'not below' if diff >= 0 else '**below**'}"
            )
        if batch == 8 * nbs and reference_batch <= nbs and summary["ratio_to_reference"] is not None:
            ratio = summary["ratio_to_reference"]
            verdict = "**reached**" if ratio >= GOAL_FRACTION else "**not reached**"
            lines.append(
                f"- batch {batch} (8 x nbs): {ratio:.3f} x the batch-{reference_batch} mAP50-95 (goal {GOAL_FRACTION}): "
                f"{verdict}"
            )
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    settings, summaries = report["settings"], report["rows"]
    code, env = report["code"], report["environment"]
    target = report["target_map"]
    lines = [
        "# Large global batch: time to accuracy, Ultralytics' rule vs yolods' recipe",
        "",
        f"Produced by `{report['command']}` on {report['finished_utc'][:10]}: {report['wall_s'] / 60:.1f} min wall.",
        "",
        f"Setting: `{settings['model']}` from scratch on {settings['data_description']}, {settings['epochs']} epochs, "
        f"imgsz {settings['imgsz']}, {settings['ranks']} rank(s), ZeRO-{settings['zero']}, device {settings['device']}, "
        f"nbs {settings['nbs']}, `optimizer=auto` unless --hyp says otherwise"
        + (f", micro batch {settings['micro_batch']} (accumulation)" if settings["micro_batch"] else "")
        + (", --sync_bn" if settings["sync_bn"] else "")
        + ". Final-epoch validation of the EMA weights; mean ± sample std (min-max) over seeds. Target: "
        + f"{report['target_fraction']} x the batch-{report['reference_batch']} final mAP50-95 = {_fmt(target)}.",
        "",
        "| batch | k | rule | seeds | final mAP50-95 | x batch "
        + str(report["reference_batch"])
        + " | optimizer steps "
        "| epochs to target | wall s to target | wall s/run | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        spread = f"{_fmt(s['final_map_mean'])} ± {_fmt(s['final_map_std'])} ({_fmt(s['final_map_min'])}-{_fmt(s['final_map_max'])})"
        failed = f" (failed: {s['failed_seeds']})" if s["failed_seeds"] else ""
        reached = f"{_fmt(s['epochs_to_target_mean'], 1)} ({s['target_reached']}/{len(s['seeds'])} seeds)"
        lines.append(
            f"| {s['batch']} | {s['k']:g} | {s['rule']} | {','.join(map(str, s['seeds']))}{failed} | {spread} | "
            f"{_fmt(s['ratio_to_reference'], 3)} | {s['optimizer_steps']} | {reached} | "
            f"{_fmt(s['time_to_target_s_mean'], 0)} | {_fmt(s['wall_s_mean'], 0)} | "
            f"{','.join(s['git_commits'])}{' (dirty)' if s['dirty'] else ''} |"
        )
    lines += [
        "",
        "## Issue 18's goal on this table",
        "",
        *(report["verdicts"] or ["- (nothing to check: the goal needs a row at or below nbs and one above)"]),
    ]
    lines += ["", "## What each rule set (rank 0's start line, first seed)", ""]
    lines += [f"- {s['name']}: `{s['rule_line']}`" for s in summaries]
    num_epochs = max((len(s["map_per_epoch"]) for s in summaries), default=0)
    lines += ["", "## Validation mAP50-95 per epoch (mean over seeds)", ""]
    lines += ["| epoch | " + " | ".join(s["name"] for s in summaries) + " |", "|---" * (len(summaries) + 1) + "|"]
    for epoch in range(num_epochs):
        cells = [f"{s['map_per_epoch'][epoch]:.4f}" if epoch < len(s["map_per_epoch"]) else "" for s in summaries]
        lines.append(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![mAP50-95 against epoch](large_batch.png)",
        "",
        "## Environment",
        "",
        f"{env['cpu']} ({env['cpu_count']} cores){', ' + env['gpu'] if env.get('gpu') else ''}; "
        + ", ".join(f"{name} {version}" for name, version in env["versions"].items())
        + f". yolods: a copy of `yolods/` taken at the start, commit {code['git_commit']}"
        + (" with uncommitted changes" if code["uncommitted_changes"] else "")
        + f" (sha256 {code['sha256']}); repository tree {'dirty' if report['repo']['dirty'] else 'clean'} at "
        + f"{report['repo']['commit']}. Wall times include validation and checkpoints each epoch; the machine may "
        + "be shared (1-minute load average at each run's start: large_batch.json).",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """mAP50-95 against epoch: a colour per batch, solid for yolods' recipe, dashed for Ultralytics' rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    batches = sorted({s["batch"] for s in report["rows"]})
    colours = dict(zip(batches, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = {"both": "-", "yolods": "-", "ultralytics": "--"}  # ablations (parts of yolods' rule): dotted
    for s in report["rows"]:
        if s["map_per_epoch"]:
            epochs = range(1, len(s["map_per_epoch"]) + 1)
            label = f"batch {s['batch']}" + ("" if s["rule"] == "both" else f", {s['rule']} rule")
            style = styles.get(s["rule"], ":")
            axes.plot(epochs, s["map_per_epoch"], style, color=colours[s["batch"]], label=label, marker=".")
    if report["target_map"]:
        axes.axhline(report["target_map"], color="grey", linewidth=0.8, linestyle=":", label="target")
    axes.set(xlabel="epoch", ylabel="mAP50-95 (mean over seeds)", title="Same epochs, larger global batch")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/large_batch.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="Ultralytics data.yaml; default: the drawn-shapes set, made in --work-dir")
    parser.add_argument("--num-train", type=int, default=2048, help="generated train images (without --data)")
    parser.add_argument("--num-val", type=int, default=512, help="generated val images (without --data)")
    parser.add_argument("--model", default="yolov8n.yaml", help="Ultralytics model yaml, trained from scratch")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--imgsz", type=int, default=96)
    parser.add_argument("--batches", default="64,256,512", help="GLOBAL batches, comma-separated")
    parser.add_argument(
        "--rules",
        default="ultralytics,yolods",
        help="rules for the batches above nbs; parts of yolods' rule such as lr+batchnorm are ablations",
    )
    parser.add_argument("--nbs", type=int, default=64, help="Ultralytics' nominal batch size")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per row")
    parser.add_argument("--ranks", type=int, default=1, help="processes per run (torchrun above 1)")
    parser.add_argument("--micro-batch", type=int, help="images per rank per forward; accumulate up to the batch")
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--sync-bn", action="store_true", help="pass --sync_bn to every run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers per rank")
    parser.add_argument("--target-fraction", type=float, default=0.9, help="target = this x the smallest batch's mAP")
    parser.add_argument("--hyp", action="append", default=[], metavar="KEY=VALUE", help="Ultralytics setting for all")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/large_batch"), help="run dirs and generated data")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --work-dir with the same settings")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite the .md and .png of a large_batch.json"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = args.out_dir
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render_markdown(report))
        plot(report, args.render.with_suffix(".png"))
        return 0
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if any(batch % args.ranks for batch in batches):
        print(
            f"large_batch: error: every batch in {args.batches} must split over --ranks {args.ranks}", file=sys.stderr
        )
        return 2
    from yolods.large_batch import rule_parts

    try:
        for rule in rules:
            rule_parts(rule)  # what --large_batch_rule accepts; names the bad rule
    except ValueError as error:
        print(f"large_batch: error: --rules: {error}", file=sys.stderr)
        return 2
    from parity import parse_hyp

    work_dir = args.work_dir.resolve()
    data_yaml, data_description = resolve_benchmark_data(args, work_dir)
    settings = {
        "model": args.model,
        "data": data_yaml,
        "data_description": data_description,
        "epochs": args.epochs,
        "imgsz": args.imgsz,
        "nbs": args.nbs,
        "ranks": args.ranks,
        "micro_batch": args.micro_batch,
        "zero": args.zero,
        "sync_bn": args.sync_bn,
        "device": args.device,
        "workers": args.workers,
        "hyp": parse_hyp(args.hyp),
    }
    code = snapshot_yolods(work_dir)
    repo = source_state(REPO_ROOT, short=True)
    print(f"large_batch: yolods under test: {code}", flush=True)
    rows = plan_rows(batches, nbs=args.nbs, rules=rules)
    started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    records: dict[str, list[dict[str, Any]]] = {row["name"]: [] for row in rows}
    for seed in range(args.seeds):  # seed-major: a load spike on a shared machine spreads over the rows
        for row in rows:
            records[row["name"]].append(
                run_one(row, settings=settings, seed=seed, work_dir=work_dir, code=code, reuse=args.reuse)
            )
    summaries, reference, target = summarise(rows, records, target_fraction=args.target_fraction)
    command = (
        "python benchmarks/large_batch.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    report = {
        "command": command,
        "started_utc": started_utc,
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
        "settings": settings,
        "code": code,
        "repo": {"commit": repo.commit if repo else "unknown", "dirty": bool(repo and repo.changes)},
        "environment": environment(),
        "reference_batch": reference["batch"],
        "target_fraction": args.target_fraction,
        "target_map": target,
        "verdicts": verdicts(summaries, nbs=args.nbs, reference_batch=reference["batch"]),
        "rows": summaries,
        "runs": [record for row in rows for record in records[row["name"]]],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "large_batch.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    (out_dir / "large_batch.md").write_text(markdown)
    plot(report, out_dir / "large_batch.png")
    print(markdown)
    return 2 if any(s["failed_seeds"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
