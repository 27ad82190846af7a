"""Prediction throughput: `python -m yolods.predict` on 1 rank and under torchrun on N ranks, same images.

    python benchmarks/predict_throughput.py --out benchmarks/results/cpu      # the committed figures (~3 min, 2 cores)
    python benchmarks/predict_throughput.py --ranks 1,8 --device cuda --images 4096 --imgsz 640 --batch 64

Each run is a fresh job over the same drawn-shapes images (`python -m yolods.data.synthetic`) with an untrained
yolov8n saved in Ultralytics' format (inference costs the same as with trained weights, but for NMS, which
sees fewer boxes above --conf). img/s is what yolods.predict reports in summary.json: images / the slowest
rank's time from its first batch to its last (reading, letterbox, forward, NMS, writing labels and records);
process start-up and model loading are reported apart as the job's wall time. Writes OUT/predict_throughput.json
and OUT/predict_throughput.md; refuses to write them from a tree with uncommitted changes unless --allow-dirty.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this tree's yolods, whichever checkout the environment installed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "local")
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--repeats", type=int, default=2, help="runs per rank count; the table shows each")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--allow-dirty", action="store_true", help="measure a tree with uncommitted changes")
    return parser.parse_args(argv)


def make_inputs(work: Path, *, num_images: int, imgsz: int) -> tuple[Path, Path]:
    """The images (the synthetic set's val split) and untrained yolov8n weights."""
    import torch

    from yolods.data.synthetic import CLASS_NAMES, make_synthetic_dataset
    from yolods.hyp import ultralytics_settings
    from yolods.model import build_model, ultralytics_weights

    data_yaml = make_synthetic_dataset(work / "shapes", num_train=1, num_val=num_images, imgsz=imgsz, seed=0)
    hyp = ultralytics_settings({"imgsz": imgsz, "data": str(data_yaml)})
    torch.manual_seed(0)
    names = dict(enumerate(CLASS_NAMES))
    model = build_model("yolov8n.yaml", num_classes=len(names), class_names=names, hyp=hyp, verbose=False)
    weights = work / "yolov8n-untrained.pt"
    checkpoint = ultralytics_weights(model.eval(), epoch=0, best_fitness=None, updates=0, metrics={})
    torch.save({**checkpoint, "train_args": vars(hyp)}, weights)
    return data_yaml.parent / "images" / "val", weights


def predict_command(num_ranks: int, args: list[str]) -> list[str]:
    if num_ranks == 1:
        return [sys.executable, "-m", "yolods.predict", *args]
    with socket.socket() as probe:  # a free port: other jobs on the machine may hold the default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_ranks}", f"--master_port={port}"]
    return [*launcher, "-m", "yolods.predict", *args]


def run_once(num_ranks: int, *, images: Path, weights: Path, out: Path, opts: argparse.Namespace) -> dict[str, Any]:
    args = ["--model", str(weights), "--source", str(images), "--imgsz", str(opts.imgsz), "--batch", str(opts.batch)]
    args += ["--device", opts.device, "--project", str(out), "--name", f"ranks{num_ranks}"]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.pop("OMP_NUM_THREADS", None)  # yolods gives each rank cores / ranks threads
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))  # this tree's yolods
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(predict_command(num_ranks, args), env=env, check=True, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    summary = json.loads((out / f"ranks{num_ranks}" / "summary.json").read_text())
    return {
        "ranks": num_ranks,
        "imgs_per_s": summary["imgs_per_s"],
        "imgs_per_s_per_rank": [rank["imgs_per_s"] for rank in summary["per_rank"]],
        "images_per_rank": [rank["images"] for rank in summary["per_rank"]],
        "job_wall_s": wall_s,
        "load_before": load_before,
    }


def environment() -> dict[str, Any]:
    from yolods.bench.environment import library_versions, machine, source_state

    state = source_state(REPO_ROOT)
    import yolods

    return {
        "commit": state.label if state else None,
        "yolods_source": str(Path(yolods.__file__).parent),
        "versions": library_versions("torch", "torchvision", "ultralytics", "deepspeed", "opencv-python"),
        "machine": machine(),
        "torch_threads_note": "each rank uses cpu_count / ranks threads (yolods.dist.init_distributed)",
    }


def write_report(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "predict_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    env, opts = record["environment"], record["settings"]
    lines = [
        "# Prediction throughput: yolods.predict on 1 and N ranks",
        "",
        f"Produced by `python benchmarks/predict_throughput.py` on {record['date']} at commit `{env['commit']}`;",
        f"{env['machine']['cpu']}, {env['machine']['cpu_count']} logical CPUs, shared with other jobs (load average",
        "at each start in the table). Versions: "
        + ", ".join(f"{name} {version}" for name, version in env["versions"].items())
        + ".",
        "",
        f"Setting: untrained yolov8n, {opts['images']} drawn-shapes images of {opts['imgsz']}x{opts['imgsz']}, "
        f"`--imgsz {opts['imgsz']} --batch {opts['batch']}` (per rank), device {opts['device']}, fp32, conf 0.25.",
        "img/s = images / the slowest rank's time from its first batch to its last (decode, letterbox, forward, NMS,",
        "label and record writes); job wall s includes process start-up and model loading.",
        "",
        "| ranks | run | img/s total | img/s per rank | images per rank | job wall s | load at start |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        per_rank = ", ".join(f"{value:.1f}" for value in run["imgs_per_s_per_rank"])
        lines.append(
            f"| {run['ranks']} | {run['repeat']} | {run['imgs_per_s']:.1f} | {per_rank} | "
            f"{', '.join(map(str, run['images_per_rank']))} | {run['job_wall_s']:.1f} | {run['load_before']:.1f} |"
        )
    lines += ["", "Median img/s: " + ", ".join(f"{n} rank(s) {v:.1f}" for n, v in record["median_imgs_per_s"].items())]
    (out / "predict_throughput.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    env = environment()
    if env["commit"] is None or (env["commit"].endswith("-dirty") and not opts.allow_dirty):
        print(f"the tree has uncommitted changes ({env['commit']}): commit first, or pass --allow-dirty")
        return 2
    rank_counts = [int(n) for n in opts.ranks.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="yolods-predict-bench-") as tmp:
        images, weights = make_inputs(Path(tmp), num_images=opts.images, imgsz=opts.imgsz)
        for repeat in range(1, opts.repeats + 1):
            for num_ranks in rank_counts:
                out = Path(tmp) / f"run{repeat}"
                run = {**run_once(num_ranks, images=images, weights=weights, out=out, opts=opts), "repeat": repeat}
                print(json.dumps(run), flush=True)
                runs.append(run)
    medians = {str(n): statistics.median(run["imgs_per_s"] for run in runs if run["ranks"] == n) for n in rank_counts}
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": env,
        "settings": {key: getattr(opts, key) for key in ("images", "imgsz", "batch", "device", "repeats")},
        "runs": runs,
        "median_imgs_per_s": medians,
    }
    write_report(opts.out, record)
    print(f"wrote {opts.out / 'predict_throughput.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
