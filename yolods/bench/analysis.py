"""What the report computes from results lines: selection, ratios against the baselines, the measured scaling
with its spread, the communication model against the measured 1 -> N rank step and the ZeRO-paper memory check.

Pure functions of the lines; projection.py projects to many GPUs, validation.py checks the communication model on
points it was not fitted to, plots.py draws and report.py writes them out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from yolods.bench.comm_model import (
    PAPER_FP32_ADAM,
    PAPER_MIXED_ADAM,
    CommSpec,
    ComputeTimes,
    Link,
    deepspeed_model_state_bytes,
    estimate_step,
    zero_model_state_bytes,
)

Line = dict[str, Any]
ENGINE_ORDER = ("DDP", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "Ultralytics")
# The EMA update's share of the measured optimizer phase (clipping + optimizer step + EMA), for lines written before
# the bench measured the update itself (`ema_update_s`). CPU: measured here (one thread, AdamW, ModelEMA.update
# against clip_grad_norm_ + step, 10 calls each): 1.8 of 17.4 ms for yolov8n, 6.3 of 56.0 ms for yolov8s. CUDA:
# ASSUMED, as in projection.py's split.
EMA_SHARE_OF_OPTIMIZER = {"cpu": 0.10, "cuda": 0.5}


# ----------------------------------------------------------------------------------------------------------------
# Selecting lines


def engine_name(line: Line) -> str:
    return {"deepspeed": f"ZeRO-{line['zero_stage']}", "ddp": "DDP", "ultralytics": "Ultralytics"}[line["engine"]]


# The config entries that set a series apart, with the value a line written before the entry existed stands for.
SERIES_CONFIG_DEFAULTS = {
    "device": None,
    "reduce_bucket_size": None,
    "allgather_bucket_size": None,
    "overlap_comm": None,
    "channels_last": None,
    "deepspeed_config": None,
    "ema": True,
    "activation_checkpointing": False,
    "communication_dtype": None,
}


def series_key(line: Line, *, leave_out: tuple[str, ...] = ()) -> tuple:
    """A configuration apart from where it ran: lines of one series differ only in ranks and nodes.

    `leave_out` names config entries not to tell apart (the report's option pairs compare across them).
    """
    config = line.get("config") or {}
    return (
        line["engine"],
        line["zero_stage"],
        line["precision"],
        line["model"],
        line["imgsz"],
        line["micro_batch"],
        line["input"],
        *(config.get(key, default) for key, default in SERIES_CONFIG_DEFAULTS.items() if key not in leave_out),
    )


def config_key(line: Line) -> tuple:
    return (*series_key(line), line["world_size"], line["num_nodes"])


def select_lines(lines: Iterable[Line]) -> list[Line]:
    """One line per configuration: from its latest run (`run_id`), the repeat with the median img/s.

    The chosen line gains `repeats`, `imgs_per_s_range` (min, max) and `imgs_per_s_repeats` (in measurement
    order, for ratios paired repeat by repeat), so noise is visible.
    """
    runs: dict[tuple, dict[str, list[Line]]] = {}
    for line in lines:
        runs.setdefault(config_key(line), {}).setdefault(line.get("run_id", line["timestamp"]), []).append(line)
    selected = []
    for by_run in runs.values():
        repeats = max(by_run.values(), key=lambda run: max(line["timestamp"] for line in run))  # the latest run
        repeats = sorted(repeats, key=lambda line: line["timestamp"])
        values = [line["imgs_per_s"] for line in repeats]
        chosen = next(line for line in repeats if line["imgs_per_s"] == statistics.median_low(values))
        selected.append(
            {
                **chosen,
                "repeats": len(repeats),
                "imgs_per_s_range": [min(values), max(values)],
                "imgs_per_s_repeats": values,
            }
        )
    return selected


def default_series(line: Line) -> bool:
    """Lines measured with the config's own bucket, overlap and memory-format settings (sweep variants plot
    elsewhere)."""
    config = line.get("config", {})
    return not config.get("activation_checkpointing") and all(
        config.get(key) is None
        for key in (
            "reduce_bucket_size",
            "allgather_bucket_size",
            "overlap_comm",
            "channels_last",
            "communication_dtype",
        )
    )


def series_label(line: Line) -> str:
    return line.get("label") or f"{engine_name(line)} {line['precision']} {line['model']}@{line['imgsz']}"


def report_order(line: Line) -> tuple:
    """Group rows by model, size, input; then ranks; then DDP, ZeRO 0-3, Ultralytics."""
    return (
        line["model"],
        line["imgsz"],
        line["micro_batch"],
        line["precision"],
        line["input"],
        line["world_size"],
        ENGINE_ORDER.index(engine_name(line)),
        series_label(line),
    )


def _peer(line: Line, lines: list[Line], **fields: Any) -> Line | None:
    """The line matching `line` on model, size, batch, precision, device and place, with `fields` changed."""
    wanted = {
        "model": line["model"],
        "imgsz": line["imgsz"],
        "micro_batch": line["micro_batch"],
        "precision": line["precision"],
        "input": line["input"],
        "world_size": line["world_size"],
        "num_nodes": line["num_nodes"],
        **fields,
    }
    config = line.get("config", {})
    place = (config.get("device"), config.get("channels_last"), config.get("activation_checkpointing", False))
    for other in lines:
        other_config = other.get("config", {})
        other_place = (
            other_config.get("device"),
            other_config.get("channels_last"),
            other_config.get("activation_checkpointing", False),
        )
        if other_place == place and all(other.get(k) == v for k, v in wanted.items()):
            return other
    return None


def ratio_vs(line: Line, lines: list[Line], engine: str) -> float | None:
    """img/s over the baseline's at the same configuration (Ultralytics: one rank, real input only).

    With the same number of repeats on both sides, the median of the ratios repeat by repeat: the k-th repeats
    ran minutes apart under the same machine load, so the pairing cancels most of a shared machine's drift.
    """
    ratios = paired_ratios(line, lines, engine)
    return None if not ratios else statistics.median(ratios)


def paired_ratios(line: Line, lines: list[Line], engine: str) -> list[float]:
    """`ratio_vs`'s ratios one by one: the k-th repeat over the baseline's k-th, or the medians' ratio alone when
    the repeats do not pair up; [] without a baseline."""
    if engine == "ultralytics":
        if line["world_size"] != 1 or line["input"] != "real":
            return []
        peer = _peer(line, lines, engine="ultralytics")
    else:
        peer = _peer(line, lines, engine="ddp")
    if peer is None or peer is line:
        return []
    mine, theirs = line.get("imgs_per_s_repeats", []), peer.get("imgs_per_s_repeats", [])
    if len(mine) > 1 and len(mine) == len(theirs):
        return [a / b for a, b in zip(mine, theirs)]
    return [line["imgs_per_s"] / peer["imgs_per_s"]]


# One-sided 95% quantiles of Student's t by degrees of freedom (tables); above 10, 10's (a slightly wider bound)
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}


def mean_bounds(values: list[float]) -> tuple[float, float] | None:
    """One-sided 95% confidence bounds on the mean of `values` (each bound alone; together a 90% interval),
    treating them as independent draws around it; None for fewer than 3 values, too few to estimate the spread."""
    if len(values) < 3:
        return None
    mean = statistics.fmean(values)
    half_width = _T95[min(len(values) - 1, 10)] * statistics.stdev(values) / len(values) ** 0.5
    return mean - half_width, mean + half_width


# ----------------------------------------------------------------------------------------------------------------
# Scaling measured here, with the spread of the repeats


@dataclass(frozen=True)
class MeasuredScaling:
    """Weak-scaling efficiency 1 -> N ranks of one series: img/s(N) / (N x img/s(1)), with its repeats' spread.

    `low`/`high` pair the worst and best repeats of both lines, so they bound what load drift between the two
    runs could do. Above 100% can be noise (the 1-rank run measured under more load) or less work per rank
    (ZeRO 1-3 update 1/N of the optimizer states); `note` says which the spread allows.
    """

    label: str
    num_ranks: int
    single_imgs_per_s: float
    multi_imgs_per_s: float
    efficiency: float
    low: float
    high: float
    step_ms_added: float
    load_single: float | None  # the 1-minute load average when each line was written
    load_multi: float | None

    @property
    def note(self) -> str:
        if self.efficiency <= 1.0:
            return ""
        if self.low <= 1.0:
            return "above 100% within the repeats' spread: noise"
        return "above 100% beyond the spread: less work per rank, or load that differed between the runs"


def _load(line: Line) -> float | None:
    load = line.get("load_avg")
    return load[0] if load else None


def measured_scaling(lines: list[Line]) -> list[MeasuredScaling]:
    """Every series measured at 1 and N > 1 ranks (DDP and yolods; Ultralytics runs at one rank only)."""
    rows = []
    for line in lines:
        if line["world_size"] == 1 or line["engine"] == "ultralytics":
            continue
        single = next((o for o in lines if series_key(o) == series_key(line) and o["world_size"] == 1), None)
        if single is None:
            continue
        ranks = line["world_size"]
        multi_repeats = line.get("imgs_per_s_repeats") or [line["imgs_per_s"]]
        single_repeats = single.get("imgs_per_s_repeats") or [single["imgs_per_s"]]
        if len(multi_repeats) > 1 and len(multi_repeats) == len(single_repeats):
            # 1- and N-rank invocations alternate (cpu_sweep.sh): pair them in time, as ratio_vs does
            efficiency = statistics.median(m / s for m, s in zip(multi_repeats, single_repeats)) / ranks
        else:
            efficiency = line["imgs_per_s"] / (ranks * single["imgs_per_s"])
        rows.append(
            MeasuredScaling(
                label=series_label(line),
                num_ranks=ranks,
                single_imgs_per_s=single["imgs_per_s"],
                multi_imgs_per_s=line["imgs_per_s"],
                efficiency=efficiency,
                low=min(multi_repeats) / (ranks * max(single_repeats)),
                high=max(multi_repeats) / (ranks * min(single_repeats)),
                step_ms_added=(line["step_time_s"]["mean"] - single["step_time_s"]["mean"]) * 1e3,
                load_single=_load(single),
                load_multi=_load(line),
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The communication model against the measured 1 -> N rank step


@dataclass(frozen=True)
class TwoRankCheck:
    """The communication model's step at N ranks, calibrated on the 1-rank line, against the measured one.

    The ranks of this machine slow each other's compute, which the model leaves out; the forward pass, which
    communicates nothing outside ZeRO-3, measures that slowdown. `forward_slowdown` is this line's own, so a
    prediction that uses it is fitted to the very line it predicts; `heldout_slowdown` is the median of the
    other series' slowdowns, and the prediction with it is checked on a line it was not fitted to.
    """

    label: str
    num_ranks: int
    compute_s: float
    predicted_step_s: float
    measured_step_s: float
    predicted_comm_s: float
    forward_slowdown: float
    predicted_slowed_step_s: float  # every compute phase slowed by forward_slowdown (fitted to this line)
    heldout_slowdown: float | None
    predicted_heldout_step_s: float | None  # slowed by heldout_slowdown (not fitted to this line)

    @property
    def error(self) -> float:
        return self.predicted_step_s / self.measured_step_s - 1

    @property
    def slowed_error(self) -> float:
        return self.predicted_slowed_step_s / self.measured_step_s - 1

    @property
    def heldout_error(self) -> float | None:
        if self.predicted_heldout_step_s is None:
            return None
        return self.predicted_heldout_step_s / self.measured_step_s - 1


def compute_times(line: Line) -> ComputeTimes | None:
    """The line's mean phases as the model's compute; its optimizer phase split into the partitionable update
    and the EMA: by the EMA update the line measured (`ema_update_s`), or for lines without it by
    EMA_SHARE_OF_OPTIMIZER for the line's device."""
    breakdown = line.get("breakdown_s")
    if not breakdown:
        return None
    measured = line.get("ema_update_s")
    if measured is not None:
        ema_s = min(measured, breakdown["optimizer"])
    else:
        share = EMA_SHARE_OF_OPTIMIZER.get(line.get("config", {}).get("device"), EMA_SHARE_OF_OPTIMIZER["cuda"])
        ema_s = breakdown["optimizer"] * share
    return ComputeTimes(
        forward_s=breakdown["forward"],
        backward_s=breakdown["backward"],
        optimizer_s=breakdown["optimizer"] - ema_s,
        ema_s=ema_s,
        data_s=breakdown["data_wait"],
    )


def spec_from_line(line: Line) -> CommSpec | None:
    """The line's communication spec, read with today's model: a field the model has since dropped (lines before
    ZeRO-3's partitioned EMA carry `ema_gather_calls`) is left out, so committed results still render."""
    comm = line.get("comm")
    if not comm:
        return None
    known = {field.name for field in fields(CommSpec)}
    return CommSpec(**{name: value for name, value in comm["spec"].items() if name in known})


def probed_links(line: Line) -> dict[str, Link] | None:
    probe = line.get("interconnect", {}).get("probe")
    if not probe:
        return None
    return {op: Link(fit["bandwidth_bytes_per_s"], fit["latency_s"]) for op, fit in probe["ops"].items()}


def _slowed(compute: ComputeTimes, factor: float) -> ComputeTimes:
    return ComputeTimes(**{name: value * factor for name, value in vars(compute).items()})


def two_rank_checks(lines: list[Line]) -> list[TwoRankCheck]:
    """For every series measured at 1 and N > 1 ranks on one node: predicted vs measured step (mean)."""
    cases = []
    for line in lines:
        if line["world_size"] < 2 or line["num_nodes"] != 1 or line["engine"] == "ultralytics":
            continue
        single = next((o for o in lines if series_key(o) == series_key(line) and o["world_size"] == 1), None)
        links, spec = probed_links(line), spec_from_line(line)
        compute = compute_times(single) if single else None
        if compute is None or links is None or spec is None:
            continue
        slowdown = line["breakdown_s"]["forward"] / single["breakdown_s"]["forward"]
        cases.append((line, compute, links, spec, slowdown))

    def predict(line: Line, compute: ComputeTimes, links: dict[str, Link], spec: CommSpec):
        # DeepSpeed on CPU has no side streams: its reductions block backward. DDP's gloo all-reduce runs on
        # gloo's own thread and can overlap; on GPUs both overlap.
        on_cpu = line.get("config", {}).get("device") == "cpu"
        return estimate_step(
            compute,
            spec,
            num_ranks=line["world_size"],
            link=links["all_reduce"],
            op_links=links,
            can_overlap=line["engine"] == "ddp" or not on_cpu,
        )

    checks = []
    for index, (line, compute, links, spec, slowdown) in enumerate(cases):
        others = [other[4] for j, other in enumerate(cases) if j != index]
        heldout = statistics.median(others) if others else None
        estimate = predict(line, compute, links, spec)
        heldout_step = predict(line, _slowed(compute, heldout), links, spec).step_s if heldout else None
        checks.append(
            TwoRankCheck(
                label=series_label(line),
                num_ranks=line["world_size"],
                compute_s=compute.total_s,
                predicted_step_s=estimate.step_s,
                measured_step_s=line["step_time_s"]["mean"],
                predicted_comm_s=estimate.comm_s,
                forward_slowdown=slowdown,
                predicted_slowed_step_s=predict(line, _slowed(compute, slowdown), links, spec).step_s,
                heldout_slowdown=heldout,
                predicted_heldout_step_s=heldout_step,
            )
        )
    return checks


# ----------------------------------------------------------------------------------------------------------------
# Model-state memory against the ZeRO paper


@dataclass(frozen=True)
class PeakAgainstZero0:
    """A partitioned stage's model states and peak memory per rank against ZeRO-0 (and DDP) at the same
    configuration: what partitioning saved in states, and what the peak did."""

    label: str
    num_ranks: int
    states_delta_bytes: int
    peak_delta_bytes: int
    peak_ratio: float  # peak over ZeRO-0's
    peak_ratio_vs_ddp: float | None


def peak_against_zero0(lines: list[Line]) -> list[PeakAgainstZero0]:
    """Every default ZeRO 1-3 line with a ZeRO-0 peer of the same model, size, batch, precision, input, ranks."""
    rows = []
    for line in lines:
        if line["engine"] != "deepspeed" or not line["zero_stage"] or not default_series(line):
            continue
        zero0 = _peer(line, lines, engine="deepspeed", zero_stage=0)
        if (
            zero0 is None
            or not default_series(zero0)
            or not (line.get("model_state_bytes") and zero0.get("model_state_bytes"))
        ):
            continue
        ddp = _peer(line, lines, engine="ddp")
        rows.append(
            PeakAgainstZero0(
                label=series_label(line),
                num_ranks=line["world_size"],
                states_delta_bytes=line["model_state_bytes"]["total"] - zero0["model_state_bytes"]["total"],
                peak_delta_bytes=line["peak_mem_bytes"] - zero0["peak_mem_bytes"],
                peak_ratio=line["peak_mem_bytes"] / zero0["peak_mem_bytes"],
                peak_ratio_vs_ddp=line["peak_mem_bytes"] / ddp["peak_mem_bytes"] if ddp else None,
            )
        )
    return rows


@dataclass(frozen=True)
class MemoryCheck:
    """Measured model-state bytes of one line against DeepSpeed's and the paper's formulas."""

    label: str
    num_ranks: int
    stage: int
    measured: dict[str, int]
    deepspeed_formula: float
    paper_fp32: float
    paper_mixed: float
    ema_formula: float  # fp32: 4 bytes per parameter, / N at ZeRO-3 (yolods.ema partitions it like the parameters)
    ema_update_s: float | None = None


def memory_checks(lines: list[Line]) -> list[MemoryCheck]:
    """Measured model-state bytes per rank of every DeepSpeed line against the formulas."""
    checks = []
    for line in lines:
        states, num_params = line.get("model_state_bytes"), line.get("num_params")
        if line["engine"] != "deepspeed" or not states or not num_params:
            continue
        optimizer = line["config"].get("train_settings", {}).get("optimizer", "AdamW")
        stage, ranks = line["zero_stage"], line["world_size"]
        checks.append(
            MemoryCheck(
                label=series_label(line),
                num_ranks=ranks,
                stage=stage,
                measured=states,
                deepspeed_formula=deepspeed_model_state_bytes(
                    stage=stage, num_params=num_params, num_ranks=ranks, optimizer=optimizer
                ),
                paper_fp32=zero_model_state_bytes(
                    stage=stage, num_params=num_params, num_ranks=ranks, state=PAPER_FP32_ADAM
                ),
                paper_mixed=zero_model_state_bytes(
                    stage=stage, num_params=num_params, num_ranks=ranks, state=PAPER_MIXED_ADAM
                ),
                ema_formula=4 * num_params / (ranks if stage == 3 else 1),
                ema_update_s=line.get("ema_update_s"),
            )
        )
    return checks
