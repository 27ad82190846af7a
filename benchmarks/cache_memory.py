"""Resident memory per node with `--cache ram` at 2 ranks: yolods' store, held once per node, against Ultralytics'
per-rank cache.

    python benchmarks/cache_memory.py --out benchmarks/results       # the committed figures (~2.5 min, 2 busy cores)
    python benchmarks/cache_memory.py --ranks 8 --images 2000 --imgsz 640 --out /tmp/cache-bench

Each variant is a fresh `torchrun -m yolods.train` job on the same drawn-shapes set, 2 loader workers per rank:
  none       no cache
  per-rank   `--cache ram` with YOLODS_CACHE_PER_NODE=0: Ultralytics' own cache, what `--cache ram` did before
             yolods shared it (every rank decodes and holds every image)
  per-node   `--cache ram`: decoded once per node into one store that every rank and loader worker maps read-only
Its processes (the ranks and their loader workers, not torchrun's agent) are read every SAMPLE_S from the start
until --measure_s seconds into training (datasets built, workers forked, steps running: memory has levelled off),
then every process of the job is killed with SIGKILL, as a crash would end it, and the store directory is checked
for files left behind. Node memory = the sum over the processes of the PSS of every mapping but the store's, plus
the store's size once. PSS splits each shared page among the processes that map it, so a page a rank shares with
its forked workers (Ultralytics' cache after fork) or with the other rank counts once; the store (a tmpfs file) is
counted whole, touched or not. The sums of RSS (shared pages once per process) and of USS are shown for contrast.
Writes OUT/cache_memory.json and OUT/cache_memory.md; each row records the commit and whether the tree was dirty.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # measure this tree's yolods, whichever checkout the environment installed

SAMPLE_S = 1.0
STORE_MARK = "yolods-images-"  # in the path of every store mapping (yolods.data.shared_images.STORE_PREFIX)
MIB = 1 << 20
VARIANTS = {  # name: (yolods flags, environment)
    "none": ([], {}),
    "per-rank": (["--cache", "ram"], {"YOLODS_CACHE_PER_NODE": "0"}),
    "per-node": (["--cache", "ram"], {}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "local")
    parser.add_argument("--ranks", type=int, default=2)
    # 800 images at 320: a copy of 264 MiB, several times the noise between two jobs' figures (~50 MiB here)
    parser.add_argument("--images", type=int, default=800, help="train images (val: an eighth)")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16, help="global")
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--measure_s", type=float, default=16.0, help="seconds of training sampled before the kill")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--from-json", type=Path, help="only rewrite the .md from a cache_memory.json")
    parser.add_argument("--allow-dirty", action="store_true", help="measure a tree with uncommitted changes")
    return parser.parse_args(argv)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_memory(processes: list) -> dict[str, int]:
    """PSS of the processes with the store counted once, whole; the sum of their RSS and USS for contrast."""
    import psutil

    pss = rss = uss = 0
    store_sizes: dict[str, int] = {}
    for process in processes:
        try:
            mappings = process.memory_maps(grouped=True)
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
            continue  # a worker that ended meanwhile
        rss, uss = rss + info.rss, uss + info.uss
        for mapping in mappings:
            if STORE_MARK in mapping.path:
                store_sizes[mapping.path] = max(store_sizes.get(mapping.path, 0), mapping.size)
            else:
                pss += mapping.pss
    store = sum(store_sizes.values())
    return {"node_bytes": pss + store, "store_bytes": store, "rss_sum_bytes": rss, "uss_sum_bytes": uss}


def run_variant(name: str, *, data_yaml: Path, project: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """One job, sampled from its start until MEASURE_S into training, then killed (SIGKILL, every process of it);
    returns its peak node memory, what the job said of its cache, and what the kill left in the store directory."""
    import psutil

    flags, extra_env = VARIANTS[name]
    store_dir = Path(
        tempfile.mkdtemp(prefix="yolods-cache-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), **extra_env}
    env["YOLODS_CACHE_DIR"] = str(store_dir)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={opts.ranks}"]
    command += [f"--master_port={free_port()}", "-m", "yolods.train", "--data", str(data_yaml), "--epochs", "1"]
    command += ["--imgsz", str(opts.imgsz), "--batch", str(opts.batch), "--workers", str(opts.workers)]
    command += ["--project", str(project), "--name", name, *flags]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    training = threading.Event()

    def read() -> None:
        for line in job.stdout:
            output.append(line)
            if "Mem(GiB)" in line:  # the epoch's progress header: datasets built, workers starting
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    agent = psutil.Process(job.pid)
    samples, training_since = [], None
    while job.poll() is None:
        if training.is_set() and training_since is None:
            training_since = time.perf_counter()
        if training_since is not None and time.perf_counter() - training_since > opts.measure_s:
            break
        try:
            processes = agent.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        if processes:
            now = time.perf_counter()
            settled = training_since is not None and now - training_since >= opts.measure_s / 2
            samples.append({"t_s": round(now - started, 1), "processes": len(processes), "settled": settled})
            samples[-1].update(node_memory(processes))
        time.sleep(SAMPLE_S)
    killed = job.poll() is None
    if killed:  # as a crash would end it: the ranks and workers first, then torchrun's agent
        for process in [*agent.children(recursive=True), agent]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    job.wait()
    reader.join()
    if not killed and job.returncode != 0:
        raise RuntimeError(f"{name}: exit {job.returncode}\n{''.join(output)[-3000:]}")
    if training_since is None:
        raise RuntimeError(f"{name}: ended before training started\n{''.join(output)[-3000:]}")
    time.sleep(1.0)  # the kernel reaps the killed processes
    left = sorted(path.name for path in store_dir.iterdir())
    shutil.rmtree(store_dir, ignore_errors=True)
    peak = max(samples, key=lambda sample: sample["node_bytes"])
    settled = [sample for sample in samples if sample["settled"]] or samples[-1:]
    return {
        "variant": name,
        "flags": " ".join(flags),
        "env": extra_env,
        "peak": peak,
        # the second half of the measured training: workers forked, steps running, memory levelled off
        "settled_node_bytes": int(statistics.median(sample["node_bytes"] for sample in settled)),
        "settled_samples": len(settled),
        "peak_store_bytes": max(sample["store_bytes"] for sample in samples),
        "samples": len(samples),
        "measured_s": round(time.perf_counter() - started, 1),
        "training_s_measured": opts.measure_s,
        "killed": killed,
        "store_files_left_after_kill": left,
        "load_before": round(load_before, 2),
        "cache_lines": [line.strip() for line in output if "--cache ram:" in line],
    }


def make_data(work: Path, opts: argparse.Namespace) -> Path:
    from yolods.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        work / "shapes", num_train=opts.images, num_val=max(opts.images // 8, 8), imgsz=opts.imgsz, seed=0
    )


def write_report(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    opts, env = record["settings"], record["environment"]
    rows = {row["variant"]: row for row in record["rows"]}
    copy = max(row["peak_store_bytes"] for row in record["rows"]) or None
    lines = [
        "# Resident memory per node with --cache ram: shared per node against Ultralytics' per-rank cache",
        "",
        f"Produced by `python benchmarks/cache_memory.py` on {record['date']}; {env['machine']['cpu']}, "
        f"{env['machine']['cpu_count']} logical CPUs, {env['memory_gib']:.0f} GiB RAM, shared with other jobs (load "
        "average at each start in the table). Versions: "
        + ", ".join(f"{name} {version}" for name, version in env["versions"].items())
        + ".",
        "",
        f"Setting: {opts['ranks']} ranks (torchrun, gloo, CPU), yolov8n, {opts['images']} train + "
        f"{max(opts['images'] // 8, 8)} val drawn-shapes images of {opts['imgsz']}x{opts['imgsz']}, "
        f"`--imgsz {opts['imgsz']} --batch {opts['batch']} --workers {opts['workers']}`, sampled every {SAMPLE_S:g} s "
        f"from the job's start to {opts['measure_s']:g} s into training, then killed with SIGKILL. Node memory: the "
        'sum of PSS over the ranks and their loader workers, the store counted once and whole; "in training": the '
        "median over the second half of the measured training."
        + (f" One copy of the decoded images (train + val): {copy / MIB:.1f} MiB." if copy else ""),
        "",
        "| variant | cache | node memory in training, MiB | over no cache, MiB | in copies of the images "
        "| peak, MiB | sum of RSS at peak, MiB | processes | store files left after SIGKILL | load at start "
        "| commit | dirty |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        peak, settled = row["peak"], row["settled_node_bytes"]
        over = settled - rows["none"]["settled_node_bytes"] if "none" in rows else None
        cache = row["flags"] + (" " + " ".join(f"{k}={v}" for k, v in row["env"].items()) if row["env"] else "")
        lines.append(
            f"| {row['variant']} | `{cache or 'none'}` | {settled / MIB:.0f} | "
            f"{'' if over is None else f'{over / MIB:+.0f}'} | {'' if over is None or not copy else f'{over / copy:+.2f}'} | "
            f"{peak['node_bytes'] / MIB:.0f} | {peak['rss_sum_bytes'] / MIB:.0f} | {peak['processes']} | "
            f"{len(row['store_files_left_after_kill'])} | {row['load_before']:.1f} | `{row['commit'][:12]}` | "
            f"{'yes' if row['dirty'] else 'no'} |"
        )
    if copy and {"per-rank", "per-node"} <= rows.keys():
        saved = rows["per-rank"]["settled_node_bytes"] - rows["per-node"]["settled_node_bytes"]
        lines += [
            "",
            f"Per node, sharing saved {saved / MIB:.0f} MiB in training ({saved / copy:.2f} copies of the images).",
        ]
    lines += [
        "",
        "\"over no cache\": what the variant's cache costs the node (its figure minus the no-cache job's), within",
        "the noise between two jobs' figures. The sum of RSS counts every shared page once per process that maps it",
        "(the libraries, the store, a rank's pages its forked workers share): what a per-process view would add up.",
        "Without a cache each loader worker holds a mosaic buffer of recent images (up to 8 batches), which a RAM",
        "cache replaces: so a cache costs a little less than its copies over no cache.",
    ]
    (out / "cache_memory.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    import psutil

    from yolods.bench.environment import library_versions, machine, source_state

    opts = parse_args(argv)
    if opts.from_json:
        write_report(opts.out, json.loads(opts.from_json.read_text()))
        return 0
    state = source_state(REPO_ROOT)
    if state is None or (state.changes and not opts.allow_dirty):
        print("the tree has uncommitted changes (or no git): commit first, or pass --allow-dirty")
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="yolods-cache-bench-") as tmp:
        data_yaml = make_data(Path(tmp), opts)
        for name in opts.variants.split(","):
            row = run_variant(name, data_yaml=data_yaml, project=Path(tmp) / "runs", opts=opts)
            row.update(commit=state.commit, dirty=bool(state.changes))
            print(
                json.dumps(
                    {
                        key: row[key]
                        for key in ("variant", "peak", "measured_s", "store_files_left_after_kill", "load_before")
                    }
                ),
                flush=True,
            )
            rows.append(row)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {key: getattr(opts, key) for key in ("ranks", "images", "imgsz", "batch", "workers", "measure_s")},
        "environment": {
            "versions": library_versions("torch", "ultralytics", "deepspeed", "psutil"),
            "machine": machine(),
            "memory_gib": psutil.virtual_memory().total / (1 << 30),
        },
        "rows": rows,
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "cache_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    write_report(opts.out, record)
    print(f"wrote {opts.out / 'cache_memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
