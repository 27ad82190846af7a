"""Resume on a different number of ranks: a checkpoint saved by N ranks, loaded into an engine running on M.

At ZeRO 1-3 each rank saved only its partition of the fp32 weights and the optimizer state, and DeepSpeed's own
loader refuses a new data-parallel size. Its universal checkpoint would re-split them, but `ds_to_universal`
extracts only Adam's `exp_avg`/`exp_avg_sq` (Ultralytics' SGD keeps a `momentum_buffer`) and has no path for
ZeRO-0's plain optimizer. YOLO detectors are small (3-70M parameters), so yolods consolidates instead: every rank
reads all N saved partitions, rebuilds each parameter's whole fp32 value and optimizer state (the walk
`zero_to_fp32` does for the weights, applied to every optimizer state as well), cuts out its own partition for M
ranks and hands that to DeepSpeed's loader in DeepSpeed's own format. Nothing is rounded: every fp32 weight and
optimizer-state element comes back bit for bit.

ZeRO-0 checkpoints need none of this: rank 0 saved the whole model and optimizer, which DeepSpeed loads on any
number of ranks. What yolods keeps per rank (BatchNorm statistics, running losses) is merged by
`merge_rank_states`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from yolods import dist

MODEL_STATES_ZERO12 = "mp_rank_00_model_states.pt"  # rank 0's, for every rank
MODEL_STATES_ZERO3 = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"  # one per rank
# Optimizer partitions; DeepSpeed adds a "bf16_" prefix when a "bf16" config section is enabled.
OPTIMIZER_STATES = "*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
# Settings of DeepSpeed's ZeRO optimizers that are the same on every rank and travel with the optimizer state.
OPTIMIZER_SETTINGS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")
# Keys of a model-states file that are DeepSpeed's; the rest is the client state yolods saved.
DEEPSPEED_KEYS = (
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "ds_config",
    "ds_version",
)


@dataclass
class WholeState:
    """A saved run's trainable parameters, each whole, and what DeepSpeed keeps beside them.

    `tensors[name]` holds "fp32" (the master weights) and every partitioned optimizer state by its torch name
    ("exp_avg", "momentum_buffer", ...); `scalars[group]` the state that is not partitioned (AdamW's "step").
    """

    tensors: dict[str, dict[str, torch.Tensor]]
    scalars: list[dict[str, Any]]
    param_groups: list[dict[str, Any]]  # the base optimizer's group settings, as saved
    optimizer_settings: dict[str, Any]
    model_states: dict[str, Any]  # rank 0's: step counters, buffers, frozen parameters, client state
    frozen: dict[str, torch.Tensor]  # ZeRO-3's frozen (requires_grad=False) parameters, whole


# ------------------------------------------------------------------------------------------------------------
# Saved partitions -> whole parameters


def _load(path: Path) -> dict[str, Any]:
    # DeepSpeed pickles its LossScaler objects, so these files need the full unpickler; they are the run's own.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _optimizer_file(tag_dir: Path, rank: int) -> Path:
    matches = sorted(tag_dir.glob(OPTIMIZER_STATES.format(rank=rank)))
    if len(matches) != 1:
        raise FileNotFoundError(f"{tag_dir}: expected one optimizer partition of rank {rank}, found {len(matches)}")
    return matches[0]


def _split_group_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A flat partition's optimizer state -> (partitioned tensors, scalars such as AdamW's 0-d `step`)."""
    partitioned = {key: value for key, value in state.items() if torch.is_tensor(value) and value.dim() > 0}
    return partitioned, {key: value for key, value in state.items() if key not in partitioned}


def _group_states(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The torch state of each param group's one flat partition, in group order."""
    return [base["state"].get(group["params"][0], {}) for group in base["param_groups"]]


def load_whole_state(tag_dir: Path, *, saved_world_size: int, zero_stage: int) -> WholeState:
    """Rebuild every trainable parameter's fp32 value and optimizer state from a ZeRO 1-3 tag saved by N ranks."""
    if zero_stage == 3:
        model_files = [_load(tag_dir / MODEL_STATES_ZERO3.format(rank=rank)) for rank in range(saved_world_size)]
    else:
        model_files = [_load(tag_dir / MODEL_STATES_ZERO12)]
    optimizer_files = [
        _load(_optimizer_file(tag_dir, rank))["optimizer_state_dict"] for rank in range(saved_world_size)
    ]
    first = optimizer_files[0]
    base_key = "optimizer_state_dict" if zero_stage == 3 else "base_optimizer_state"
    shapes = {name: shape for group in model_files[0]["param_shapes"] for name, shape in group.items()}
    if zero_stage == 3:
        tensors = _whole_from_zero3(optimizer_files, shapes)
    else:
        tensors = _whole_from_zero12(optimizer_files, shapes)
    return WholeState(
        tensors=tensors,
        scalars=[_split_group_state(state)[1] for state in _group_states(first[base_key])],
        param_groups=first[base_key]["param_groups"],
        optimizer_settings={key: first[key] for key in OPTIMIZER_SETTINGS if key in first},
        model_states=model_files[0],
        frozen=_whole_frozen_zero3(model_files) if zero_stage == 3 else {},
    )


def _whole_from_zero12(rank_states: list[dict[str, Any]], shapes: dict[str, torch.Size]) -> dict[str, dict]:
    """ZeRO 1/2: each rank holds the next slice of every group's flat buffer; its `param_slice_mappings` say which
    parameter each piece belongs to (what `ds_to_universal` reads too)."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for saved in rank_states:  # in rank order, so each parameter's pieces come in order
        states = _group_states(saved["base_optimizer_state"])
        for group, mapping in enumerate(saved["param_slice_mappings"]):
            flats = {"fp32": saved["single_partition_of_fp32_groups"][group], **_split_group_state(states[group])[0]}
            for name, fragment in mapping.items():
                for key, flat in flats.items():
                    pieces[name][key].append(flat.narrow(0, fragment.start, fragment.numel))
    return {
        name: {key: torch.cat(parts).view(shapes[name]) for key, parts in by_key.items()}
        for name, by_key in pieces.items()
    }


def _zero3_partition_numel(numel: int, world_size: int) -> int:
    """ZeRO-3 gives every rank ceil(numel / world) elements of each parameter, zero-padded on the last ranks."""
    return -(-numel // world_size)


def _whole_from_zero3(rank_states: list[dict[str, Any]], shapes: dict[str, torch.Size]) -> dict[str, dict]:
    """ZeRO-3: each rank's flat buffer is its slice of every parameter in turn (the walk of zero_to_fp32)."""
    world_size = len(rank_states)
    flats_per_rank = []
    for saved in rank_states:  # sub-groups concatenated: parameter order runs across them
        states = [_split_group_state(state)[0] for state in _group_states(saved["optimizer_state_dict"])]
        flats = {"fp32": torch.cat(list(saved["fp32_flat_groups"]))}
        flats.update({key: torch.cat([state[key] for state in states]) for key in states[0]})
        flats_per_rank.append(flats)
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        part = _zero3_partition_numel(shape.numel(), world_size)
        tensors[name] = {
            key: torch.cat([flats[key].narrow(0, offset, part) for flats in flats_per_rank])[: shape.numel()].view(
                shape
            )
            for key in flats_per_rank[0]
        }
        offset += part
    if offset != flats_per_rank[0]["fp32"].numel():
        raise ValueError(f"ZeRO-3 partitions hold {flats_per_rank[0]['fp32'].numel()} elements, the shapes {offset}")
    return tensors


def _whole_frozen_zero3(model_files: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """ZeRO-3 partitions frozen parameters (Ultralytics' DFL projection) too; each rank saved its own slice."""
    shapes = model_files[0].get("frozen_param_shapes") or {}
    return {
        name: torch.cat([files["frozen_param_fragments"][name].flatten() for files in model_files])[
            : shape.numel()
        ].view(shape)
        for name, shape in shapes.items()
    }


# ------------------------------------------------------------------------------------------------------------
# Whole parameters -> this rank's partitions, through DeepSpeed's own loader


def _zero12_partitions(optimizer, whole: WholeState) -> list[dict[str, torch.Tensor]]:
    """This rank's flat partition of each group, for every state, laid out by the fragment map DeepSpeed built."""
    partitions = []
    for group, params in enumerate(optimizer.bit16_groups):
        size = optimizer.single_partition_of_fp32_groups[group].numel()
        keys = next(iter(whole.tensors.values())).keys()
        flats = {key: torch.zeros(size, dtype=torch.float32) for key in keys}
        for param in params:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:
                continue  # no element of it on this rank
            source = mapping.lp_fragment_address
            target = mapping.hp_fragment_address
            for key, flat in flats.items():
                value = whole.tensors[optimizer.param_names[param]][key].flatten()
                flat.narrow(0, target.start, target.numel).copy_(value.narrow(0, source.start, source.numel))
        partitions.append(flats)
    return partitions


def _zero3_slice(value: torch.Tensor, *, world_size: int, rank: int) -> torch.Tensor:
    part = _zero3_partition_numel(value.numel(), world_size)
    return F.pad(value.flatten(), (0, part * world_size - value.numel())).narrow(0, rank * part, part)


def _zero3_partitions(optimizer, whole: WholeState) -> list[dict[str, torch.Tensor]]:
    """This rank's flat partition of each sub-group: its slice of every parameter in turn."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    partitions = []
    for group, params in enumerate(optimizer.fp16_groups):
        slices: dict[str, list[torch.Tensor]] = defaultdict(list)
        for param in params:
            for key, value in whole.tensors[optimizer.param_names[param]].items():
                slices[key].append(_zero3_slice(value, world_size=world_size, rank=rank))
        flats = {key: torch.cat(parts) for key, parts in slices.items()}
        expected = optimizer.fp32_partitioned_groups_flat[group].numel()
        if flats["fp32"].numel() != expected:
            raise ValueError(f"ZeRO-3 sub-group {group}: rebuilt {flats['fp32'].numel()} elements, expected {expected}")
        partitions.append(flats)
    return partitions


def _rank_state_dict(optimizer, whole: WholeState, partitions: list[dict[str, torch.Tensor]], *, zero_stage: int):
    """This rank's optimizer state in the format DeepSpeed saves it, built on the fresh engine's own state_dict."""
    template = optimizer.state_dict()
    base_key, fp32_key = (
        ("optimizer_state_dict", "fp32_flat_groups")
        if zero_stage == 3
        else ("base_optimizer_state", "single_partition_of_fp32_groups")
    )
    base = template[base_key]
    unpadded_sizes = [flat.numel() for flat in template[fp32_key]]  # ZeRO 1/2 save the last rank's without padding
    template[fp32_key] = [flats["fp32"][:size] for flats, size in zip(partitions, unpadded_sizes)]
    for group, (settings, flats) in enumerate(zip(base["param_groups"], partitions)):
        states = {key: value for key, value in flats.items() if key != "fp32"}
        base["state"][settings["params"][0]] = {**whole.scalars[group], **states}
        settings.update({key: value for key, value in whole.param_groups[group].items() if key != "params"})
    template.update({key: value for key, value in whole.optimizer_settings.items() if key in template})
    return template


def load_resharded(engine, tag_dir: Path, *, saved_world_size: int) -> dict[str, Any]:
    """Load a ZeRO 1-3 tag saved by `saved_world_size` ranks into `engine` (every rank); returns the client state.

    Every rank reads all saved partitions (a few hundred MB for the largest YOLO with AdamW).
    """
    zero_stage = engine.zero_optimization_stage()
    whole = load_whole_state(tag_dir, saved_world_size=saved_world_size, zero_stage=zero_stage)
    optimizer = engine.optimizer
    if zero_stage == 3:
        optimizer.checkpoint_event_prologue()  # every parameter partitioned, as DeepSpeed's loader wants
        partitions = _zero3_partitions(optimizer, whole)
        _load_zero3_buffers_and_frozen(engine, whole)
    else:
        # the 16-bit (or fp32) model weights, frozen weights and buffers, as DeepSpeed's own loader restores them
        engine.module.load_state_dict(whole.model_states["module"])
        partitions = _zero12_partitions(optimizer, whole)
    rank_state = _rank_state_dict(optimizer, whole, partitions, zero_stage=zero_stage)
    # DeepSpeed's loader indexes the list by this rank's data-parallel rank
    optimizer.load_state_dict(
        [rank_state] * dist.get_world_size(), load_optimizer_states=True, load_from_fp32_weights=True
    )
    if zero_stage == 3:
        optimizer.checkpoint_event_epilogue()  # gathers the persistent (small) parameters again
    saved = whole.model_states
    engine.global_steps = saved["global_steps"]
    engine.global_samples = saved.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = saved["skipped_steps"]
    return {key: value for key, value in saved.items() if key not in DEEPSPEED_KEYS}


def _load_zero3_buffers_and_frozen(engine, whole: WholeState) -> None:
    """ZeRO-3 keeps buffers whole on every rank; frozen parameters are partitioned like the others."""
    saved_module = whole.model_states["module"]
    rank, world_size = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in saved_module:
                buffer.copy_(saved_module[name])
        for name, param in engine.module.named_parameters():
            if name in whole.frozen:
                param.ds_tensor.copy_(_zero3_slice(whole.frozen[name], world_size=world_size, rank=rank))


# ------------------------------------------------------------------------------------------------------------
# yolods' own per-rank state


def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One rank's yolods state from the N saved ones.

    BatchNorm statistics of the model and the EMA are averaged over the saved ranks, as the end of every epoch
    does (mid-epoch each rank's differ; at an epoch's end they are already equal). The running train-loss sums
    cover the same number of batches on every rank (the global batch is kept), so their mean continues the
    epoch's mean loss. The fp16 GradScaler is rank 0's: ranks step it together on all-reduced gradients. The data's
    random state (sampler and augmentation streams, one per rank) has no counterpart on another number of ranks:
    it is dropped, and the data goes on from the seed's streams (the global batch and epoch position are kept).
    """

    def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
        if all(torch.equal(tensor, tensors[0]) for tensor in tensors):
            return tensors[0]  # exactly, where a mean of equal values could round
        return torch.stack([tensor.float() for tensor in tensors]).mean(0).to(tensors[0].dtype)

    loss_sums = [state["loss_sums"] for state in states]
    return {
        "module_buffers": [mean(list(group)) for group in zip(*(state["module_buffers"] for state in states))],
        "ema_buffers": [mean(list(group)) for group in zip(*(state["ema_buffers"] for state in states))],
        "loss_sums": None if loss_sums[0] is None else mean(loss_sums),
        "grad_scaler": states[0]["grad_scaler"],
        "data": None,
    }


def reshard_note(tag: str, saved_world_size: int, zero_stage: int, batch) -> str:
    """The one line that says a checkpoint of another number of ranks was converted, and how (`batch`: BatchPlan)."""
    world_size = dist.get_world_size()
    how = (
        "the whole model and optimizer state loaded on every rank"
        if zero_stage == 0
        else f"ZeRO-{zero_stage} partitions of weights and optimizer state re-split exactly"
    )
    return (
        f"Resharded {tag} from {saved_world_size} to {dist.ranks_phrase(world_size)}: {how}, global batch "
        f"{batch.global_batch} kept ({batch.micro_batch}/rank), BatchNorm statistics averaged over the saved ranks"
    )
