"""The Python stages of benchmarks/gpu/run.sh (every other stage is one `python -m yolods.bench...` command).

    python3 benchmarks/gpu/stages.py env OUT/env.json --device cuda        # versions, process group of one
    python3 benchmarks/gpu/stages.py data ROOT --num-train 4608 --imgsz 640  # shapes set, written in parallel
    python3 benchmarks/gpu/stages.py plan --device cuda --model n ...        # resolve a bench command, run nothing
    python3 benchmarks/gpu/stages.py profile OUT/profile.txt --device cuda --model s --micro-batch 128
    python3 benchmarks/gpu/stages.py summary OUT --timeline TIMELINE.tsv     # OUT/summary.md, printed too

Run from the repository root with it on PYTHONPATH (run.sh does), so `yolods` is this checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

GIB = 2**30
MIB = 2**20
PHASES = ("data_wait", "forward", "backward", "optimizer")


def _say(message: str) -> None:
    print(f"stages: {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# env: what runs, and a process group of one on the device's backend


def _where(module: Any) -> str:
    return str(Path(module.__file__).resolve().parent)


def env(out: Path, *, device_type: str) -> int:
    started = time.perf_counter()
    import torch

    import yolods  # prepares the process environment (offline Ultralytics) before the imports below

    imported_torch = time.perf_counter()
    import deepspeed
    import pydantic
    import ultralytics
    from deepspeed.accelerator import get_accelerator

    imported = time.perf_counter()
    record: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "deepspeed": deepspeed.__version__,
        "deepspeed_accelerator": get_accelerator()._name,
        "ultralytics": ultralytics.__version__,
        "pydantic": pydantic.VERSION,
        "yolods": yolods.__version__,
        "paths": {m.__name__: _where(m) for m in (torch, deepspeed, ultralytics, pydantic, yolods)},
        "import_s": {"torch+yolods": imported_torch - started, "deepspeed+ultralytics": imported - imported_torch},
        "cpu_count": os.cpu_count(),
    }
    try:
        import torchvision

        record["torchvision"] = torchvision.__version__
    except ImportError as error:
        record["torchvision"] = f"missing: {error}"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            _say("error: torch sees no CUDA device")
            return 1
        props = torch.cuda.get_device_properties(0)
        record.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GIB, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    record["process_group"] = _process_group_of_one(device_type)
    if device_type == "cuda":
        record["bf16_matmul_tflops"] = _matmul_tflops(torch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    group = record["process_group"]
    _say(
        f"python {record['python']}, torch {record['torch']} (CUDA {record['torch_cuda']}, cuDNN {record['cudnn']}), "
        f"deepspeed {record['deepspeed']} (accelerator {record['deepspeed_accelerator']}), ultralytics "
        f"{record['ultralytics']}, pydantic {record['pydantic']}, torchvision {record['torchvision']}"
    )
    _say(f"deepspeed from {record['paths']['deepspeed']}; ultralytics from {record['paths']['ultralytics']}")
    if device_type == "cuda":
        _say(
            f"{record['gpu']}, {record['gpu_memory_gib']} GiB, sm {record['capability']}, NCCL {record['nccl']}, "
            f"bf16 matmul {record['bf16_matmul_tflops']:.0f} TFLOP/s"
        )
    _say(
        f"process group of one: backend {group['backend']}, world size {group['world_size']}, all_reduce "
        f"{'ok' if group['all_reduce_ok'] else 'WRONG'} in {group['all_reduce_ms']:.1f} ms "
        f"(imports {record['import_s']['torch+yolods']:.1f} s + {record['import_s']['deepspeed+ultralytics']:.1f} s)"
    )
    return 0 if group["all_reduce_ok"] and group["backend"] == ("nccl" if device_type == "cuda" else "gloo") else 1


def _process_group_of_one(device_type: str) -> dict[str, Any]:
    """Join a group of one the way yolods.train does (yolods.dist -> deepspeed.init_distributed), all_reduce once."""
    import torch
    import torch.distributed as torch_dist

    from yolods import dist

    dist.init_distributed(device_type)
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    tensor = torch.ones(1 << 20, device=device)
    started = time.perf_counter()
    torch_dist.all_reduce(tensor)
    if device_type == "cuda":
        torch.cuda.synchronize()
    elapsed_ms = (time.perf_counter() - started) * 1e3
    result = {
        "backend": torch_dist.get_backend(),
        "world_size": torch_dist.get_world_size(),
        "all_reduce_ok": bool((tensor == 1).all()),
        "all_reduce_ms": elapsed_ms,
    }
    dist.shutdown()
    return result


def _matmul_tflops(torch) -> float:
    """bf16 8192^3 matrix products: the chip's ceiling this run, to set the training figures against."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


# ----------------------------------------------------------------------------------------------------------------
# data: the drawn-shapes set, shards written in parallel, then merged into one data.yaml


def _write_shard(root: str, num_train: int, num_val: int, imgsz: int, seed: int) -> str:
    from yolods.data.synthetic import make_synthetic_dataset

    return str(make_synthetic_dataset(root, num_train=num_train, num_val=num_val, imgsz=imgsz, seed=seed))


def data(root: Path, *, num_train: int, num_val: int, imgsz: int, shards: int, seed: int) -> int:
    """`python -m yolods.data.synthetic`'s set, `shards` processes each writing a part; shard 0 is `root` itself
    (its data.yaml and val split), the others' train images and labels move into it with a prefix."""
    started = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)  # shards append to it: start from nothing
    shards = max(1, min(shards, num_train))
    sizes = [num_train // shards + (1 if index < num_train % shards else 0) for index in range(shards)]
    roots = [root] + [root.parent / f"{root.name}.part{index}" for index in range(1, shards)]
    with ProcessPoolExecutor(max_workers=shards) as pool:
        futures = [
            pool.submit(_write_shard, str(path), size, num_val if index == 0 else 0, imgsz, seed + index)
            for index, (path, size) in enumerate(zip(roots, sizes))
        ]
        yaml_path = Path(futures[0].result())
        for future in futures[1:]:
            future.result()
    for index, part in enumerate(roots[1:], start=1):
        for kind in ("images", "labels"):
            target = root / kind / "train"
            for file in (part / kind / "train").iterdir():
                file.rename(target / f"s{index:02d}_{file.name}")
        shutil.rmtree(part)
    images = len(list((root / "images" / "train").iterdir()))
    size = sum(file.stat().st_size for file in (root / "images" / "train").iterdir())
    _say(
        f"{images} train images ({size / MIB:.0f} MiB) + {num_val} val at {imgsz} px in {shards} shards, "
        f"{time.perf_counter() - started:.1f} s -> {yaml_path}"
    )
    return 0 if images == num_train else 1


# ----------------------------------------------------------------------------------------------------------------
# plan: a bench command resolved as the bench resolves it (every configuration through yolods' checks), not run


def plan(bench_argv: list[str]) -> int:
    from yolods.bench.engines import bench_plan
    from yolods.bench.sweep import build_parser, expand
    from yolods.config import ConfigError

    args = build_parser().parse_args(bench_argv)
    try:
        configs = expand(args, world_size=1)
        for cfg in configs:
            if cfg.engine != "ultralytics":
                bench_plan(cfg, world_size=1)  # the data.yaml is checked when it runs; synthetic here
    except ConfigError as error:
        _say(f"error: {error}")
        return 2
    ends = configs[0].label + (f" ... {configs[-1].label}" if len(configs) > 1 else "")
    _say(f"{len(configs)} configurations resolve: {ends}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# profile: one torch.profiler window over the step the bench times


STEP_ANNOTATION = "train_step_"  # the profiler window names each step train_step_N
KERNEL_KINDS = (  # first match wins; names as CUDA kernels and torch ops appear in the profiler
    ("nccl", ("nccl",)),
    ("memcpy/memset", ("memcpy", "memset")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "wgrad", "dgrad", "fprop", "xmma", "sm90_")),
    ("matmul", ("gemm", "cutlass", "cublas")),
    ("optimizer (foreach)", ("multi_tensor", "foreach", "adam")),
    ("batchnorm", ("batch_norm", "bn_", "batchnorm")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "silu", "sigmoid", "copy", "fill", "cat", "index")),
)


def _kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def _device_time_us(event: Any, *, total: bool) -> float:
    """An averaged event's device (CUDA) time, under torch's newer or older attribute names."""
    names = ("device_time_total", "cuda_time_total") if total else ("self_device_time_total", "self_cuda_time_total")
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _kernel_events(averages: Any) -> list[Any]:
    """The GPU's own events among a profile's averages: kernels, copies and sets.

    The averages also hold every aten op with the device time of the kernels it launched (counting those kernels
    again) and, on the device, the span of each `record_function` window (train_step_N: a whole step). Summing
    all of them read 248% of the wall on the H200 (2026-11-29).
    """
    from torch.autograd import DeviceType

    return [
        event
        for event in averages
        if getattr(event, "device_type", None) == DeviceType.CUDA
        and not event.key.startswith(STEP_ANNOTATION)
        and _device_time_us(event, total=False) > 0
    ]


def profile(
    out: Path,
    *,
    device_type: str,
    model: str,
    imgsz: int,
    micro_batch: int,
    precision: str,
    zero: int,
    warmup: int,
    steps: int,
) -> int:
    import itertools

    import torch
    from torch.profiler import ProfilerActivity, record_function

    from yolods import dist
    from yolods.bench import inputs
    from yolods.bench.engines import build_bench_engine
    from yolods.bench.measure import run_steps, synchronizer
    from yolods.bench.sweep import BenchConfig, model_yaml

    dist.init_distributed(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(0)
    cfg = BenchConfig(
        engine="deepspeed",
        model=model_yaml(model),
        imgsz=imgsz,
        micro_batch=micro_batch,
        global_batch=micro_batch,
        precision=precision,
        zero_stage=zero,
        input="synthetic",
        steps=steps,
        warmup_steps=warmup,
        device=device_type,
    )
    bench = build_bench_engine(cfg, data_yaml=None, synthetic_images=(warmup + steps) * micro_batch)
    num_classes, _ = inputs.shapes_num_classes()
    batches = inputs.repeat_batch(
        inputs.synthetic_batch(
            micro_batch=micro_batch, imgsz=imgsz, num_classes=num_classes, device=bench.device, seed=0
        )
    )
    iterations = itertools.count()
    sync = synchronizer(bench.device)
    run_steps(bench.step, batches, iterations, warmup)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for index in range(steps):
            with record_function(f"{STEP_ANNOTATION}{index}"):
                bench.step(next(batches), iteration=next(iterations), epoch=0, last_in_epoch=False)
        sync()
        wall_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device_type == "cuda" else None
    bench.close()
    averages = prof.key_averages()
    lines = [
        f"# torch.profiler window: {cfg.label}, {steps} steps after {warmup} untimed",
        "",
        f"wall per step (profiler on, which slows the CPU side): {wall_s / steps * 1e3:.1f} ms, "
        f"{micro_batch * steps / wall_s:.0f} img/s"
        + (f"; peak allocated {peak / GIB:.2f} GiB" if peak is not None else ""),
    ]
    sort_by = "self_cpu_time_total"
    if device_type == "cuda":
        kernels = _kernel_events(averages)
        busy_us = sum(_device_time_us(event, total=False) for event in kernels)
        by_kind: dict[str, float] = {}
        for event in kernels:
            by_kind[_kind(event.key)] = by_kind.get(_kind(event.key), 0.0) + _device_time_us(event, total=False)
        lines.append(
            f"GPU kernel time per step: {busy_us / steps / 1e3:.1f} ms = {busy_us / 1e6 / wall_s:.0%} of the wall "
            "(the rest: the GPU waits on the CPU: launches, Python, synchronisation)"
        )
        lines += ["", "| kernel kind | ms per step | share |", "|---|---|---|"]
        for kind, total_us in sorted(by_kind.items(), key=lambda item: -item[1]):
            lines.append(f"| {kind} | {total_us / steps / 1e3:.2f} | {total_us / busy_us:.0%} |")
        sort_by = "self_cuda_time_total"
    try:
        table = averages.table(sort_by=sort_by, row_limit=30, max_name_column_width=70)
    except (AttributeError, KeyError, ValueError):
        table = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    lines += ["", f"Top ops by {sort_by}:", "", "```", table, "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    _say(lines[2])
    if device_type == "cuda":
        _say(lines[3])
    dist.shutdown()
    return 0


# ----------------------------------------------------------------------------------------------------------------
# summary: the timeline and the headline tables, from results.jsonl


def _read_results(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(text) for text in path.read_text().splitlines() if text.strip()]


def _rate(imgs_per_s: float) -> str:
    return f"{imgs_per_s:.0f}" if imgs_per_s >= 100 else f"{imgs_per_s:.3g}"


def _engine(line: dict[str, Any]) -> str:
    return {"deepspeed": f"yolods ZeRO-{line['zero_stage']}", "ddp": "torch DDP", "ultralytics": "Ultralytics"}[
        line["engine"]
    ]


def _throughput_rows(lines: list[dict[str, Any]]) -> list[str]:
    runs = [line for line in lines if (line.get("config") or {}).get("channels_last") is None]
    rows = []
    sizes = "nsmlx"  # yolov8n first, then larger

    def model_order(key: tuple) -> tuple:
        stem = key[0].removesuffix(".yaml")
        return (sizes.index(stem[-1]) if stem[-1] in sizes else len(sizes), *key)

    keys = sorted(
        {(line["model"], line["imgsz"], line["micro_batch"], line["precision"]) for line in runs}, key=model_order
    )
    for model, imgsz, micro, precision in keys:
        group = [
            line
            for line in runs
            if (line["model"], line["imgsz"], line["micro_batch"], line["precision"])
            == (model, imgsz, micro, precision)
        ]
        ultra = next((line for line in group if line["engine"] == "ultralytics"), None)
        for line in sorted(group, key=lambda line: (line["input"] != "synthetic", line["engine"] != "ddp")):
            breakdown = line.get("breakdown_s")
            phases = " / ".join(f"{breakdown[phase] * 1e3:.0f}" for phase in PHASES) if breakdown else "-"
            ratio = "-"
            if ultra and line["input"] == "real" and line is not ultra:
                ratio = f"{line['imgs_per_s'] / ultra['imgs_per_s']:.2f}x"
            cells = [
                f"{model.removesuffix('.yaml')} @{imgsz}",
                str(micro),
                precision,
                line["input"],
                _engine(line),
                _rate(line["imgs_per_s"]),
                f"{line['step_time_s']['median'] * 1e3:.0f}",
                phases,
                f"{line['peak_mem_bytes'] / GIB:.1f}",
                ratio,
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def _memory_rows(lines: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    swept = [line for line in lines if (line.get("config") or {}).get("channels_last") is not None]
    columns = sorted(
        {(line["precision"], line["config"]["channels_last"]) for line in swept},
        key=lambda column: (("fp32", "bf16", "fp16").index(column[0]), not column[1]),
    )
    header = ["ZeRO"] + [f"{precision} {'NHWC' if layout else 'NCHW'}" for precision, layout in columns]
    rows = []
    for stage in sorted({line["zero_stage"] for line in swept if line["zero_stage"] is not None}):
        cells = []
        for precision, layout in columns:
            line = next(
                (
                    line
                    for line in swept
                    if line["zero_stage"] == stage
                    and line["precision"] == precision
                    and line["config"]["channels_last"] == layout
                ),
                None,
            )
            cells.append(f"{line['peak_mem_bytes'] / GIB:.2f} ({_rate(line['imgs_per_s'])})" if line else "-")
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    return header, rows


def summary(out_dir: Path, *, timeline: Path, mode: str, goal_model: str, goal_imgsz: int, goal_batch: int) -> int:
    lines = _read_results(out_dir)
    text = [f"# yolods GPU evidence ({mode})", ""]
    if timeline.is_file():
        text += [
            "## Timeline",
            "",
            "| stage | start s | took s | limit s | status | note |",
            "|---|---|---|---|---|---|",
        ]
        text += [f"| {' | '.join(row.split(chr(9)))} |" for row in timeline.read_text().splitlines() if row.strip()]
        text.append("")
    env_path = out_dir / "env.json"
    if env_path.is_file():
        record = json.loads(env_path.read_text())
        text += [
            "## Environment",
            "",
            f"{record.get('gpu', 'CPU')}; python {record['python']}, torch {record['torch']} (CUDA "
            f"{record['torch_cuda']}), deepspeed {record['deepspeed']}, ultralytics {record['ultralytics']}; process "
            f"group of one on {record['process_group']['backend']}"
            + (f"; bf16 matmul {record['bf16_matmul_tflops']:.0f} TFLOP/s" if "bf16_matmul_tflops" in record else ""),
            "",
        ]
    throughput = _throughput_rows(lines)
    if throughput:
        text += [
            "## Training throughput, one device (img/s; step ms median; phases: data wait / forward / backward / "
            "optimizer ms; peak GiB; vs Ultralytics: same model, batch and data through each trainer's loader)",
            "",
            "| model | batch | precision | input | trainer | img/s | step ms | data / fwd / bwd / opt ms | peak GiB "
            "| vs Ultralytics |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *throughput,
            "",
        ]
    header, memory = _memory_rows(lines)
    if memory:
        swept = next(line for line in lines if (line.get("config") or {}).get("channels_last") is not None)
        text += [
            f"## Peak memory, GiB (img/s), {swept['model'].removesuffix('.yaml')} @{swept['imgsz']}, "
            f"{swept['micro_batch']} img, {swept['input']} input",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *memory,
            "",
        ]
    goal = [
        line
        for line in lines
        if line["model"] == goal_model
        and line["imgsz"] == goal_imgsz
        and line["micro_batch"] == goal_batch
        and line["input"] == "synthetic"
        and line["precision"] == "bf16"
        and line["engine"] in ("deepspeed", "ddp")
        and line.get("zero_stage") in (None, 0)
        and (line.get("config") or {}).get("channels_last") is not False
    ]
    if goal:
        rate = statistics.median(line["imgs_per_s"] for line in goal)
        text += [
            "## Projection calibration",
            "",
            f"{goal_model.removesuffix('.yaml')} @{goal_imgsz}, {goal_batch} img/GPU, bf16, synthetic: "
            f"**{rate:.0f} img/s per GPU** measured (the report's assumed figure was 600). report.md above already "
            "uses this line; for other results: "
            f"`python -m yolods.bench.report DIR --gpu-imgs-per-s {rate:.0f}`",
            "",
        ]
    log = out_dir / "log.txt"
    log_lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    failed = [
        line.strip() for line in log_lines if "FAILED, skipped" in line or line.startswith("yolods.bench: skipped")
    ]
    if failed:
        text += ["## Configurations that failed", "", *(f"- {line}" for line in failed), ""]
    (out_dir / "summary.md").write_text("\n".join(text))
    print("\n".join(text), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu/stages.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("env")
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p = commands.add_parser("data")
    p.add_argument("root", type=Path)
    p.add_argument("--num-train", type=int, required=True)
    p.add_argument("--num-val", type=int, default=8)
    p.add_argument("--imgsz", type=int, required=True)
    p.add_argument("--shards", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--seed", type=int, default=0)
    commands.add_parser("plan", help="the bench's own flags follow")
    p = commands.add_parser("profile")
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=("cpu", "cuda"), required=True)
    p.add_argument("--model", default="s")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p = commands.add_parser("summary")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--timeline", type=Path, required=True)
    p.add_argument("--mode", default="GPU")
    p.add_argument("--goal-model", default="yolov8s.yaml")
    p.add_argument("--goal-imgsz", type=int, default=640)
    p.add_argument("--goal-batch", type=int, default=16)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        return plan(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "env":
        return env(args.out, device_type=args.device)
    if args.command == "data":
        return data(
            args.root,
            num_train=args.num_train,
            num_val=args.num_val,
            imgsz=args.imgsz,
            shards=args.shards,
            seed=args.seed,
        )
    if args.command == "profile":
        return profile(
            args.out,
            device_type=args.device,
            model=args.model,
            imgsz=args.imgsz,
            micro_batch=args.micro_batch,
            precision=args.precision,
            zero=args.zero,
            warmup=args.warmup_steps,
            steps=args.steps,
        )
    return summary(
        args.out_dir,
        timeline=args.timeline,
        mode=args.mode,
        goal_model=args.goal_model,
        goal_imgsz=args.goal_imgsz,
        goal_batch=args.goal_batch,
    )


if __name__ == "__main__":
    sys.exit(main())
