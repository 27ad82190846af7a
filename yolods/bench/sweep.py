"""The bench command line, and its expansion into one BenchConfig per configuration to measure.

A sweep flag takes a comma list, may be repeated, or both: `--zero 0,1 --zero 3` measures stages 0, 1 and 3.
Baselines ride along: every (model, image size, batch, precision, input) measured under DeepSpeed is also
measured under torch DDP and, at world size 1, under the Ultralytics trainer.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from yolods.config import PRECISIONS, ConfigError, check_imgsz, load_deepspeed_json, precision_of

ENGINES = ("deepspeed", "ddp", "ultralytics")
INPUTS = ("synthetic", "real")
# A CPU step at 640 px takes seconds; the CPU defaults keep a default sweep to minutes.
FIT_AXES = ("micro-batch", "imgsz")
SWEEP_STEPS = (20, 5)  # timed and burn-in steps per configuration, unless --steps / --warmup-steps say otherwise
DEVICE_DEFAULTS = {"cpu": {"imgsz": 160, "micro_batch": 8}, "cuda": {"imgsz": 640, "micro_batch": 16}}


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure; every field lands in its results line.

    Bucket sizes and overlap_comm are None where the DeepSpeed config's value applies (and for the baselines);
    channels_last is None where each trainer's default applies: standard-layout images for yolods (NHWC images with
    True, at ZeRO-0 only: yolods.model.check_memory_format), NHWC weights on CUDA for Ultralytics.
    """

    engine: str
    model: str
    imgsz: int
    micro_batch: int
    global_batch: int
    precision: str
    zero_stage: int | None
    input: str
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None
    overlap_comm: bool | None = None
    channels_last: bool | None = None
    activation_checkpointing: bool = False  # yolods.train's --activation_checkpointing (DeepSpeed and DDP alike)
    communication_dtype: str | None = None  # yolods.train's --communication_dtype (None: the gradients' own dtype)
    deepspeed_config: str | None = None
    data: str = "synthetic"
    steps: int = 20
    warmup_steps: int = 5
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    optimizer: str = "AdamW"
    lr0: float = 0.001
    ema: bool = True
    comms_logger: bool = False
    wall_clock_breakdown: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        """Short human name: 'ZeRO-2 fp32 yolov8n@160 mb8 synthetic'."""
        engine = {"deepspeed": f"ZeRO-{self.zero_stage}", "ddp": "DDP", "ultralytics": "Ultralytics"}[self.engine]
        extras = []
        if self.reduce_bucket_size is not None:
            extras.append(f"reduce-bucket {count_label(self.reduce_bucket_size)}")
        if self.allgather_bucket_size is not None:
            extras.append(f"gather-bucket {count_label(self.allgather_bucket_size)}")
        if self.overlap_comm is not None:
            extras.append("overlap" if self.overlap_comm else "no-overlap")
        if self.channels_last is not None:
            extras.append("NHWC" if self.channels_last else "NCHW")
        if self.activation_checkpointing:
            extras.append("act-ckpt")
        if self.communication_dtype is not None:
            extras.append(f"comm-{self.communication_dtype}")
        if self.deepspeed_config:
            extras.append(f"[{Path(self.deepspeed_config).stem}]")  # offload, say, which the stage alone hides
        model = self.model.removesuffix(".yaml")
        return " ".join([engine, self.precision, f"{model}@{self.imgsz}", f"mb{self.micro_batch}", self.input, *extras])


def count_label(count: int) -> str:
    """2000000 -> '2M', 500000 -> '500K'."""
    for suffix, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale and count % (scale // 10) == 0:
            return f"{count / scale:g}{suffix}"
    return str(count)


def _flag(parser: Any, name: str, **kwargs: Any) -> None:
    """A flag under both spellings: --warmup-steps (the issue's) and --warmup_steps (yolods.train's)."""
    stem = name.removeprefix("--")
    spellings = dict.fromkeys([name, "--" + stem.replace("_", "-"), "--" + stem.replace("-", "_")])
    parser.add_argument(*spellings, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m yolods.bench",
        description="Measure yolods training throughput and memory against torch DDP and the Ultralytics trainer.",
        epilog="Sweep flags (marked LIST) take comma lists and may be repeated; every combination is measured.",
    )
    sweep = {"action": "append", "default": None}
    _flag(parser, "--model", **sweep, help="LIST: Ultralytics yamls or sizes: yolov8n.yaml,yolov8s or n,s,m,l,x")
    _flag(parser, "--imgsz", **sweep, help="LIST: image sizes (default 640 on CUDA, 160 on CPU)")
    _flag(parser, "--batch", **sweep, help="LIST: GLOBAL batch, split over the ranks as in yolods.train")
    _flag(parser, "--micro-batch", **sweep, help="LIST: images per rank (default 16 on CUDA, 8 on CPU)")
    _flag(parser, "--zero", **sweep, help="LIST: ZeRO stages (default 0,1,2,3)")
    _flag(parser, "--precision", **sweep, help="LIST: fp32, bf16, fp16 (default bf16 on CUDA, fp32 on CPU)")
    _flag(parser, "--reduce-bucket-size", **sweep, help="LIST: ZeRO reduce_bucket_size in elements (2e6, 5M)")
    _flag(parser, "--allgather-bucket-size", **sweep, help="LIST: ZeRO 1-2 allgather bucket (ZeRO-3: prefetch)")
    _flag(parser, "--overlap-comm", **sweep, help="LIST: on,off")
    _flag(
        parser,
        "--channels-last",
        **sweep,
        help="LIST: on,off: NHWC images on CUDA at ZeRO-0 (default off, as yolods.train; CPU always trains NCHW)",
    )
    _flag(
        parser,
        "--activation-checkpointing",
        **sweep,
        help="LIST: off,on: yolods.train's --activation_checkpointing, for DeepSpeed and DDP (default off)",
    )
    _flag(
        parser,
        "--communication-dtype",
        **sweep,
        help="LIST: fp32,bf16,fp16: dtype of DeepSpeed's gradient reduction (default: the gradients' own)",
    )
    _flag(parser, "--input", **sweep, help="LIST: synthetic (tensors on the device) and/or real (dataloader)")
    _flag(parser, "--engine", **sweep, help="LIST: deepspeed,ddp,ultralytics (default all three)")
    _flag(parser, "--deepspeed_config", **sweep, help="LIST: DeepSpeed JSONs (stage/precision from them)")
    _flag(
        parser, "--steps", type=int, help=f"timed steps per configuration (default {SWEEP_STEPS[0]}; --tune 6, --fit 2)"
    )
    _flag(
        parser,
        "--warmup-steps",
        type=int,
        help=f"burn-in steps, not timed (default {SWEEP_STEPS[1]}; --tune 2, --fit 1)",
    )
    _flag(
        parser,
        "--repeat",
        type=int,
        default=1,
        help="measure the whole sweep this many times, interleaved; every other repeat in reverse order",
    )
    _flag(
        parser,
        "--reverse",
        action="store_true",
        help="start in reverse order (the Ultralytics baseline stays last): alternate it between invocations of one "
        "--run-id, so no configuration always runs first in its process",
    )
    _flag(
        parser,
        "--run-id",
        help="group several invocations as one run: the report takes the median over a run's repeats (default: now)",
    )
    _flag(
        parser,
        "--out",
        help="results directory (default benchmarks/results/local, where results.jsonl is appended; runs/tune with "
        "--tune, runs/fit with --fit)",
    )
    _flag(parser, "--data", default="synthetic", help="data.yaml for --input real (default: drawn shapes)")
    _flag(parser, "--workers", type=int, help="dataloader workers per rank (default 2 on CUDA, 0 on CPU)")
    _flag(parser, "--optimizer", default="AdamW", help="Ultralytics optimizer name; the ZeRO paper assumes Adam")
    _flag(parser, "--lr0", type=float, default=0.001)
    _flag(parser, "--seed", type=int, default=0)
    _flag(parser, "--device", choices=("cpu", "cuda"), help="default: cuda when present")
    _flag(parser, "--ema", action=argparse.BooleanOptionalAction, default=True, help="update the EMA each step")
    _flag(parser, "--comms-logger", action="store_true", help="extra steps with DeepSpeed's comms logger")
    _flag(parser, "--wall-clock-breakdown", action="store_true", help="also record DeepSpeed's own timers")
    _flag(
        parser,
        "--keep-going",
        action="store_true",
        help="one rank only: report a configuration that fails (out of memory, say) and measure the next",
    )
    _flag(parser, "--interconnect", default="", help="free text for the results, e.g. '8x NDR 400 Gb/s IB'")
    _flag(
        parser,
        "--require-clean",
        action="store_true",
        help="refuse to measure when yolods/ has uncommitted changes (for results you mean to commit)",
    )
    add_mode_flags(parser)
    _flag(parser, "--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return parser


def add_mode_flags(parser: argparse.ArgumentParser) -> None:
    """The two modes besides the sweep: --tune (yolods/bench/tune.py) and --fit (yolods/bench/fit.py)."""
    modes = parser.add_argument_group("modes: --tune and --fit instead of the sweep")
    modes.add_argument(
        "--tune",
        action="store_true",
        help="search ZeRO stage, bucket sizes, micro batch and precision on this machine; write the fastest config",
    )
    modes.add_argument(
        "--fit",
        choices=FIT_AXES,
        help="find the largest micro batch or imgsz per rank that fits --memory-budget-gib, one fresh job per point",
    )
    _flag(modes, "--budget-min", type=float, default=5.0, help="--tune: minutes to spend (default 5)")
    _flag(
        modes,
        "--memory-budget-gib",
        type=float,
        help="memory per rank: --fit's limit (required on CPU; default on CUDA: the GPU's memory) and --tune's "
        "ceiling for larger micro batches",
    )
    _flag(modes, "--nproc", type=int, default=1, help="--fit: ranks of each probe job on this node (default 1)")
    _flag(modes, "--fit-max", type=int, help="--fit: largest value to try (default 512 images, or imgsz 2048)")


def split_list(values: list[str] | None) -> list[str]:
    """['0,1', '3'] -> ['0', '1', '3']; None -> []."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def parse_count(text: str) -> int:
    """'2e6', '2000000', '5M', '512K' -> elements."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    suffix = text[-1:].upper()
    try:
        count = int(float(text[:-1]) * scale[suffix]) if suffix in scale else int(float(text))
    except ValueError:
        raise ConfigError(f"{text!r} is not a count: write 2e6, 2000000 or 2M") from None
    if count < 1:
        raise ConfigError(f"{text!r}: a bucket holds at least 1 element: write 2e6, 2000000 or 2M")
    return count


def parse_switch(text: str, flag: str = "--overlap-comm") -> bool:
    lowered = text.lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{flag} {text!r}: use on or off")


def model_yaml(name: str) -> str:
    """'s' -> 'yolov8s.yaml', 'yolo11m' -> 'yolo11m.yaml'; yamls and .pt paths pass through."""
    if name in ("n", "s", "m", "l", "x"):
        return f"yolov8{name}.yaml"
    if name.endswith((".yaml", ".yml", ".pt")):
        return name
    return f"{name}.yaml"


_INT_EXAMPLES = {"--zero": "0,1,2,3", "--imgsz": "160,320"}  # else a batch's


def _ints(values: list[str] | None, flag: str) -> list[int]:
    try:
        return [int(value) for value in split_list(values)]
    except ValueError:
        raise ConfigError(f"{flag} takes integers, e.g. {flag} {_INT_EXAMPLES.get(flag, '8,16')}") from None


def _choices(values: list[str], allowed: tuple[str, ...], flag: str) -> list[str]:
    for value in values:
        if value not in allowed:
            raise ConfigError(f"{flag} {value!r} is unknown: use {', '.join(allowed)}")
    return values


def _precisions(args: argparse.Namespace, *, device: str, ds_configs: list[str | None]) -> tuple[list[str], dict]:
    """Precisions to sweep, and each DeepSpeed JSON's own (a JSON naming one sets it for its runs and baselines)."""
    json_precisions = {path: precision_of(load_deepspeed_json(path)) for path in ds_configs if path}
    device_precision = "bf16" if device == "cuda" else "fp32"
    precisions = _choices(split_list(args.precision), PRECISIONS, "--precision") or list(
        dict.fromkeys(json_precisions.get(path) or device_precision for path in ds_configs)
    )
    for path, json_precision in json_precisions.items():
        if json_precision and json_precision not in precisions:
            raise ConfigError(f"--precision {','.join(precisions)} disagrees with {path} ({json_precision}): drop one")
    return precisions, json_precisions


def _batch_pairs(args: argparse.Namespace, *, world_size: int, default_micro_batch: int) -> list[tuple[int, int]]:
    """(images per rank, global batch) pairs from --batch (global) or --micro-batch (per rank)."""
    global_batches = _ints(args.batch, "--batch")
    micro_batches = _ints(args.micro_batch, "--micro-batch")
    if global_batches and micro_batches:
        raise ConfigError("--batch (global) and --micro-batch (per rank) both given: keep one")
    for batch in global_batches:
        if batch < world_size or batch % world_size:
            raise ConfigError(f"--batch {batch} does not split over {world_size} ranks: use a multiple of {world_size}")
    for micro in micro_batches:
        if micro < 1:
            raise ConfigError(f"--micro-batch {micro}: images per rank must be at least 1")
    pairs = [(batch // world_size, batch) for batch in global_batches]
    pairs += [(micro, micro * world_size) for micro in micro_batches]
    return pairs or [(default_micro_batch, default_micro_batch * world_size)]


def _stages(args: argparse.Namespace, *, ds_configs: list[str | None]) -> list[int | None]:
    """ZeRO stages to sweep; None where the DeepSpeed JSON decides."""
    stages: list[int | None] = list(_ints(args.zero, "--zero"))
    for stage in stages:
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero {stage} is not a ZeRO stage: use 0, 1, 2 or 3")
    if stages:
        return stages
    return [None] if ds_configs != [None] else [0, 1, 2, 3]


def expand(args: argparse.Namespace, *, world_size: int) -> list[BenchConfig]:
    """Every configuration the command line asks for, baselines included, in run order.

    Configurations sharing a (model, imgsz, batch, precision, input) run back to back, DDP first, so machine load
    drifts as little as possible between a figure and its baseline. Ultralytics runs last and only on one rank:
    its own multi-GPU mode spawns its own processes, which a launcher-started bench cannot host.
    """
    steps = SWEEP_STEPS[0] if args.steps is None else args.steps
    warmup_steps = SWEEP_STEPS[1] if args.warmup_steps is None else args.warmup_steps
    if steps < 1 or warmup_steps < 0:
        raise ConfigError("--steps must be >= 1 and --warmup-steps >= 0")
    if args.repeat < 1:
        raise ConfigError(f"--repeat {args.repeat}: measure the sweep at least once (--repeat 1)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = DEVICE_DEFAULTS[device]
    engines = _choices(split_list(args.engine) or list(ENGINES), ENGINES, "--engine")
    inputs = _choices(split_list(args.input) or ["synthetic"], INPUTS, "--input")
    # a value listed twice (n and yolov8n.yaml are one model) would be measured twice and read as repeats
    models = list(dict.fromkeys(model_yaml(name) for name in split_list(args.model) or ["yolov8n.yaml"]))
    sizes = list(dict.fromkeys(_ints(args.imgsz, "--imgsz"))) or [defaults["imgsz"]]
    for size in sizes:  # as yolods.train: Ultralytics' model fails mid-forward on other sizes
        check_imgsz(size)
    ds_configs: list[str | None] = list(split_list(args.deepspeed_config)) or [None]
    stages = _stages(args, ds_configs=ds_configs)
    precisions, json_precisions = _precisions(args, device=device, ds_configs=ds_configs)
    layouts: list[bool | None] = [parse_switch(v, "--channels-last") for v in split_list(args.channels_last)] or [None]
    checkpointing = [parse_switch(v, "--activation-checkpointing") for v in split_list(args.activation_checkpointing)]
    comm_dtypes: list[str | None] = list(
        _choices(split_list(args.communication_dtype), PRECISIONS, "--communication-dtype")
    ) or [None]
    batch_pairs = _batch_pairs(args, world_size=world_size, default_micro_batch=defaults["micro_batch"])
    zero_variants = list(
        itertools.product(
            ds_configs,
            stages,
            [parse_count(v) for v in split_list(args.reduce_bucket_size)] or [None],
            [parse_count(v) for v in split_list(args.allgather_bucket_size)] or [None],
            [parse_switch(v) for v in split_list(args.overlap_comm)] or [None],
            comm_dtypes,
        )
    )
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: dataloader workers per rank are 0 or more")
    common = {
        "steps": steps,
        "warmup_steps": warmup_steps,
        "data": args.data,
        "workers": args.workers if args.workers is not None else (2 if device == "cuda" else 0),
        "seed": args.seed,
        "device": device,
        "optimizer": args.optimizer,
        "lr0": args.lr0,
        "ema": args.ema,
    }

    configs: list[BenchConfig] = []
    ultralytics_configs: list[BenchConfig] = []
    # The memory format is outside the precision: a sweep cut short has every precision in the first layout.
    for model, imgsz, (micro, global_batch), channels_last, recompute, precision, input_mode in itertools.product(
        models, sizes, batch_pairs, layouts, checkpointing or [False], precisions, inputs
    ):
        base = BenchConfig(
            engine="ddp",
            model=model,
            imgsz=imgsz,
            micro_batch=micro,
            global_batch=global_batch,
            precision=precision,
            zero_stage=None,
            input=input_mode,
            channels_last=channels_last,
            activation_checkpointing=recompute,
            **common,
        )
        if "ddp" in engines:
            configs.append(base)
        if "deepspeed" in engines:
            for ds_config, stage, reduce_bucket, gather_bucket, overlap, comm_dtype in zero_variants:
                if json_precisions.get(ds_config) not in (None, precision):
                    continue  # that JSON runs at its own precision, measured in its own iteration
                configs.append(
                    replace(
                        base,
                        engine="deepspeed",
                        zero_stage=stage,
                        deepspeed_config=ds_config,
                        reduce_bucket_size=reduce_bucket,
                        allgather_bucket_size=gather_bucket,
                        overlap_comm=overlap,
                        communication_dtype=comm_dtype,
                        comms_logger=args.comms_logger,
                        wall_clock_breakdown=args.wall_clock_breakdown,
                    )
                )
        # The Ultralytics trainer always reads through its own dataloader: input 'real', once per real/synthetic pair.
        # On CPU it trains in fp32 only (its bf16 autocast requires CUDA, its AMP check turns fp16 off).
        if "ultralytics" in engines and world_size == 1 and (device == "cuda" or precision == "fp32"):
            # Ultralytics' trainer has no activation checkpointing: its one baseline stands for both settings
            candidate = replace(base, engine="ultralytics", input="real", activation_checkpointing=False)
            if candidate not in ultralytics_configs:
                ultralytics_configs.append(candidate)
    return configs + ultralytics_configs
