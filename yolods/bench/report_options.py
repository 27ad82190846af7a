"""The report's "Memory and communication options" section: each option against the same line without it.

Options are what a user turns on to fit a larger batch or image, or to send fewer bytes: activation
checkpointing (`--activation-checkpointing on`), ZeRO-Offload (a DeepSpeed JSON with offload_optimizer /
offload_param, such as ds_configs/zero2_offload_bf16.json) and the gradients' communication dtype
(`--communication-dtype`). A line is compared with the line that differs from it in that one option only, so
each row reads as that option's cost in step time and its effect on peak memory.
"""

from __future__ import annotations

from typing import Any

from yolods.bench.analysis import Line, series_key, series_label
from yolods.bench.markdown import mib, table

OPTIONS = ("activation checkpointing", "offload", "communication dtype")
# The value a line is compared with, in order of preference: the default, or for the communication dtype an explicit
# fp32 (what torch_autocast's fp32 gradients are sent in by default).
COMPARED_WITH = {"activation checkpointing": (False,), "offload": (None,), "communication dtype": (None, "fp32")}


def _offload(line: Line) -> str | None:
    """What the line's DeepSpeed config offloads to CPU memory: optimizer, optimizer+params, params, or None."""
    zero = ((line.get("config") or {}).get("resolved_deepspeed_config") or {}).get("zero_optimization", {})
    moved = [
        name
        for name, key in (("optimizer", "offload_optimizer"), ("params", "offload_param"))
        if str((zero.get(key) or {}).get("device", "none")) in ("cpu", "nvme")
    ]
    return "+".join(moved) or None


def options_of(line: Line) -> dict[str, Any]:
    """The line's options; the defaults are False / None."""
    config = line.get("config") or {}
    return {
        "activation checkpointing": bool(config.get("activation_checkpointing")),
        "offload": _offload(line),
        "communication dtype": config.get("communication_dtype"),
    }


def _identity(line: Line) -> tuple:
    """Everything that must match between a line and its comparison, apart from the options and the JSON's name."""
    options = ("deepspeed_config", "activation_checkpointing", "communication_dtype")
    return (*series_key(line, leave_out=options), line["world_size"], line["num_nodes"])


def option_pairs(lines: list[Line]) -> list[tuple[str, Line, Line]]:
    """(option, line without it, line with it) for every line that turns an option on and has its comparison."""
    pairs = []
    for line in lines:
        if line["engine"] == "ultralytics":
            continue
        options = options_of(line)
        for option in OPTIONS:
            if not options[option] or options[option] in COMPARED_WITH[option]:
                continue
            candidates = [
                other
                for default in COMPARED_WITH[option]
                for other in lines
                if _identity(other) == _identity(line) and options_of(other) == {**options, option: default}
            ]
            if candidates:
                pairs.append((option, candidates[0], line))
    return pairs


def options_section(lines: list[Line]) -> list[str]:
    pairs = option_pairs(lines)
    if not pairs:
        return []
    rows = []
    for option, without, with_option in pairs:
        value = options_of(with_option)[option]
        states = with_option.get("model_state_bytes") or {}
        rows.append(
            [
                series_label(without),
                f"{option}: {value}" if option != "activation checkpointing" else option,
                f"{with_option['imgs_per_s'] / without['imgs_per_s']:.2f}x",
                f"{without['step_time_s']['median'] * 1e3:.0f} -> {with_option['step_time_s']['median'] * 1e3:.0f}",
                f"{mib(without['peak_mem_bytes'])} -> {mib(with_option['peak_mem_bytes'])}",
                mib(states.get("in_host_memory")) if option == "offload" else "-",
            ]
        )
    return [
        "## Memory and communication options",
        "",
        "Each row: a line with one option on, against the line that differs from it in that option only.",
        "Peak: MiB per rank (CUDA: max allocated, which leaves out what offload moved to CPU memory; CPU: peak",
        "resident set, where offload moves nothing off the device and only adds copies). Model states in host memory:",
        "MiB of parameters, gradients, optimizer states and the EMA in CPU memory mid-step (all of them on a CPU run).",
        "",
        *table(
            ["configuration", "option", "img/s with / without", "step ms", "peak MiB/rank", "states in host MiB"], rows
        ),
        "",
    ]
