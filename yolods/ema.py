"""The weights' exponential moving average: Ultralytics' ModelEMA, made safe for DeepSpeed, partitioned at ZeRO-3.

Ultralytics validates and saves the EMA, not the trained weights, so the EMA must follow the model exactly at
every stage. At ZeRO 0-2 every rank holds the whole model and so the whole EMA. At ZeRO-3 a rank holds only its
slice of each parameter (`param.ds_tensor`), and an EMA kept whole would cost every rank 4 bytes per parameter
plus an all-gather of the model after every step: the memory and the traffic ZeRO-3 exists to avoid. So there
each rank averages its own slices (`partition_like`), and the whole EMA is assembled only where it is read,
for validation and saving, once per epoch or checkpoint (`gathered`).

    >>> ema = build_ema(model)  # before deepspeed.initialize: ZeRO-3 empties the parameters
    >>> ema.partition_like(engine.module, device=engine.device)  # ZeRO-3 only, after initialize
    >>> ema.update(engine.module)  # after every optimizer step: no communication
    >>> with ema.gathered() as ema_model:  # every rank enters together
    ...     metrics = validator(ema_model)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _floating_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The entries ModelEMA averages: floating-point parameters and buffers, by state_dict name."""
    return {name: tensor for name, tensor in module.state_dict().items() if tensor.dtype.is_floating_point}


def build_ema(model: nn.Module):
    """Ultralytics' ModelEMA, made safe for DeepSpeed; build it before `deepspeed.initialize`.

    ZeRO-3 empties parameters at initialize, so the copy must be taken before, and `partition_like` called after
    (yolods.build does both). Returns an EMA whose `update` takes the DeepSpeed engine's module.
    """
    from ultralytics.utils.torch_utils import ModelEMA

    class DeepSpeedModelEMA(ModelEMA):
        def __init__(self, model: nn.Module):
            super().__init__(model)
            self._partition: _Partition | None = None
            self._gathered_depth = 0
            self._bound: tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]] | None = None

        def update(self, module: nn.Module) -> None:
            """Ultralytics' update (a lerp of every floating tensor, `ModelEMA.update`) from `module` as it is now.

            ModelEMA caches the module's tensors on its first update, but DeepSpeed reassigns `param.data` into its
            flat buffers (and to half precision under a bf16/fp16 section), so cached tensors would go stale
            silently. The module's Parameter and buffer objects are bound instead and read afresh every update
            (ZeRO-3: each parameter's `ds_tensor`, this rank's slice), cast to the EMA's fp32 where they differ.
            """
            if self._bound is None or self._bound[0] is not module:
                targets, sources = self._partition.bind(module) if self._partition else self._bind(module)
                self._bound = module, targets, sources
            _, targets, sources = self._bound
            current = [getattr(source, "ds_tensor", source).detach() for source in sources]
            self._pairs = targets, [value.to(target.dtype) for value, target in zip(current, targets)]
            super().update(module)

        def _bind(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            """(EMA tensors, the module's Parameter and buffer objects) by state_dict name."""
            tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            ema_state = _floating_state(self.ema)
            return list(ema_state.values()), [tensors[name] for name in ema_state]

        def partition_like(self, module: nn.Module, *, device: torch.device) -> None:
            """ZeRO-3: keep only this rank's slice of each EMA parameter, laid out as `module`'s `ds_tensor`s,
            and release the whole copy. `device` is where the assembled EMA lives (the training device)."""
            self._partition = _Partition(self.ema, module, device=device)

        @contextmanager
        def gathered(self) -> Iterator[nn.Module]:
            """The whole EMA model for the block. Under a partition every rank must enter (one all-gather) and the
            whole copy is released on leaving; otherwise it is `self.ema` as it is."""
            if self._partition is None or self._gathered_depth:
                yield self.ema
                return
            self._gathered_depth += 1
            try:
                self._partition.assemble()
                yield self.ema
            finally:
                self._partition.release()
                self._gathered_depth -= 1

        def state_dict(self) -> dict[str, torch.Tensor]:
            """The whole EMA's state_dict, from any stage; under a partition every rank must call it (it gathers,
            unless inside `gathered` already). The tensors stay valid after the whole copy is released."""
            with self.gathered() as ema_model:
                return ema_model.state_dict()

        def load_state_dict(self, state: dict[str, Any]) -> None:
            """Load a whole EMA state_dict (from any world size); under a partition each rank keeps its slices."""
            if self._partition is None:
                self.ema.load_state_dict(state)
            else:
                self._partition.load(state)

        def held_tensors(self) -> list[torch.Tensor]:
            """The tensors this EMA holds between epochs: its slices under a partition, else the whole state."""
            if self._partition is not None:
                return self._partition.held_tensors()
            return list(self.ema.state_dict().values())

    return DeepSpeedModelEMA(model)


class _Partition:
    """This rank's slices of the EMA parameters, laid out as ZeRO-3 lays out `param.ds_tensor`: the flattened
    parameter padded to a multiple of the partition's world size, rank r holding elements [r*P, (r+1)*P)."""

    def __init__(self, ema: nn.Module, module: nn.Module, *, device: torch.device):
        import torch.distributed as torch_dist

        self.ema = ema
        self.device = device
        self.ema_params = dict(ema.named_parameters())
        trained = dict(module.named_parameters())
        self.names = list(self.ema_params)
        self.group = trained[self.names[0]].ds_process_group
        self.world_size = torch_dist.get_world_size(self.group)
        self.rank = torch_dist.get_rank(self.group)
        self.shapes = {name: self.ema_params[name].shape for name in self.names}
        # fp32, on the device ZeRO keeps the parameter's slice (the CPU under offload_param)
        self.slices = {
            name: torch.zeros(
                trained[name].ds_tensor.numel(), dtype=torch.float32, device=trained[name].ds_tensor.device
            )
            for name in self.names
        }
        for name in self.names:
            self._fill(name, self.ema_params[name])
        self.buffer_names = [name for name in _floating_state(ema) if name not in self.ema_params]
        self.release()

    def bind(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA tensors, the module's Parameters and buffers): slices against parameters (read through their
        `ds_tensor`), whole buffers against buffers."""
        trained = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        ema_buffers = dict(self.ema.named_buffers())
        targets = [self.slices[name] for name in self.names] + [ema_buffers[name] for name in self.buffer_names]
        sources = [trained[name] for name in self.names] + [buffers[name] for name in self.buffer_names]
        return targets, sources

    def assemble(self) -> None:
        """All-gather every rank's slices (one collective) into whole EMA parameters on `self.device`."""
        import torch.distributed as torch_dist

        local = torch.cat([self.slices[name] for name in self.names]).to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, local, group=self.group)
        offset = 0
        for name in self.names:
            size = self.slices[name].numel()
            numel = self.shapes[name].numel()
            whole = torch.cat([part[offset : offset + size] for part in parts])[:numel]
            self.ema_params[name].data = whole.view(self.shapes[name]).clone()
            offset += size

    def release(self) -> None:
        """Drop the whole parameters (the slices stay): what keeps the EMA at 4 bytes per parameter / N."""
        for name in self.names:
            param = self.ema_params[name]
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def _fill(self, name: str, whole: torch.Tensor) -> None:
        """This rank's slice of the whole parameter `whole` into `self.slices[name]`; padding past its end is 0."""
        shard = self.slices[name]
        piece = whole.detach().reshape(-1)[self.rank * shard.numel() : (self.rank + 1) * shard.numel()]
        with torch.no_grad():
            shard.zero_()
            shard[: piece.numel()].copy_(piece)

    def load(self, state: dict[str, Any]) -> None:
        for name in self.names:
            self._fill(name, state[name])
        with torch.no_grad():
            ema_buffers = dict(self.ema.named_buffers())
            for name, buffer in ema_buffers.items():
                if name in state:
                    buffer.copy_(state[name])

    def held_tensors(self) -> list[torch.Tensor]:
        return [*self.slices.values(), *self.ema.buffers()]
