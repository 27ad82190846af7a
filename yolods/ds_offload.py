"""ZeRO-Offload settings DeepSpeed 0.19.8 refuses deep inside `deepspeed.initialize`, or silently ignores.

Found by running each on this machine (CPU accelerator, gloo); ds_validation reports them in one line before any
process group exists, instead of a traceback from every rank (or a run that quietly offloads nothing):

- `offload_optimizer` to cpu/nvme with a torch optimizer: DeepSpeed raises ZeRORuntimeException at initialize
  unless `zero_force_ds_cpu_optimizer` is false, because it wants its own DeepSpeedCPUAdam. yolods always hands
  it Ultralytics' SGD/AdamW groups, so offload needs that key (the shipped offload configs set it).
- `offload_optimizer` at ZeRO-0 and `offload_param` at ZeRO 0-2: accepted and ignored (nothing moves).
- device `nvme`: needs DeepSpeed's async_io op (libaio); where it cannot build, initialize raises RuntimeError.
"""

from __future__ import annotations

from typing import Any

OFFLOAD_DEVICES = ("cpu", "nvme")


def offload_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the offload settings of a DeepSpeed config (one line), or None."""
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        return None
    optimizer_device = _device(zero.get("offload_optimizer"))
    param_device = _device(zero.get("offload_param"))
    stage = zero.get("stage")  # only a stage the file states: without one, --zero decides later
    if optimizer_device and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        return (
            'zero_optimization.offload_optimizer needs "zero_force_ds_cpu_optimizer": false with yolods: DeepSpeed '
            "otherwise refuses any optimizer but its DeepSpeedCPUAdam, and yolods trains Ultralytics' SGD/AdamW; add "
            "the key (ds_configs/zero2_offload_bf16.json has it)"
        )
    if optimizer_device and stage == 0:
        return "zero_optimization.offload_optimizer at stage 0: DeepSpeed ignores it there; use stage 1, 2 or 3"
    if param_device and stage in (0, 1, 2):
        return (
            f"zero_optimization.offload_param at stage {stage}: DeepSpeed offloads parameters at stage 3 only and "
            "ignores it here; use stage 3 (ds_configs/zero3_offload_bf16.json) or drop offload_param"
        )
    if "nvme" in (optimizer_device, param_device) and not _async_io_builds():
        return (
            'zero_optimization offload to "nvme" needs DeepSpeed\'s async_io op, which cannot build here '
            '(libaio and its headers missing?): install libaio-dev, or offload to "cpu"'
        )
    return None


def _device(section: Any) -> str | None:
    """The offload device a section names, if it offloads at all ("none" and absent sections do not)."""
    if not isinstance(section, dict):
        return None
    device = str(section.get("device", "none")).lower()
    return device if device in OFFLOAD_DEVICES else None


def _async_io_builds() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return bool(AsyncIOBuilder().is_compatible(verbose=False))
