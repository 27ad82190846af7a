"""`python -m yolods.bench`: parse -> expand the sweep -> probe the links -> measure each configuration -> append.

python -m yolods.bench --zero 0,1,2,3 --steps 30                        # 1 rank; baselines included
torchrun --nproc_per_node 2 -m yolods.bench --zero 0,1,2,3              # appends the 2-rank lines
deepspeed --num_gpus 8 --module yolods.bench --model s --imgsz 640 --zero 2 --input synthetic,real
deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 --module yolods.bench ...   # see benchmarks/README.md
python -m yolods.bench.report benchmarks/results/local                  # report.md and PNG plots
python -m yolods.bench --tune --model s --imgsz 640 --budget-min 5      # the fastest DeepSpeed config here (tune.py)
python -m yolods.bench --fit micro-batch --memory-budget-gib 8 --nproc 2 --activation-checkpointing off,on  # fit.py
"""

from __future__ import annotations

import datetime
import logging
import subprocess
import sys
from pathlib import Path

import torch

from yolods import dist
from yolods.bench import inputs, provenance
from yolods.bench.comm_model import Link
from yolods.bench.engines import bench_plan
from yolods.bench.measure import probe_link
from yolods.bench.memory import release_memory
from yolods.bench.results import append_line, make_line, run_context
from yolods.bench.runner import dataset_images, measure_training, measure_ultralytics
from yolods.bench.sweep import ENGINES, BenchConfig, build_parser, expand, split_list
from yolods.config import SYNTHETIC, ConfigError
from yolods.data import load_data_yaml


def _say(message: str) -> None:
    if dist.is_main_process():
        print(f"yolods.bench: {message}", flush=True)


def _data_yaml(cfg: BenchConfig) -> str | None:
    """The data.yaml real input and the Ultralytics trainer read (every rank calls this: it may barrier)."""
    if cfg.input != "real":
        return None
    if cfg.data != "synthetic":
        return cfg.data
    return inputs.shapes_dataset(num_images=dataset_images(cfg), imgsz=cfg.imgsz, seed=cfg.seed)


def _probe(device: torch.device) -> tuple[dict | None, dict[str, Link] | None]:
    """The link fits of this job (None on one rank), announced on rank 0."""
    probe = probe_link(device)
    if probe is None:
        return None, None
    links = {op: Link(fit["bandwidth_bytes_per_s"], fit["latency_s"]) for op, fit in probe["ops"].items()}
    for op, link in links.items():
        _say(
            f"{probe['backend']} {op} fit over {dist.get_world_size()} ranks: {link.latency_s * 1e6:.0f} us/hop, "
            f"{link.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
        )
    return probe, links


def sweep_schedule(
    configs: list[BenchConfig], repeats: int, *, reverse_first: bool = False
) -> list[tuple[int, BenchConfig]]:
    """(repeat, configuration) in the order measured: every other repeat runs this process's configurations in
    reverse, odd ones or, with `reverse_first` (`--reverse`), even ones (the Ultralytics baseline, a child process,
    stays last).

    Every configuration runs in the same process as the ones before it, and not all of them leave it as they
    found it: a closed ZeRO-3 engine and its model outlive gc.collect() (DeepSpeed 0.19.8 keeps the model on its
    module-level FWD_MODULE_STACK, and more holds it than that), so whatever ran after ZeRO-3 ran beside ~100k
    leaked objects and their memory. In one fixed order DDP always ran first and ZeRO-3 last; reversing every
    other repeat gives each configuration early and late runs, which the report's repeat-by-repeat ratios pair.
    """
    in_process = [cfg for cfg in configs if cfg.engine != "ultralytics"]
    children = [cfg for cfg in configs if cfg.engine == "ultralytics"]
    orders = (in_process + children, in_process[::-1] + children)
    return [(repeat, cfg) for repeat in range(repeats) for cfg in orders[(repeat + reverse_first) % 2]]


def _run_sweep(
    configs: list[BenchConfig],
    *,
    repeats: int,
    device: torch.device,
    links: dict[str, Link] | None,
    context: dict,
    out_dir: Path,
    keep_going: bool = False,
    reverse_first: bool = False,
) -> int:
    """Measure every configuration `repeats` times, round the whole sweep, appending a line after each.

    With `keep_going` (one rank only: with more, the other ranks would wait in a collective), a configuration
    that raises is reported in one line and skipped. Returns how many were skipped so.
    """
    schedule = sweep_schedule(configs, repeats, reverse_first=reverse_first)
    total = len(schedule)
    failed = 0
    for index, (repeat, cfg) in enumerate(schedule, start=1):
        data_yaml = _data_yaml(cfg)
        try:
            if cfg.engine == "ultralytics":  # one rank only, in a child process
                measured = measure_ultralytics(cfg, data_yaml=data_yaml)
            else:
                measured = measure_training(cfg, device=device, data_yaml=data_yaml, links=links)
        except Exception as error:
            if not keep_going:
                raise
            message = " ".join(str(error).split())[:300]
            if isinstance(error, subprocess.TimeoutExpired):
                message = f"the Ultralytics child ran past {error.timeout:.0f} s"
            _say(f"[{index}/{total}] {cfg.label}: FAILED, skipped (--keep-going): {type(error).__name__}: {message}")
            failed += 1
            measured = None
        if measured is None:  # ranks other than 0, or a configuration skipped above
            release_memory()  # what a failed configuration left (a CUDA out-of-memory, say)
            continue
        append_line(out_dir, make_line({**measured, "repeat": repeat}, context=context))
        _say(
            # the measured label: a DeepSpeed JSON's stage is known only once it is resolved
            f"[{index}/{total}] {measured.get('label', cfg.label)}: {measured['imgs_per_s']:.1f} img/s "
            f"({measured['imgs_per_s_per_rank']:.1f}/rank), median step "
            f"{measured['step_time_s']['median'] * 1e3:.0f} ms, peak {measured['peak_mem_bytes'] / 2**20:.0f} MiB"
        )
    return failed


def _run_mode(args) -> int:
    """--tune (yolods/bench/tune.py) or --fit (yolods/bench/fit.py); a user mistake is one line and exit 2."""
    from yolods.bench.fit import run_fit
    from yolods.bench.tune import run_tune

    try:
        if args.tune and args.fit:
            raise ConfigError("--tune and --fit are two modes: pass one")
        for flag, value in (("--memory-budget-gib", args.memory_budget_gib), ("--budget-min", args.budget_min)):
            if value is not None and not value > 0:  # a budget of 0 would skip every candidate, or fit nothing
                raise ConfigError(f"{flag} {value:g} must be above 0")
        return run_tune(args) if args.tune else run_fit(args)
    except ConfigError as error:
        if dist.is_main_process():
            print(f"yolods.bench: error: {error}", file=sys.stderr)
        return 2


def _check_before_measuring(configs: list[BenchConfig], *, world_size: int, out_dir: Path) -> None:
    """What would otherwise fail after the link probe or the first configuration, as one line now.

    Raises:
        ConfigError: nothing to measure, a data.yaml that is not there, no CUDA device, an --out that cannot be
            written, or a configuration yolods.train would reject.
    """
    if not configs:
        if world_size > 1:
            raise ConfigError("nothing to measure: the Ultralytics baseline alone runs only at world size 1")
        raise ConfigError("nothing to measure: Ultralytics trains in fp32 only on a CPU: add --precision fp32")
    for cfg in configs:  # every run resolves as yolods.train would, before any process group or model exists
        if cfg.input == "real" and cfg.data != SYNTHETIC:
            load_data_yaml(cfg.data)
        if cfg.engine != "ultralytics":
            bench_plan(cfg, world_size=world_size)
        if cfg.device == "cpu" and cfg.channels_last:
            raise ConfigError(
                "--channels-last on: on a CPU yolods and Ultralytics both train NCHW, so it would measure the off "
                "run again under another label; drop it"
            )
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: torch sees no CUDA device here; use --device cpu")
    if dist.is_main_process():
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out {out_dir} is a file: name a directory")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--out {out_dir}: cannot write results there ({error.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (or --tune, or --fit); returns the exit code (2 for a user mistake, reported in one line; 1
    when --keep-going skipped a configuration that failed)."""
    args = build_parser().parse_args(argv)
    source = provenance.source_record()
    if args.require_clean and source and source["dirty"]:  # the sweep, --fit and --tune alike
        if dist.is_main_process():
            print(
                f"yolods.bench: error: --require-clean: yolods/ has {source['num_changes']} uncommitted "
                f"change(s) on {source['commit'][:12]} ({', '.join(source['changes'][:3])}); commit them first",
                file=sys.stderr,
            )
        return 2
    if args.tune or args.fit:
        return _run_mode(args)
    world_size = dist.get_world_size()
    out_dir = Path(args.out or "benchmarks/results/local")
    try:
        configs = expand(args, world_size=world_size)
        _check_before_measuring(configs, world_size=world_size, out_dir=out_dir)
    except ConfigError as error:
        if dist.is_main_process():
            print(f"yolods.bench: error: {error}", file=sys.stderr)
        return 2
    if source and source["dirty"]:
        # Lines from a dirty tree measure code no commit holds: they are marked, and the report counts them.
        _say(
            f"WARNING: yolods/ has {source['num_changes']} uncommitted change(s): every line is marked dirty "
            "(commit first, or pass --require-clean, for results you mean to commit)"
        )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # one initialize per configuration is chatty

    dist.init_distributed(configs[0].device)
    device = dist.local_device(configs[0].device)
    probe, links = _probe(device)
    context = run_context(device, label=args.interconnect, link_probe=probe)
    # One id for every line of this invocation (or of several, with --run-id): the report takes each configuration's
    # latest run and the median of its repeats. Repeats go round the whole sweep, so load drifts hit every engine.
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    context["run_id"] = dist.broadcast_object(args.run_id or now)
    repeats = args.repeat
    _say(
        f"{len(configs)} configurations x {repeats} on {world_size} rank(s), {context['num_nodes']} node(s) -> {out_dir}"
    )
    if world_size > 1 and "ultralytics" in (split_list(args.engine) or ENGINES):
        _say(
            "the Ultralytics trainer is measured at 1 rank only (it spawns its own processes for more): run the bench "
            "without a launcher for that baseline"
        )
    keep_going = args.keep_going and world_size == 1
    if args.keep_going and not keep_going:
        _say("--keep-going applies to one rank only: a failure on one of several ranks ends the job")
    try:
        failed = _run_sweep(
            configs,
            repeats=repeats,
            reverse_first=args.reverse,
            device=device,
            links=links,
            context=context,
            out_dir=out_dir,
            keep_going=keep_going,
        )
    except Exception as error:  # as in yolods.train: one line per rank (the traceback in OUT/logs), the job ends
        from yolods import faults

        faults.abort_job(error, run_dir=out_dir)
    _say(f"appended to {out_dir / 'results.jsonl'}; report: python -m yolods.bench.report {out_dir}")
    if failed:
        _say(f"{failed} configuration(s) failed and were skipped")
    dist.shutdown()
    return 1 if failed else 0
