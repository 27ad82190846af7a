"""Adapter for Ultralytics' model side: DetectionModel and its loss, checkpoint loading, optimizer groups, EMA.

Wraps `ultralytics.nn.tasks` (DetectionModel, yaml loading, load_checkpoint), `BaseTrainer.build_optimizer`
and `ModelEMA`. Ultralytics is also wrapped by yolods.hyp (settings), yolods.data (datasets, loaders),
yolods.validation (the validator) and yolods.metrics (its logger and progress bar); a new Ultralytics release
touches those modules, not the engine or the checkpointing.
"""

from __future__ import annotations

import contextlib
import math
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from types import MethodType, SimpleNamespace
from typing import Any

import torch
from torch import nn

from yolods.errors import ConfigError

DETECTION_HEADS = ("Detect", "v10Detect")  # heads DetectionModel trains; Segment, Pose, OBB, World need other models


def _load_weights_file(path: Path) -> nn.Module:
    """The EMA (else model) of a local Ultralytics .pt, in fp32. Never downloads."""
    from ultralytics.nn.tasks import load_checkpoint

    if not path.is_file():
        raise ConfigError(
            f"--model {path}: weights file not found; yolods never downloads, so pass a local .pt or a yaml name such as yolov8n.yaml"
        )
    try:
        weights, _ = load_checkpoint(str(path))
    except Exception as error:  # torch.load / unpickling errors, one line for the user
        raise ConfigError(_unreadable_checkpoint(str(path), error)) from None
    return weights.float()


def _unreadable_checkpoint(model_spec: str, error: Exception) -> str:
    name = Path(model_spec).name
    if name.endswith(("_model_states.pt", "_optim_states.pt")) or name.startswith("yolods_rank"):
        return (
            f"--model {model_spec}: a file of a DeepSpeed checkpoint, not weights; pass the run's weights/best.pt or "
            "weights/last.pt (or --resume the run directory)"
        )
    # the first line only: Ultralytics appends advice to re-download, which an offline tool cannot follow
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"--model {model_spec}: not a readable Ultralytics checkpoint ({type(error).__name__}: {first_line}); "
        "pass a .pt saved by Ultralytics or yolods (a run's weights/best.pt)"
    )


def check_model_spec(model_spec: str, *, freeze: Any = None) -> None:
    """Fail early, in one line, for a model yolods cannot train: unknown name, missing file, not a detector, a
    `freeze` setting that names no layer of it or freezes them all.

    Reads only the yaml (or the .pt's stored yaml): no model is built.
    """
    from ultralytics.nn.tasks import yaml_model_load

    if model_spec.endswith(".pt"):
        model_yaml = _load_weights_file(Path(model_spec)).yaml
    elif model_spec.endswith((".yaml", ".yml")):
        try:
            model_yaml = yaml_model_load(model_spec)
        except FileNotFoundError:
            raise ConfigError(
                f"--model {model_spec}: unknown model; use an Ultralytics detection yaml such as yolov8n.yaml, yolo11s.yaml or a local .pt"
            ) from None
    else:
        raise ConfigError(f"--model {model_spec}: expected an Ultralytics yaml name (yolov8n.yaml) or a local .pt file")
    require_detection_head(
        model_yaml, model_spec=model_spec, advice="yolods trains detection models: use e.g. yolov8n.yaml"
    )
    frozen_layers(freeze, num_layers=len(model_yaml["backbone"]) + len(model_yaml["head"]))


def require_detection_head(model_yaml: dict[str, Any], *, model_spec: str, advice: str) -> None:
    """Raise ConfigError naming the task of a model whose last layer is no detection head (from its yaml)."""
    from ultralytics.nn.tasks import guess_model_task

    if not model_yaml.get("backbone") or not model_yaml.get("head"):  # a data.yaml passed as the model, say
        raise ConfigError(f"--model {model_spec}: not a model yaml (it has no backbone and head); {advice}")
    head = str(model_yaml.get("head", [[None, None, None]])[-1][2])
    if head not in DETECTION_HEADS:
        task = guess_model_task(model_yaml)
        # YOLO-World's WorldDetect is a detect task for Ultralytics, but needs text embeddings DetectionModel lacks
        kind = (
            f"a {task} model ({head} head)" if task and task != "detect" else f"a {head} head, not {DETECTION_HEADS[0]}"
        )
        raise ConfigError(f"--model {model_spec}: {kind}; {advice}")


@dataclass(frozen=True)
class TrainedDetector:
    """A trained detection model as `ultralytics.YOLO(weights)` loads it, for validation and prediction.

    `defaults` are the settings YOLO keeps from the checkpoint's train args (imgsz, data, task, single_cls): what
    `YOLO(weights).val()` and `.predict()` use where their caller passes nothing.
    """

    weights: Path
    module: nn.Module
    defaults: dict[str, Any]

    @property
    def names(self) -> dict[int, str]:
        return self.module.names

    @property
    def channels(self) -> int:
        """Image channels the model takes: 1 for one trained on grayscale data, else 3 (as Ultralytics reads it)."""
        return self.module.yaml.get("channels", 3)


def load_trained_detector(model_spec: str) -> TrainedDetector:
    """A local Ultralytics .pt, or a yolods run directory (its weights/best.pt), loaded as ultralytics.YOLO loads it.

    Raises:
        ConfigError: no such file, a yaml (no trained weights), an unreadable checkpoint, or not a detection model.

    Examples:
        >>> detector = load_trained_detector("runs/train/exp")  # runs/train/exp/weights/best.pt
    """
    path = Path(model_spec)
    if path.is_dir():
        path = path / "weights" / "best.pt"
        if not path.is_file():
            raise ConfigError(
                f"--model {model_spec}: a directory without weights/best.pt; pass a yolods.train run directory or a .pt file"
            )
    elif path.suffix != ".pt":
        has_none = "; a yaml has none" if path.suffix in (".yaml", ".yml") else ""
        raise ConfigError(
            f"--model {model_spec}: expected trained weights (a .pt file or a yolods.train run directory){has_none}"
        )
    elif not path.is_file():
        raise ConfigError(
            f"--model {model_spec}: weights file not found; yolods never downloads, so pass a local .pt or a run directory"
        )
    from ultralytics import YOLO

    try:
        yolo = YOLO(str(path))
    except Exception as error:  # torch.load / unpickling errors, one line for the user
        raise ConfigError(_unreadable_checkpoint(model_spec, error)) from None
    require_detection_head(
        yolo.model.yaml, model_spec=model_spec, advice="yolods validates and predicts with detection models"
    )
    return TrainedDetector(weights=path.resolve(), module=yolo.model, defaults=dict(yolo.overrides))


def build_model(
    model_spec: str,
    *,
    num_classes: int,
    class_names: dict[int, str],
    hyp: SimpleNamespace,
    verbose: bool,
    summary: bool = False,
    channels: int = 3,
) -> nn.Module:
    """An Ultralytics DetectionModel from a yaml name, or from a local .pt with its classes adapted to the data.

    Args:
        model_spec: 'yolov8n.yaml', 'yolo11s.yaml', ... or a path to a local .pt file.
        num_classes: classes in the data set; the head is built for them.
        class_names: index -> name, stored on the model so exported weights carry them.
        hyp: Ultralytics hyperparameters; the loss reads box/cls/dfl gains from `model.args`.
        verbose: print Ultralytics' layer table (rank 0 only).
        summary: print Ultralytics' one-line summary (layers, parameters, GFLOPs) without the table.
        channels: the data's image channels (data.yaml `channels`, 1 for grayscale); the first layer takes them, as
            in Ultralytics' trainer, also when a .pt was trained on another number.

    Examples:
        >>> model = build_model("yolov8n.yaml", num_classes=3, class_names={0: "a", 1: "b", 2: "c"}, hyp=hyp, verbose=False)
    """
    from ultralytics.nn.tasks import DetectionModel

    weights = None
    cfg: Any = model_spec
    if model_spec.endswith(".pt"):
        weights = _load_weights_file(Path(model_spec))
        cfg = weights.yaml
    elif not model_spec.endswith((".yaml", ".yml")):
        raise ConfigError(f"--model {model_spec}: expected an Ultralytics yaml name (yolov8n.yaml) or a local .pt file")
    if weights is not None and weights.yaml.get("channels", channels) != channels:
        from ultralytics.utils import LOGGER

        LOGGER.warning(
            f"--model {model_spec} was trained on {weights.yaml['channels']}-channel images and the data has {channels}: "
            "its first layer starts untrained"
        )
    try:
        model = DetectionModel(cfg, nc=num_classes, ch=channels, verbose=verbose)
    except FileNotFoundError:
        raise ConfigError(
            f"--model {model_spec}: unknown model; use an Ultralytics detection yaml such as yolov8n.yaml, yolo11s.yaml or a local .pt"
        ) from None
    model.names = class_names  # before load(): the head remaps classes by name when they match
    if weights is not None:
        model.load(weights, verbose=verbose)
    model.nc = num_classes
    model.names = class_names
    model.args = hyp
    model.criterion = model.init_criterion()
    freeze_layers(model, getattr(hyp, "freeze", None))  # before the optimizer groups and the EMA, as Ultralytics
    if summary and not verbose:  # verbose printed it with the table; before untying, as Ultralytics counts layers
        model.info()
    untie_shared_modules(model)
    return model


def untie_shared_modules(model: nn.Module) -> int:
    """Give every parent its own copy of a submodule that several parents share; returns how many were copied.

    Ultralytics' `Conv.default_act` is one SiLU instance shared by every Conv of every model in the process.
    ZeRO-3 hooks each module once per parent (hundreds of hooks on one SiLU): half the throughput, a stall on
    step 1, and a hook left on the class attribute that makes later models unpicklable. SiLU has no state, so
    copies change nothing else.
    """
    from collections import Counter

    parents_of = Counter(id(child) for parent in model.modules() for child in parent.children())
    copies = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            # Every occurrence is copied, the first too: the original is the class attribute ZeRO-3 would hook.
            if parents_of[id(child)] > 1 and not any(True for _ in child.parameters()):
                setattr(parent, child_name, deepcopy(child))
                copies += 1
    return copies


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each backbone and neck block's activations in backward instead of keeping them; returns how many.

    torch.utils.checkpoint (non-reentrant, which works with ZeRO-3's parameter hooks and autocast) per block of
    `model.model`, the head excepted: its outputs feed the loss directly, so keeping them costs little. Only the
    training model is changed, after the EMA copy was taken, so the EMA and the saved weights keep plain forwards.
    A recomputed BatchNorm would update its running statistics a second time; `_batchnorm_frozen` prevents it,
    so a step's losses, gradients and statistics equal those without checkpointing.
    """
    blocks = [block for block in list(model.model)[:-1] if any(True for _ in block.parameters())]
    for block in blocks:
        block.forward = MethodType(_checkpointed_forward, block)
    return len(blocks)


def _checkpointed_forward(block: nn.Module, *inputs):
    from torch.utils.checkpoint import checkpoint

    if not (block.training and torch.is_grad_enabled()):
        return type(block).forward(block, *inputs)
    return checkpoint(
        type(block).forward,
        block,
        *inputs,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _batchnorm_frozen(block)),
    )


@contextlib.contextmanager
def _batchnorm_frozen(block: nn.Module):
    """While a block is recomputed: BatchNorm normalises as in the forward but leaves its running stats alone."""
    norms = [module for module in block.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    counts = [norm.num_batches_tracked.clone() for norm in norms]
    for norm in norms:
        norm.momentum = 0.0  # running = (1 - 0) x running + 0 x batch
    try:
        yield
    finally:
        for norm, momentum, count in zip(norms, momenta, counts):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


def training_memory_format(device: torch.device, hyp: SimpleNamespace) -> torch.memory_format:
    """The layout of the training images: the standard one (NCHW), or NHWC on CUDA with `--hyp channels_last=True`.

    Not Ultralytics' default (it converts the weights to NHWC on CUDA): DeepSpeed cannot take NHWC weights (see
    `place_model`), and NHWC images with standard weights were slower on an H200, yolov8s @640, 16 images,
    ZeRO-0 bf16: 244 img/s against 304 (benchmarks/results/gpu). `check_memory_format` says where it may run.
    """
    use_nhwc = device.type == "cuda" and getattr(hyp, "channels_last", None) is True
    return torch.channels_last if use_nhwc else torch.contiguous_format


def check_memory_format(hyp: SimpleNamespace, *, device: str, zero_stage: int) -> None:
    """NHWC images only at ZeRO-0 on CUDA. At ZeRO 1-2 every parameter is a view into DeepSpeed's flat buffer, at
    any 4-byte offset, and on an H200 cuDNN's NHWC BatchNorm read such a view as misaligned and killed the process
    (fp32 and fp16 at ZeRO-1, fp32 at ZeRO-2); ZeRO-3 gathers its parameters into such views too.

    Raises:
        ConfigError: channels_last=True with ZeRO 1-3 on CUDA.
    """
    if getattr(hyp, "channels_last", None) is True and device == "cuda" and zero_stage > 0:
        raise ConfigError(
            f"--hyp channels_last=True with ZeRO-{zero_stage}: cuDNN's NHWC BatchNorm faults ('misaligned address') on "
            "the parameter views DeepSpeed flattens at ZeRO 1-3; drop channels_last or use --zero 0"
        )


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move the model to the device it trains on, and build its loss there.

    The parameters stay in the standard layout: DeepSpeed broadcasts each one as bytes at `initialize`
    (`p.data.view(torch.uint8)`), which fails on an NHWC weight, and ZeRO 1-3 flatten them anyway. NHWC images
    still select cuDNN's NHWC kernels, which take the (small) weights in either layout.
    Ultralytics' criterion is no module, so `.to()` leaves its tensors (the DFL projection, the strides) behind; it
    is rebuilt on the device, as Ultralytics builds it lazily on the moved model.
    """
    model = model.to(device, memory_format=torch.contiguous_format)
    model.criterion = model.init_criterion()
    return model


def freeze_layers(model: nn.Module, freeze: int | list[int] | None) -> None:
    """Ultralytics' `freeze` setting: no gradient for the first `freeze` layers (an int) or the listed layer indices.

    Ultralytics' trainer rule (`BaseTrainer._setup_train`): parameters under `model.{i}.` and the DFL's fixed
    weights are frozen, every other floating-point parameter trains. BatchNorm statistics in frozen layers still
    update, as in Ultralytics. DeepSpeed leaves frozen parameters out of its ZeRO 1-3 partitions; at ZeRO-0 they get
    no gradient, so the optimizer skips them.

    Raises:
        ConfigError: `freeze` would leave nothing to train, or is neither an int nor a list of layer indices.
    """
    frozen_names = [f"model.{index}." for index in frozen_layers(freeze, num_layers=len(model.model))] + [".dfl"]
    for name, parameter in model.named_parameters():
        if any(part in name for part in frozen_names):
            parameter.requires_grad = False
        elif parameter.dtype.is_floating_point:
            parameter.requires_grad = True
    if not any(parameter.requires_grad for parameter in model.parameters()):  # e.g. every layer holding parameters
        raise ConfigError(f"--hyp freeze={freeze} leaves no parameter to train: freeze fewer layers")


def frozen_layers(freeze: Any, *, num_layers: int) -> list[int]:
    """The layer indices Ultralytics' `freeze` setting names: `range(freeze)` for an int, else the list itself.

    Raises:
        ConfigError: neither a count nor a list of indices below `num_layers`, or every layer (nothing would train).
    """
    indices = [] if freeze is None else list(range(freeze)) if _is_int(freeze) and freeze >= 0 else freeze
    if not (isinstance(indices, list) and all(_is_int(index) and 0 <= index < num_layers for index in indices)):
        raise ConfigError(
            f"--hyp freeze={freeze}: give a number of layers (freeze=10) or a list of layer indices below "
            f"{num_layers} (freeze=[0,1,2])"
        )
    if len(set(indices)) == num_layers:
        raise ConfigError(
            f"--hyp freeze={freeze} freezes all {num_layers} layers, so nothing would train: freeze fewer"
        )
    return indices


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def model_stride(model: nn.Module) -> int:
    """Largest stride of the detection head, at least 32 (Ultralytics' grid size for letterboxing)."""
    return max(int(model.stride.max()), 32)


# the names BaseTrainer.build_optimizer accepts in Ultralytics 8.4, matched case-insensitively as it does
ULTRALYTICS_OPTIMIZERS = ("SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop", "auto")


def check_optimizer_name(name: str) -> None:
    """Raise ConfigError, before any work, for an optimizer Ultralytics would refuse only once the model is built."""
    if str(name).lower() not in {known.lower() for known in ULTRALYTICS_OPTIMIZERS}:
        raise ConfigError(f"--optimizer {name}: unknown; use one of {', '.join(ULTRALYTICS_OPTIMIZERS)}")


def build_optimizer(
    model: nn.Module, *, hyp: SimpleNamespace, num_classes: int, iterations: int, weight_decay: float, zero_stage: int
) -> tuple[torch.optim.Optimizer, SimpleNamespace]:
    """Ultralytics' optimizer: its parameter groups (decayed weights, norm weights, biases) and its `auto` choice.

    Calls Ultralytics' own `BaseTrainer.build_optimizer` so the grouping and the auto rule stay Ultralytics'.
    Returns the optimizer and the hyperparameters as that choice changed them (optimizer, lr0, warmup_bias_lr).

    `auto` picks MuSGD for long runs; Muon orthogonalises each weight matrix, which ZeRO 1-3 cannot do on the
    flat partitions they optimise, so there yolods falls back to SGD(lr0=0.01), Ultralytics' earlier choice.
    """
    from ultralytics.engine.trainer import BaseTrainer

    chosen = SimpleNamespace(**vars(hyp))
    shim = SimpleNamespace(args=chosen, data={"nc": num_classes})  # the two trainer attributes it reads
    optimizer = BaseTrainer.build_optimizer(
        shim, model, name=hyp.optimizer, lr=hyp.lr0, momentum=hyp.momentum, decay=weight_decay, iterations=iterations
    )
    if type(optimizer).__name__ == "MuSGD" and zero_stage > 0:  # auto's choice (a named MuSGD is refused earlier)
        chosen.optimizer, chosen.lr0 = "SGD", 0.01
        optimizer = BaseTrainer.build_optimizer(
            shim, model, name="SGD", lr=0.01, momentum=0.9, decay=weight_decay, iterations=iterations
        )
    return optimizer, chosen


def optimizer_iterations(*, num_train_images: int, global_batch: int, nbs: int, epochs: int) -> int:
    """Ultralytics' estimate of optimizer steps, which decides `optimizer=auto`."""
    return math.ceil(num_train_images / max(global_batch, nbs)) * epochs


def weight_decay_for(*, hyp: SimpleNamespace, global_batch: int, accumulate: int) -> float:
    """Ultralytics scales weight decay by the images per optimizer step over the nominal batch."""
    return hyp.weight_decay * global_batch * accumulate / hyp.nbs


def loss_names(model: nn.Module) -> tuple[str, ...]:
    """('box_loss', 'cls_loss', 'dfl_loss') for detection models (YOLO26: 'l1_loss' last, from its one-to-one
    branch, whose items its end-to-end loss reports)."""
    criterion = model.criterion
    return tuple(getattr(criterion, "loss_names", None) or criterion.one2one.loss_names)


def ultralytics_weights(
    ema_model: nn.Module, *, epoch: int, best_fitness: float | None, updates: int, metrics: dict[str, float]
) -> dict[str, Any]:
    """The dict Ultralytics' trainer saves as last.pt/best.pt (train_args added by the Checkpointer).

    `model` is None because Ultralytics loads `ema` first; the optimizer state lives in the DeepSpeed checkpoint.
    """
    from datetime import datetime

    from ultralytics import __version__

    return {
        "epoch": epoch,
        "best_fitness": best_fitness,
        "model": None,
        "ema": export_snapshot(ema_model),
        "updates": updates,
        "optimizer": None,
        "train_metrics": metrics,
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
    }


def export_snapshot(ema_model: nn.Module) -> nn.Module:
    """The fp16, criterion-free copy Ultralytics stores under 'ema' in last.pt / best.pt."""
    snapshot = deepcopy(ema_model).half().to(memory_format=torch.contiguous_format)
    snapshot.criterion = None
    for tensor in snapshot.state_dict().values():
        if tensor.is_floating_point():
            torch.nan_to_num_(tensor)  # fp16 overflow would make the file unloadable for inference
    retie_default_activations(snapshot)
    return snapshot


def retie_default_activations(model: nn.Module) -> int:
    """Undo `untie_shared_modules` for saving: every Conv-like module's default activation becomes one shared
    instance again, so `YOLO(path).info()`, `fuse()` and export see the model Ultralytics would have saved.

    The shared instance is one of the model's own copies, not the class attribute `Conv.default_act`: a hook
    that ZeRO-3 (or anything else) left on the class attribute must not travel into the saved file.
    Returns how many modules now share it.
    """
    shared: dict[type, nn.Module] = {}
    retied = 0
    for module in model.modules():
        default = getattr(type(module), "default_act", None)
        act = getattr(module, "act", None)
        if isinstance(default, nn.Module) and isinstance(act, nn.Module) and type(act) is type(default):
            module.act = shared.setdefault(type(act), act)
            retied += 1
    return retied


def advance_loss_schedule(model: nn.Module, *, completed_epochs: int) -> None:
    """Ultralytics' per-epoch loss schedule after `completed_epochs` epochs (its `criterion.update()`).

    End-to-end heads (YOLO26) shift loss weight from the one-to-many to the one-to-one branch each epoch;
    other losses have no schedule.
    """
    criterion = getattr(model, "criterion", None)
    if completed_epochs > 0 and hasattr(criterion, "update"):
        criterion.updates = completed_epochs - 1  # as Ultralytics' resume sets it: update() counts the last epoch
        criterion.update()


def floating_buffers(module: nn.Module) -> list[torch.Tensor]:
    """BatchNorm running statistics (the floating-point buffers), which each rank updates from its own shard."""
    return [buffer for buffer in module.buffers() if buffer.dtype.is_floating_point]
