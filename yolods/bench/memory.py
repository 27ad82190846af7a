"""Memory per rank: the peak (CUDA max allocated, or resident set size on CPU) and the model-state bytes.

Model states are what ZeRO partitions: parameters, gradients and optimizer states. They are counted by walking
the tensors the module and the (DeepSpeed or torch) optimizer hold, each storage once, so views into DeepSpeed's
flat buffers are not counted twice. The EMA of the weights is counted beside them (not in `total`, which is what
the ZeRO paper's formula covers): 4 bytes per parameter at ZeRO 0-2, 4 / N at ZeRO-3, which partitions it.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Peak memory of this process since `reset()`.

    CUDA: torch.cuda.max_memory_allocated. CPU: Linux's VmHWM, which writing 5 to /proc/self/clear_refs resets,
    so each configuration gets its own peak in a process that measures several; where that is impossible,
    ru_maxrss (the process-lifetime peak) and `source` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"

    def reset(self) -> None:
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.init()  # the allocator's stats exist once CUDA is up: before that, "Invalid device argument"
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.source = "ru_maxrss_process_lifetime"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.source == "rss_peak":
            match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
            if match:
                return int(match.group(1)) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


def release_memory() -> None:
    """Free what the last configuration left: Python garbage, the CUDA cache, glibc's retained heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # else RSS keeps the previous configuration's freed pages
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes of model states this rank holds; `in_host_memory` is the part of them in CPU memory (on a GPU run,
    what ZeRO-Offload moved off the device; on a CPU run, all of it)."""

    params: int
    grads: int
    optimizer: int
    in_host_memory: int = 0
    ema: int = 0  # the EMA's slices (ZeRO-3) or whole copy, with its BatchNorm buffers; not in `total`

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors inside containers (lists, tuples, dict values, optimizers), not inside arbitrary objects."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 4:
        return
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)
    elif isinstance(value, torch.optim.Optimizer):
        yield from _tensors(value.state, depth + 1)  # the base optimizer's moments
        yield from _tensors(value.param_groups, depth + 1)


class _StorageCounter:
    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.in_host_memory = 0

    def add(self, tensor: torch.Tensor | None) -> int:
        """Bytes of `tensor`'s storage if not counted yet, else 0."""
        if tensor is None or tensor.numel() == 0 or tensor.device.type == "meta":
            return 0
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in self.seen:
            return 0
        self.seen.add(key)
        if tensor.device.type == "cpu":
            self.in_host_memory += storage.nbytes()
        return storage.nbytes()


def _holds_grads(attribute: str) -> bool:
    """DeepSpeed's gradient buffers: averaged_gradients, grads_in_partition, ipg_buffer, grad_partitions_flat_buffer."""
    lowered = attribute.lower()
    return "grad" in lowered or "ipg" in lowered


def model_state_bytes(
    module: nn.Module, optimizer: Any, *, ema_tensors: Iterable[torch.Tensor] = ()
) -> ModelStateBytes:
    """Parameters, gradients and optimizer states this rank holds; call it between backward and step.

    Parameters: the module's (under ZeRO-3 the local partition `ds_tensor`, plus any gathered or persistent full
    copy). Gradients: `.grad` plus the optimizer wrapper's gradient buffers (attributes named *grad* or *ipg*,
    DeepSpeed's reduction buckets). Optimizer states: every other tensor the optimizer or its wrapper holds
    (ZeRO's fp32 master partitions, the torch optimizer's moments). `ema_tensors`: what the EMA holds
    (yolods.ema's `held_tensors()`).
    """
    counter = _StorageCounter()
    params = sum(
        counter.add(getattr(param, "ds_tensor", None)) + counter.add(param.data) for param in module.parameters()
    )
    grads = sum(counter.add(param.grad) for param in module.parameters())
    optimizer_bytes = 0
    # A DeepSpeed ZeRO wrapper holds its buffers as attributes; a plain torch optimizer only its state.
    attributes = [] if isinstance(optimizer, torch.optim.Optimizer) else list(vars(optimizer).items())
    for name, value in attributes:
        if _holds_grads(name):
            grads += sum(counter.add(tensor) for tensor in _tensors(value))
    for name, value in attributes:
        if not _holds_grads(name):
            optimizer_bytes += sum(counter.add(tensor) for tensor in _tensors(value))
    base = optimizer if isinstance(optimizer, torch.optim.Optimizer) else getattr(optimizer, "optimizer", None)
    if isinstance(base, torch.optim.Optimizer):
        optimizer_bytes += sum(counter.add(tensor) for tensor in _tensors(base))
    ema = sum(counter.add(tensor) for tensor in ema_tensors)
    return ModelStateBytes(
        params=params, grads=grads, optimizer=optimizer_bytes, in_host_memory=counter.in_host_memory, ema=ema
    )
