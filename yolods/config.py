"""Command line -> one frozen RunConfig -> one RunPlan: every setting resolved before the process group starts.

`resolve_run` derives everything else from the flags and the DeepSpeed JSON (Ultralytics hyperparameters,
the DeepSpeed config, the batch plan, the profile spec) and checks the model and data files. Every user mistake
found there raises ConfigError with one line that names the culprit and the fix; `yolods.train` prints it and
exits 2 before any process group, run directory or model exists.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from yolods import dist
from yolods.errors import ConfigError
from yolods.flags import FlagParser
from yolods.hyp import is_ultralytics_setting, ultralytics_settings
from yolods.large_batch import rule_parts

SYNTHETIC = "synthetic"
PRECISIONS = ("fp32", "bf16", "fp16")
# Ultralytics rounds other sizes up to a multiple of the largest stride, with only a warning; yolods asks instead.
IMGSZ_MULTIPLE = 32
# Flags a resumed run may change: they observe the run or say where to find it, and change no result.
CHANGEABLE_ON_RESUME = (
    "resume",
    "project",
    "profile",
    "comms_logger",
    "verbose",
    "local_rank",
    "deepspeed",
    "save_period_steps",
    "save_period_min",
)
# A mid-epoch checkpoint every half hour bounds what a lost node costs on long epochs; writing one of a YOLO model
# takes seconds.
SAVE_PERIOD_MIN = 30.0

# Defaults that differ for the embedded synthetic job, so `python -m yolods.train` finishes in minutes on a CPU.
SYNTHETIC_DEFAULTS = {"epochs": 10, "imgsz": 128, "images": 512}  # mAP50 > 0.5 in ~3 min on 2 cores
REAL_DATA_DEFAULTS = {"epochs": 100, "imgsz": 640}  # Ultralytics' defaults

# Numbers for 3-70M parameter detectors; ds_configs/README.md explains each one.
GRADIENT_CLIP_NORM = 10.0  # Ultralytics' clip_grad_norm_ max_norm; DeepSpeed's default of 1.0 slows YOLO training
BUCKET_ELEMENTS = 2_000_000  # 8 MB of fp32 grads: yolov8n splits into 2 buckets, yolo11m into ~10
# DeepSpeed's default bucket: any YOLO (yolov8x has 68M parameters) in one, as ZeRO-0 reduces it
WHOLE_MODEL_BUCKET_ELEMENTS = 500_000_000
STAGE3_PREFETCH_ELEMENTS = 2_000_000
# 0: nothing stays whole. Whole ("persistent") parameters are re-gathered one call each after every step.
STAGE3_PERSISTENCE_THRESHOLD = 0


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved once from the command line.

    `hyp` holds Ultralytics-named hyperparameters overridden by the user (lr0, mosaic, box, ...); everything
    else comes from Ultralytics' default.yaml.
    """

    model: str = "yolov8n.yaml"
    data: str = SYNTHETIC
    epochs: int = SYNTHETIC_DEFAULTS["epochs"]
    imgsz: int = SYNTHETIC_DEFAULTS["imgsz"]
    batch: int = 16
    batch_from_flag: bool = False
    workers: int = 2
    seed: int = 0
    zero: int | None = None
    precision: str | None = None
    deepspeed_config: str | None = None
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    resume: str | None = None
    save_period_steps: int = 0
    save_period_min: float = SAVE_PERIOD_MIN
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    synthetic_images: int = SYNTHETIC_DEFAULTS["images"]
    profile: str | None = None
    comms_logger: bool = False
    verbose: bool = False
    activation_checkpointing: bool = False
    communication_dtype: str | None = None
    step_at_epoch_end: bool = False
    large_batch_rule: str = "yolods"
    sync_bn: bool = False
    paired_data: bool = False
    hyp: dict[str, Any] = field(default_factory=dict)

    @property
    def is_synthetic(self) -> bool:
        return self.data == SYNTHETIC


def _count_or_ratio(text: str) -> int | float:
    """Ultralytics' `fraction`: an image count (16) stays an int, a share of the split (0.5) a float."""
    try:
        number = float(text)
    except ValueError:  # argparse would name this function in its message
        raise argparse.ArgumentTypeError(f"{text!r} is neither an image count (16) nor a share (0.5)") from None
    return int(number) if number.is_integer() and number > 1 else number


HYP_FLAGS = {  # flag -> type; each maps 1:1 to the Ultralytics argument of the same name
    "optimizer": str,
    "lr0": float,
    "lrf": float,
    "momentum": float,
    "weight_decay": float,
    "warmup_epochs": float,
    "warmup_momentum": float,
    "warmup_bias_lr": float,
    "nbs": int,
    "close_mosaic": int,
    "patience": int,
    "fraction": _count_or_ratio,
}


def build_parser() -> argparse.ArgumentParser:
    """The `python -m yolods.train` command line; flag names follow Ultralytics and DeepSpeed, grouped as in README."""
    parser = FlagParser(
        prog="python -m yolods.train",
        description="Train an Ultralytics YOLO detector with DeepSpeed (any launcher: python, deepspeed, torchrun, srun).",
        epilog="README.md has every flag with examples; ds_configs/README.md explains the shipped DeepSpeed configs.",
    )
    job = parser.add_argument_group("model and data")
    job.add_argument(
        "--model",
        default="yolov8n.yaml",
        help="Ultralytics detection yaml (yolov8n.yaml, yolo11s.yaml) or a local .pt to fine-tune",
    )
    job.add_argument(
        "--data", default=SYNTHETIC, help="Ultralytics data.yaml, or 'synthetic' (drawn shapes, made on disk)"
    )
    job.add_argument(
        "--epochs", type=int, help=f"epochs (default 100; {SYNTHETIC_DEFAULTS['epochs']} for synthetic data)"
    )
    job.add_argument(
        "--imgsz",
        type=int,
        help=f"train/val image size (default 640; {SYNTHETIC_DEFAULTS['imgsz']} for synthetic data)",
    )
    job.add_argument(
        "--batch", type=int, help="GLOBAL batch over all ranks per forward, as in Ultralytics (default 16)"
    )
    job.add_argument("--workers", type=int, default=2, help="dataloader workers per rank (default 2)")
    job.add_argument("--seed", type=int, default=0, help="random seed, as Ultralytics' (default 0)")
    job.add_argument(
        "--synthetic_images",
        type=int,
        default=SYNTHETIC_DEFAULTS["images"],
        help=f"train images of the synthetic set (default {SYNTHETIC_DEFAULTS['images']})",
    )

    distributed = parser.add_argument_group("DeepSpeed and devices")
    distributed.add_argument("--zero", type=int, help="ZeRO stage 0-3 (default: the config's, else 0)")
    distributed.add_argument(
        "--precision", help="fp32, bf16 or fp16 (default: the config's, else bf16 on CUDA, fp32 on CPU)"
    )
    distributed.add_argument(
        "--deepspeed_config",
        "--deepscale_config",
        metavar="JSON",
        help="a DeepSpeed config, e.g. ds_configs/zero2_bf16.json",
    )
    distributed.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    # What launchers and DeepSpeed tutorials pass; accepted, never needed.
    distributed.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    distributed.add_argument("--deepspeed", "--deepscale", action="store_true", help=argparse.SUPPRESS)

    run = parser.add_argument_group("run directory")
    run.add_argument("--project", default="runs/train", help="parent directory of run directories")
    run.add_argument("--name", default="exp", help="run directory name; exp, exp2, ... unless --exist_ok")
    run.add_argument("--exist_ok", action="store_true", help="reuse --name if it exists")
    run.add_argument(
        "--resume", nargs="?", const="", help="continue a run: its directory, or the newest under --project"
    )
    run.add_argument(
        "--save_period_steps",
        type=int,
        default=0,
        metavar="N",
        help="also checkpoint mid-epoch every N optimizer steps (default 0: off)",
    )
    run.add_argument(
        "--save_period_min",
        type=float,
        default=SAVE_PERIOD_MIN,
        metavar="MIN",
        help=f"also checkpoint mid-epoch every MIN minutes (default {SAVE_PERIOD_MIN:g}; 0: off)",
    )

    hyperparameters = parser.add_argument_group("Ultralytics hyperparameters (same names and defaults)")
    hyperparameters.add_argument("--cos_lr", action="store_true", help="cosine lr schedule (default linear)")
    hyperparameters.add_argument(
        "--step_at_epoch_end",
        action="store_true",
        help="also step the optimizer at each epoch's last batch (Ultralytics carries accumulation over; default off)",
    )
    for flag, kind in HYP_FLAGS.items():
        hyperparameters.add_argument(f"--{flag}", type=kind, help="as in Ultralytics (default: its default.yaml)")
    hyperparameters.add_argument(
        "--hyp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other Ultralytics train setting, e.g. mosaic=0.5",
    )

    distributed.add_argument(
        "--communication_dtype",
        choices=PRECISIONS,
        help="dtype of the gradient reduction (DeepSpeed's communication_data_type; default: the gradients' own, fp32)",
    )
    distributed.add_argument(
        "--paired_data",
        action="store_true",
        help="train on exactly the augmented images of a 1-rank run with the same seed and global batch (each rank "
        "loads the whole global batch and keeps its share: N x the loading work; for comparing world sizes)",
    )

    large = parser.add_argument_group("large global batch (above nbs)")
    large.add_argument(
        "--large_batch_rule",
        default="yolods",
        help="above nbs images per optimizer step (k = images / nbs): 'yolods' (default) scales Adam-type lr by k, "
        "clipped SGD lr by sqrt(k), weight decay to keep decay per epoch, BatchNorm momentum per image (README: "
        "Large global batch); 'ultralytics' keeps Ultralytics' rule exactly; for ablations, the parts of yolods' "
        "rule to apply: lr, decay, batchnorm joined by '+'",
    )
    large.add_argument(
        "--sync_bn",
        action="store_true",
        help="BatchNorm statistics over all ranks (for small per-rank batches); no-op on 1 rank",
    )

    memory = parser.add_argument_group("memory")
    memory.add_argument(
        "--activation_checkpointing",
        action="store_true",
        help="recompute backbone and neck activations in backward: less memory for a larger imgsz or batch",
    )
    memory.add_argument(
        "--cache",
        choices=("ram", "disk"),
        help="Ultralytics' image cache: ram holds the decoded images once per node (in /dev/shm, shared by its "
        "ranks); disk keeps a .npy beside each image (default: none)",
    )

    watch = parser.add_argument_group("logs and profiling")
    watch.add_argument("--verbose", action="store_true", help="DeepSpeed's messages and Ultralytics' layer table too")
    watch.add_argument(
        "--profile", nargs="?", const="1,2,3", metavar="WAIT,WARMUP,ACTIVE", help="torch.profiler trace of steps"
    )
    watch.add_argument(
        "--comms_logger",
        action="store_true",
        help="print each collective's calls, bytes and time at the end (DeepSpeed's comms logger; syncs every "
        "collective)",
    )
    return parser


# Ultralytics train settings that yolods takes as its own flags of the same name: the run reads the flag, so the
# setting would be lost
HYP_KEYS_WITH_FLAGS = frozenset(
    {
        "epochs",
        "batch",
        "imgsz",
        "workers",
        "seed",
        "model",
        "data",
        "device",
        "project",
        "name",
        "exist_ok",
        "resume",
        "verbose",
    }
)

# Settings only Ultralytics' own trainer implements, which yolods does not run: any value but Ultralytics' default
# would be silently ignored (rect=True would crash), so it is refused with what to do instead
HYP_KEYS_NOT_IMPLEMENTED = {
    "amp": "set the precision with --precision fp32|bf16|fp16 (or the DeepSpeed JSON)",
    "multi_scale": "yolods trains at one --imgsz; multi-scale training is not implemented",
    "time": "a time budget is not implemented; bound the run with --epochs (a stopped run resumes with --resume)",
    "val": "yolods validates after every epoch (best.pt and --patience need it); skipping it is not implemented",
    "save": "yolods always saves last.pt, best.pt and resumable DeepSpeed checkpoints",
    "save_period": "per-epoch epochN.pt files are not implemented; --save_period_min/--save_period_steps add "
    "resumable checkpoints within an epoch",
    "pretrained": "pass the weights to start from as --model path/to/weights.pt, or a model yaml to start from scratch",
    "save_json": "yolods.val writes predictions.json: python -m yolods.val --model RUN/weights/best.pt --save_json",
    "cls_pw": "class-weighted classification loss is not implemented",
    "compile": "torch.compile is not implemented",
    "cls_remap": "yolods always maps a .pt's classes to the data's by name",
    "quantize": "quantization-aware training is not implemented",
    "distill_model": "knowledge distillation is not implemented",
    "profile": "Ultralytics' export-speed profiling is not implemented; yolods' own --profile records a torch.profiler trace",
    "cfg": "a settings yaml is not read; pass each setting as --hyp KEY=VALUE",
    "split": "yolods validates on the data.yaml's val split",
    "rect": "rectangular training batches are not implemented (validation already uses them)",
    "task": "yolods trains detection models",
    "mode": "yolods.train trains; use yolods.val or yolods.predict for the others",
}


def parse_hyp_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--hyp KEY=VALUE` pairs -> {key: value}; every key must be an Ultralytics setting.

    Values are read by Ultralytics' own `yolo KEY=VALUE` parser (`smart_value`: Python literals, true/false/none),
    not as YAML 1.1, which takes 1e-3 for a string and refused `--hyp box=1e-3`.
    """
    from ultralytics.cfg import smart_value

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--hyp {pair!r} is not KEY=VALUE: write e.g. --hyp mosaic=0.5")
        if not is_ultralytics_setting(key):
            raise ConfigError(
                f"--hyp {key!r} is not an Ultralytics setting: see ultralytics/cfg/default.yaml for names"
            )
        overrides[key] = smart_value(value)
    return overrides


def check_imgsz(imgsz: int, flag: str = "--imgsz", *, stride: int = IMGSZ_MULTIPLE, model: str | None = None) -> None:
    """Refuse an image size Ultralytics' models cannot take whole (train, val, predict, the bench and its report's
    goal alike); `flag` names it in the message. `stride`: the model's largest, once it is built (64 for P6 models)."""
    if imgsz < stride or imgsz % stride:
        # the next multiple up, where Ultralytics' own check_imgsz rounds a size to (with a warning)
        rounded = max(stride, -(-imgsz // stride) * stride)
        whose = f"{model}'s largest stride" if model else "the model stride"
        raise ConfigError(f"{flag} {imgsz} is not a positive multiple of {whose} {stride}: use e.g. {flag} {rounded}")


def refuse_flags_given_as_hyp(overrides: dict[str, Any], flags: Iterable[str]) -> None:
    """A `--hyp` setting the command takes as a flag would bypass the flag's checks (and where it is recorded)."""
    for key in sorted(set(overrides) & set(flags)):
        raise ConfigError(f"--hyp {key}={overrides[key]}: yolods reads this from its own flag; pass --{key}")


# Values of those settings that leave them off in Ultralytics' trainer as its default does (time=0: no budget,
# save_period<=0: no epochN.pt); pretrained=False changes nothing for a model built from its yaml
_OFF_LIKE_THE_DEFAULT = {
    "time": lambda value, model: not value,
    "save_period": lambda value, model: value is not None and float(value) <= 0,
    "pretrained": lambda value, model: value is False and not str(model).endswith(".pt"),
}


def check_training_settings(overrides: dict[str, Any], *, model: str | None = None) -> None:
    """Refuse the `--hyp` settings yolods.train would silently ignore (yolods.val passes its own to Ultralytics)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    refuse_flags_given_as_hyp(overrides, HYP_KEYS_WITH_FLAGS)
    for key, value in overrides.items():
        if key not in HYP_KEYS_NOT_IMPLEMENTED or value == DEFAULT_CFG_DICT[key]:
            continue
        off = _OFF_LIKE_THE_DEFAULT.get(key)
        if off is not None and off(value, model):
            continue
        raise ConfigError(f"--hyp {key}={value} is not supported: {HYP_KEYS_NOT_IMPLEMENTED[key]}")


def absolute_if_local(path: str | None) -> str | None:
    """A path to a local file made absolute (symlinks kept); a name (`yolov8n.yaml`, `synthetic`) left as given.

    args.yaml and the weights' train_args record it, so `--resume` and `yolods.val` from another directory find
    the same file instead of one of the same name there.
    """
    if path is None or not Path(path).is_file():
        return path
    return os.path.abspath(path)


def check_setting_values(settings: argparse.Namespace | RunConfig) -> None:
    """The values a run can take, from parsed flags (None: not given) or a RunConfig read back from args.yaml (a hand
    edit there, `batch: -3`, reached the data loader as a negative batch size)."""
    if settings.zero is not None and settings.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {settings.zero} is not a ZeRO stage: use 0, 1, 2 or 3")
    if settings.precision is not None and settings.precision not in PRECISIONS:
        raise ConfigError(f"--precision {settings.precision} is unknown: use fp32, bf16 or fp16")
    try:
        rule_parts(settings.large_batch_rule)
    except ValueError as error:
        raise ConfigError(f"--large_batch_rule: {error}") from None
    if settings.batch is not None and settings.batch < 1:
        raise ConfigError(
            f"--batch {settings.batch} must be a positive global batch size (images over all ranks); Ultralytics' "
            "AutoBatch (-1 or a memory fraction) is not implemented: python -m yolods.bench --fit micro-batch finds "
            "what fits"
        )
    if settings.epochs is not None and settings.epochs < 1:
        raise ConfigError(f"--epochs {settings.epochs} must be at least 1")
    if settings.imgsz is not None:
        check_imgsz(settings.imgsz)
    if settings.workers < 0:
        raise ConfigError(f"--workers {settings.workers} must be 0 (load in the training process) or more")
    if settings.save_period_steps < 0 or settings.save_period_min < 0:
        raise ConfigError("--save_period_steps and --save_period_min must be 0 (off) or positive")
    if settings.synthetic_images < 1:
        raise ConfigError(f"--synthetic_images {settings.synthetic_images} must be at least 1")


def check_setting_types(cfg: RunConfig) -> None:
    """Each setting of the type RunConfig declares (args.yaml edited by hand: `epochs: twenty`).

    Raises:
        ValueError: the first setting of another type, with its value.
    """
    for name, hint in typing.get_type_hints(RunConfig).items():
        value = getattr(cfg, name)
        allowed = tuple(option for option in typing.get_args(hint) or (hint,) if isinstance(option, type))
        if typing.get_origin(hint) is dict:
            allowed = (dict,)
        if float in allowed:
            allowed += (int,)  # YAML writes 30.0 back as 30.0, but a hand edit may say 30
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            expected = " or ".join("none" if option is type(None) else option.__name__ for option in allowed)
            raise ValueError(f"{name}: {value!r} is not {expected}")


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse and validate the command line into a RunConfig."""
    parser = build_parser()
    args = parser.parse_args(argv)
    synthetic = args.data == SYNTHETIC
    defaults = SYNTHETIC_DEFAULTS if synthetic else REAL_DATA_DEFAULTS
    check_setting_values(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device: use --device cpu or check the driver")
    hyp = parse_hyp_overrides(args.hyp)
    check_training_settings(hyp, model=args.model)
    flags = {flag: getattr(args, flag) for flag in HYP_FLAGS if getattr(args, flag) is not None}
    for flag in sorted(set(flags) & set(hyp)):  # one setting given twice: the flag would win without a word
        if flags[flag] != hyp[flag]:
            raise ConfigError(f"--{flag} {flags[flag]} and --hyp {flag}={hyp[flag]} disagree: pass one of them")
    hyp.update(flags)
    if args.cos_lr:
        hyp["cos_lr"] = True
    if args.cache is not None:
        hyp["cache"] = args.cache
    if "cache" in hyp:
        from yolods.data.image_cache import cache_mode

        cache_mode(hyp["cache"])  # --hyp cache=... takes Ultralytics' values; anything else is a mistake
    return RunConfig(
        model=absolute_if_local(args.model),
        data=absolute_if_local(args.data),
        epochs=args.epochs if args.epochs is not None else defaults["epochs"],
        imgsz=args.imgsz if args.imgsz is not None else defaults["imgsz"],
        batch=args.batch if args.batch is not None else 16,
        batch_from_flag=args.batch is not None,
        workers=args.workers,
        seed=args.seed,
        zero=args.zero,
        precision=args.precision,
        deepspeed_config=absolute_if_local(args.deepspeed_config),
        project=args.project,
        name=args.name,
        exist_ok=args.exist_ok,
        resume=args.resume,
        save_period_steps=args.save_period_steps,
        save_period_min=args.save_period_min,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        synthetic_images=args.synthetic_images,
        profile=args.profile,
        comms_logger=args.comms_logger,
        verbose=args.verbose,
        activation_checkpointing=args.activation_checkpointing,
        communication_dtype=args.communication_dtype,
        step_at_epoch_end=args.step_at_epoch_end,
        large_batch_rule=args.large_batch_rule,
        sync_bn=args.sync_bn,
        paired_data=args.paired_data,
        hyp=hyp,
    )


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags present on the command line (not those left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _file_gone(name: str, value: str | None) -> bool:
    """Whether a run's --data, --model or --deepspeed_config names a file that is not there (a yaml name such as
    yolov8n.yaml is no file; 'synthetic' is drawn in the run dir)."""
    if value is None or value == SYNTHETIC or (name == "model" and not value.endswith(".pt")):
        return False
    return not Path(value).is_file()


def resumed_config(saved: RunConfig, flags: RunConfig, *, given: set[str]) -> RunConfig:
    """The saved settings of a run to resume, with the flags a resumed run may change taken from `flags`.

    Raises:
        ConfigError: a given flag that would change the run (its saved value differs), naming each; the run's
            data.yaml is gone and no --data says where it moved.
    """
    # Runs saved before paths were recorded absolute: read relative to here, as they always were
    saved = dataclasses.replace(
        saved,
        model=absolute_if_local(saved.model),
        data=absolute_if_local(saved.data),
        deepspeed_config=absolute_if_local(saved.deepspeed_config),
    )
    # As Ultralytics' resume does for its data.yaml: a file the run read that is no longer where it was may be given
    # anew. A --model .pt needs no new path: only its architecture is read (the checkpoint holds the weights), and
    # the run's own weights/last.pt has it.
    moved = {name for name in ("data", "model", "deepspeed_config") if _file_gone(name, getattr(saved, name))}
    own_weights = Path(saved.resume) / "weights" / "last.pt"
    if "model" in moved and "model" not in given and own_weights.is_file():
        saved, moved = dataclasses.replace(saved, model=str(own_weights)), moved - {"model"}
    for name in sorted(moved - given):
        raise ConfigError(
            f"--resume {saved.resume}: the run's --{name} {getattr(saved, name)} is not there any more; if it "
            f"moved, pass --{name} with its new path"
        )
    conflicts = []
    for name in sorted(given - set(CHANGEABLE_ON_RESUME) - moved):
        if name in HYP_FLAGS or name in ("hyp", "cos_lr", "cache"):
            continue  # compared key by key below
        field_name = "deepspeed_config" if name in ("deepspeed_config", "deepscale_config") else name
        if hasattr(saved, field_name) and getattr(flags, field_name) != getattr(saved, field_name):
            had = getattr(saved, field_name)
            conflicts.append(f"--{name} {getattr(flags, field_name)} (run has {'the default' if had is None else had})")
    for key, value in sorted(flags.hyp.items()):
        if saved.hyp.get(key) != value:
            conflicts.append(f"{key}={value} (run has {saved.hyp.get(key, 'the default')})")
    if conflicts:
        raise ConfigError(
            f"--resume {saved.resume}: {', '.join(conflicts)} would change the run; a resumed run keeps its settings "
            "(only --project, --profile, --comms_logger, --verbose, the --save_period_* flags, and --data, --model "
            "or --deepspeed_config where the run's file moved, may change): drop those flags, or start a new run"
        )
    periods = {name: getattr(flags, name) for name in ("save_period_steps", "save_period_min") if name in given}
    return dataclasses.replace(
        saved,
        **{name: getattr(flags, name) for name in moved},
        profile=flags.profile,
        comms_logger=flags.comms_logger,
        verbose=flags.verbose,
        **periods,
    )


def _multiples_around(batch: int, world_size: int) -> str:
    """The multiples of `world_size` either side of `batch` ("8 or 16"), the lower one only if it is above 0."""
    lower = batch // world_size * world_size
    return f"{lower} or {lower + world_size}" if lower else str(world_size)


def check_batch_resplit(cfg: RunConfig, *, saved_world_size: int, world_size: int) -> None:
    """A run resumed on another number of ranks keeps its global batch; the micro batch per rank is re-split.

    Raises:
        ConfigError: the global batch does not split over `world_size` ranks, or the run's DeepSpeed JSON fixes
            the per-rank batch (then only the saved number of ranks keeps the global batch).
    """
    if saved_world_size == world_size:
        return
    user = load_deepspeed_json(cfg.deepspeed_config) if cfg.deepspeed_config else {}
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size"):
        if key in user:
            raise ConfigError(
                f"--resume {cfg.resume}: {cfg.deepspeed_config} fixes {key}={user[key]}, so the global batch the run "
                f"had on {saved_world_size} ranks cannot be re-split over {world_size}; resume with {saved_world_size} ranks"
            )
    if cfg.batch % world_size:
        fitting = [ranks for ranks in range(1, cfg.batch + 1) if cfg.batch % ranks == 0]
        nearest = sorted(fitting, key=lambda ranks: abs(ranks - world_size))[:2]
        raise ConfigError(
            f"--resume {cfg.resume}: the run's global batch {cfg.batch} (saved on {dist.ranks_phrase(saved_world_size)}) does not "
            f"split over {world_size} ranks; resume on a number of ranks that divides {cfg.batch}, e.g. "
            f"{' or '.join(str(ranks) for ranks in sorted(nearest))}"
        )


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed config


def default_deepspeed_config(*, zero_stage: int, precision: str, device: str = "cuda") -> dict[str, Any]:
    """The DeepSpeed config yolods uses when the user gives none (ds_configs/*.json hold the CUDA ones).

    Batch keys are filled in by `resolve_deepspeed_config`. On `device="cpu"` (gloo) ZeRO 1-2 differ, as
    measured there (ds_configs/README.md): DeepSpeed's CPU accelerator has no side streams, so reducing
    gradients from backward hooks overlaps nothing.
    """
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage in (1, 2):
        zero.update(
            reduce_bucket_size=BUCKET_ELEMENTS,
            allgather_bucket_size=BUCKET_ELEMENTS,
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_scatter=True,
        )
        if device == "cpu":
            # Nothing to overlap, so no copies into a contiguous bucket: ZeRO-1 then registers no gradient hooks
            # and reduces once after backward, ZeRO-2 reduces from its hooks without the copies
            zero.update(overlap_comm=False, contiguous_gradients=False)
            if zero_stage == 1:
                # ZeRO-1 holds every gradient until backward ends anyway, so its buckets are reduced back to back:
                # one bucket is one synchronisation point fewer (ZeRO-2 keeps 2e6: freeing gradients is its job)
                zero.update(reduce_bucket_size=WHOLE_MODEL_BUCKET_ELEMENTS)
    elif zero_stage == 3:
        zero.update(
            reduce_bucket_size=BUCKET_ELEMENTS,
            overlap_comm=True,
            contiguous_gradients=True,
            stage3_prefetch_bucket_size=STAGE3_PREFETCH_ELEMENTS,
            stage3_param_persistence_threshold=STAGE3_PERSISTENCE_THRESHOLD,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    config: dict[str, Any] = {
        "gradient_clipping": GRADIENT_CLIP_NORM,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # Ultralytics' SGD/AdamW groups are plain torch optimizers
        "steps_per_print": 1_000_000_000,  # yolods logs every step itself
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return config


def precision_of(ds_config: dict[str, Any]) -> str | None:
    """The precision a DeepSpeed config asks for, or None if it says nothing."""
    autocast = ds_config.get("torch_autocast", {})
    if autocast.get("enabled"):
        return "fp16" if str(autocast.get("dtype", "bfloat16")) in ("float16", "fp16", "torch.float16") else "bf16"
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    if "torch_autocast" in ds_config or "bf16" in ds_config or "fp16" in ds_config:
        return "fp32"
    return None


def load_deepspeed_json(path: str) -> dict[str, Any]:
    """Read a user's DeepSpeed JSON with a one-line error for the two ways it goes wrong."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"--deepspeed_config {path}: file not found; pass a DeepSpeed JSON such as ds_configs/zero2_bf16.json"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"--deepspeed_config {path}: invalid JSON at line {error.lineno} ({error.msg})") from None


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic, resolved once: global_batch = micro_batch x world_size; accumulate over that."""

    micro_batch: int
    world_size: int
    accumulate: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size

    @property
    def images_per_optimizer_step(self) -> int:
        return self.global_batch * self.accumulate


def resolve_deepspeed_config(cfg: RunConfig, *, world_size: int, nbs: int) -> tuple[dict[str, Any], BatchPlan]:
    """Merge the user's DeepSpeed JSON (if any) with the flags; every disagreement is a ConfigError.

    Gradient accumulation follows Ultralytics: accumulate = round(nbs / global batch), so a run at any batch
    size and world size steps the optimizer every ~nbs images.
    """
    user = load_deepspeed_json(cfg.deepspeed_config) if cfg.deepspeed_config else {}
    source = cfg.deepspeed_config
    if cfg.deepspeed_config:
        from yolods.ds_validation import validate_deepspeed_config  # imports config: not at module level

        validate_deepspeed_config(user, source=f"--deepspeed_config {source}")

    user_stage = user.get("zero_optimization", {}).get("stage")
    if cfg.zero is not None and user_stage is not None and int(user_stage) != cfg.zero:
        raise ConfigError(
            f"--zero {cfg.zero} disagrees with zero_optimization.stage={user_stage} in {source}: drop one"
        )
    stage = cfg.zero if cfg.zero is not None else int(user_stage or 0)

    user_precision = precision_of(user)
    if cfg.precision and user_precision and cfg.precision != user_precision:
        raise ConfigError(
            f"--precision {cfg.precision} disagrees with {source}, which asks for {user_precision}: drop one"
        )
    if cfg.device == "cpu" and user.get("fp16", {}).get("enabled"):
        raise ConfigError(
            f"--deepspeed_config {source} enables DeepSpeed's fp16 section, which its CPU accelerator refuses ('Type fp16 is not "
            "supported'); on CPU use --precision fp16 (torch_autocast float16) instead, or drop the section"
        )
    precision = cfg.precision or user_precision or ("bf16" if cfg.device == "cuda" else "fp32")

    micro_from_user = user.get("train_micro_batch_size_per_gpu")
    if cfg.batch_from_flag or micro_from_user is None:
        if cfg.batch % world_size:
            raise ConfigError(
                f"--batch {cfg.batch} does not split over {world_size} ranks: use a multiple of {world_size}, "
                f"e.g. --batch {_multiples_around(cfg.batch, world_size)}"
            )
        micro_batch = cfg.batch // world_size
        if micro_from_user is not None and int(micro_from_user) != micro_batch:
            raise ConfigError(
                f"--batch {cfg.batch} gives {micro_batch} images per rank on {dist.ranks_phrase(world_size)} but {source} sets "
                f"train_micro_batch_size_per_gpu={micro_from_user}: make them agree or drop one"
            )
    else:
        micro_batch = int(micro_from_user)
    accumulate = int(user.get("gradient_accumulation_steps", max(round(nbs / (micro_batch * world_size)), 1)))
    plan = BatchPlan(micro_batch=micro_batch, world_size=world_size, accumulate=accumulate)
    user_total = user.get("train_batch_size")
    if user_total is not None and int(user_total) != plan.images_per_optimizer_step:
        raise ConfigError(
            f"train_batch_size={user_total} in {source} is not micro batch {micro_batch} x accumulation {accumulate} "
            f"x {dist.ranks_phrase(world_size)} = {plan.images_per_optimizer_step}: fix it or drop it"
        )

    resolved = (
        default_deepspeed_config(zero_stage=stage, precision=precision, device=cfg.device)
        if not user
        else copy.deepcopy(user)
    )
    if user:
        resolved.setdefault("zero_optimization", {})["stage"] = stage
        resolved.setdefault("gradient_clipping", GRADIENT_CLIP_NORM)
        resolved.setdefault("zero_allow_untested_optimizer", True)
        resolved.setdefault("steps_per_print", 1_000_000_000)
        if user_precision is None and precision != "fp32":
            resolved["torch_autocast"] = default_deepspeed_config(zero_stage=stage, precision=precision)[
                "torch_autocast"
            ]
        if any(resolved.get(section, {}).get("enabled") for section in ("bf16", "fp16")):
            # DeepSpeed's bf16/fp16 sections cast parameters but not buffers, and BatchNorm then fails with
            # "expected scalar type BFloat16 but found Float"; casting the buffers too lets such configs run.
            resolved.setdefault("data_types", {}).setdefault("buffer_dtype", "bf16" if precision == "bf16" else "fp16")
    _check_no_granularity_threshold(resolved, stage=stage, source=source)
    if "optimizer" in resolved or "scheduler" in resolved:
        raise ConfigError(
            f"{source} defines an optimizer/scheduler: remove it; yolods builds Ultralytics' optimizer groups and lr schedule"
        )
    if cfg.communication_dtype:
        user_dtype = user.get("communication_data_type")
        if user_dtype is not None and user_dtype != cfg.communication_dtype:
            raise ConfigError(
                f"--communication_dtype {cfg.communication_dtype} disagrees with communication_data_type={user_dtype} in {source}: drop one"
            )
        # Halves the bytes of every gradient reduction (bf16 keeps fp32's range; fp16 may overflow unscaled sums).
        resolved["communication_data_type"] = cfg.communication_dtype
    if cfg.comms_logger:
        # DeepSpeed's per-collective log; it synchronises every collective, hence only on request.
        resolved["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    resolved["train_micro_batch_size_per_gpu"] = micro_batch
    resolved["gradient_accumulation_steps"] = accumulate
    resolved["train_batch_size"] = plan.images_per_optimizer_step
    return resolved, plan


def place_monitor_outputs(ds_config: dict[str, Any], run_dir: Path) -> None:
    """Point DeepSpeed's own monitors (tensorboard, csv_monitor) into run_dir/deepspeed, beside yolods' logs."""
    for monitor in ("tensorboard", "csv_monitor"):
        section = ds_config.get(monitor)
        if section and section.get("enabled") and not section.get("output_path"):
            section["output_path"] = str(run_dir / "deepspeed")
            section.setdefault("job_name", monitor)


def _check_no_granularity_threshold(config: dict[str, Any], *, stage: int, source: str | None) -> None:
    """DeepSpeed 0.19.8's `stage3_module_granularity_threshold` breaks every YOLO at the first backward.

    It makes the first layer a leaf module, and the images it is fed need no gradient, so DeepSpeed reduces that
    layer's gradients before they exist (yolods/zero3_layers.py). yolods already marks each layer it can.
    """
    threshold = config.get("zero_optimization", {}).get("stage3_module_granularity_threshold", 0)
    if stage == 3 and _is_positive_number(threshold):
        raise ConfigError(
            f"stage3_module_granularity_threshold={threshold} in {source}: DeepSpeed 0.19.8 then fails at the first "
            "backward of a YOLO model; remove it (yolods already fetches each YOLO layer's parameters as one unit at ZeRO-3)"
        )


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def resolved_precision(ds_config: dict[str, Any]) -> str:
    """fp32, bf16 or fp16, as the resolved config will run."""
    return precision_of(ds_config) or "fp32"


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# The whole run, resolved


@dataclass(frozen=True)
class ProfileSpec:
    """`--profile WAIT,WARMUP,ACTIVE`: steps skipped, warmed up and recorded by torch.profiler."""

    wait: int
    warmup: int
    active: int


def parse_profile_spec(spec: str) -> ProfileSpec:
    """'1,2,3' -> ProfileSpec(wait=1, warmup=2, active=3)."""
    try:
        wait, warmup, active = (int(part) for part in spec.split(","))
    except ValueError:
        raise ConfigError(f"--profile {spec}: expected WAIT,WARMUP,ACTIVE step counts, e.g. --profile 1,2,3") from None
    if min(wait, warmup) < 0 or active < 1:
        raise ConfigError(f"--profile {spec}: counts must be >= 0 and ACTIVE >= 1")
    return ProfileSpec(wait=wait, warmup=warmup, active=active)


@dataclass(frozen=True)
class RunPlan:
    """Everything a run derives from its flags and files, resolved once, before the process group exists.

    `hyp` is Ultralytics' default.yaml with this run's values (the loss, datasets and validator read it);
    `data` is the parsed data.yaml, or None for the synthetic set, which is drawn into the run directory later.
    """

    cfg: RunConfig
    hyp: SimpleNamespace
    ds_config: dict[str, Any]
    batch: BatchPlan
    data: dict[str, Any] | None
    profile: ProfileSpec | None

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"]["stage"])

    @property
    def precision(self) -> str:
        return resolved_precision(self.ds_config)


def hyperparameters(cfg: RunConfig) -> SimpleNamespace:
    """Ultralytics' default.yaml with this run's values; model.args, the datasets and the validator read it."""
    return ultralytics_settings(
        {
            "task": "detect",
            "mode": "train",
            "model": cfg.model,
            "data": cfg.data,
            "epochs": cfg.epochs,
            "imgsz": cfg.imgsz,
            "batch": cfg.batch,
            "workers": cfg.workers,
            "seed": cfg.seed,
            "plots": False,
            "amp": False,  # precision is DeepSpeed's job (torch_autocast), not Ultralytics'
            **cfg.hyp,
        }
    )


def resolve_run(cfg: RunConfig, *, world_size: int) -> RunPlan:
    """Resolve and check the whole run for `world_size` ranks; every rank calls it before joining the group.

    Raises:
        ConfigError: the first user mistake found, in one line.
    """
    from yolods.data import load_data_yaml
    from yolods.model import check_memory_format, check_model_spec, check_optimizer_name

    hyp = hyperparameters(cfg)
    check_optimizer_name(hyp.optimizer)
    ds_config, batch_plan = resolve_deepspeed_config(cfg, world_size=world_size, nbs=hyp.nbs)
    zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
    if str(hyp.optimizer).lower() == "musgd" and zero_stage > 0:  # `auto`'s MuSGD falls back to SGD instead
        raise ConfigError(
            f"--optimizer MuSGD needs --zero 0: its Muon step orthogonalises each weight matrix, and ZeRO-{zero_stage} "
            "optimises flat partitions of them; use --zero 0, or another --optimizer (SGD, AdamW)"
        )
    check_memory_format(hyp, device=cfg.device, zero_stage=zero_stage)
    profile = parse_profile_spec(cfg.profile) if cfg.profile is not None else None
    check_model_spec(cfg.model, freeze=hyp.freeze)
    data = None if cfg.is_synthetic else load_data_yaml(cfg.data)
    return RunPlan(cfg=cfg, hyp=hyp, ds_config=ds_config, batch=batch_plan, data=data, profile=profile)
