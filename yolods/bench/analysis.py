"""What the report computes from results lines: selection, baselines ratios, the communication model against
the measured 1 -> N rank step, the cluster projection and the ZeRO-paper memory check.

Pure functions of the lines (and of the goal model's structure, for the projection); plots.py draws them and
report.py writes them out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from yolods.bench.comm_model import (
    NETWORK_LATENCY_S,
    PAPER_FP32_ADAM,
    PAPER_MIXED_ADAM,
    CommSpec,
    ComputeTimes,
    Link,
    ScalingPoint,
    deepspeed_model_state_bytes,
    estimate_step,
    h100_cluster,
    project_scaling,
    zero_model_state_bytes,
)

Line = dict[str, Any]
NODE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENGINE_ORDER = ("DDP", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "Ultralytics")
# Assumed split of a GPU step's compute when no GPU line calibrates it: backward ~2x forward, a small update.
ASSUMED_COMPUTE_SPLIT = {"forward": 0.32, "backward": 0.64, "optimizer": 0.04}


@dataclass(frozen=True)
class Goal:
    """The issue's goals: ZeRO-2 within 5% of DDP at 2 ranks; >= 90% efficiency at 64 GPUs on 200 Gb/s."""

    model: str = "yolov8s.yaml"
    imgsz: int = 640
    micro_batch: int = 16
    precision: str = "bf16"  # the calibration line's, when several were measured
    num_classes: int = 80  # COCO
    num_gpus: int = 64
    link_gbps: float = 200.0
    efficiency: float = 0.90
    ratio_vs_ddp_at_2: float = 0.95


@dataclass(frozen=True)
class Cluster:
    """The projected cluster: GPUs per node, link speeds to compare, network latency per ring hop."""

    ranks_per_node: int = 8
    link_gbps: tuple[float, ...] = (100.0, 200.0, 400.0)
    network_latency_s: float = NETWORK_LATENCY_S

    def topology(self, gbps: float):
        return h100_cluster(gbps, ranks_per_node=self.ranks_per_node, network_latency_s=self.network_latency_s)


# ----------------------------------------------------------------------------------------------------------------
# Selecting lines


def engine_name(line: Line) -> str:
    return {"deepspeed": f"ZeRO-{line['zero_stage']}", "ddp": "DDP", "ultralytics": "Ultralytics"}[line["engine"]]


def series_key(line: Line) -> tuple:
    """A configuration apart from where it ran: lines of one series differ only in ranks and nodes."""
    config = line.get("config", {})
    return (
        line["engine"],
        line["zero_stage"],
        line["precision"],
        line["model"],
        line["imgsz"],
        line["micro_batch"],
        line["input"],
        config.get("device"),
        config.get("reduce_bucket_size"),
        config.get("allgather_bucket_size"),
        config.get("overlap_comm"),
        config.get("channels_last"),
        config.get("deepspeed_config"),
        config.get("ema", True),
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


def series_label(line: Line) -> str:
    return line.get("label") or f"{engine_name(line)} {line['precision']} {line['model']}@{line['imgsz']}"


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
    place = (config.get("device"), config.get("channels_last"))
    for other in lines:
        other_config = other.get("config", {})
        if (other_config.get("device"), other_config.get("channels_last")) == place and all(
            other.get(k) == v for k, v in wanted.items()
        ):
            return other
    return None


def ratio_vs(line: Line, lines: list[Line], engine: str) -> float | None:
    """img/s over the baseline's at the same configuration (Ultralytics: one rank, real input only).

    With the same number of repeats on both sides, the median of the ratios repeat by repeat: the k-th repeats
    ran minutes apart under the same machine load, so the pairing cancels most of a shared machine's drift.
    """
    if engine == "ultralytics":
        if line["world_size"] != 1 or line["input"] != "real":
            return None
        peer = _peer(line, lines, engine="ultralytics")
    else:
        peer = _peer(line, lines, engine="ddp")
    if peer is None or peer is line:
        return None
    mine, theirs = line.get("imgs_per_s_repeats", []), peer.get("imgs_per_s_repeats", [])
    if len(mine) > 1 and len(mine) == len(theirs):
        return statistics.median(a / b for a, b in zip(mine, theirs))
    return line["imgs_per_s"] / peer["imgs_per_s"]


# ----------------------------------------------------------------------------------------------------------------
# The communication model against the measured 1 -> N rank step


@dataclass(frozen=True)
class TwoRankCheck:
    """The communication model's step at N ranks, calibrated on the 1-rank line, against the measured one."""

    label: str
    num_ranks: int
    compute_s: float
    predicted_step_s: float
    measured_step_s: float
    predicted_comm_s: float
    forward_slowdown: float  # forward time at N ranks over 1 rank: compute contention, no communication in it
    predicted_slowed_step_s: float  # the same prediction with every compute phase slowed as the forward was

    @property
    def error(self) -> float:
        return self.predicted_step_s / self.measured_step_s - 1

    @property
    def slowed_error(self) -> float:
        return self.predicted_slowed_step_s / self.measured_step_s - 1


def compute_times(line: Line) -> ComputeTimes | None:
    breakdown = line.get("breakdown_s")
    if not breakdown:
        return None
    return ComputeTimes(
        forward_s=breakdown["forward"],
        backward_s=breakdown["backward"],
        optimizer_s=breakdown["optimizer"],
        data_s=breakdown["data_wait"],
    )


def spec_from_line(line: Line) -> CommSpec | None:
    comm = line.get("comm")
    return CommSpec(**comm["spec"]) if comm else None


def probed_links(line: Line) -> dict[str, Link] | None:
    probe = line.get("interconnect", {}).get("probe")
    if not probe:
        return None
    return {op: Link(fit["bandwidth_bytes_per_s"], fit["latency_s"]) for op, fit in probe["ops"].items()}


def two_rank_checks(lines: list[Line]) -> list[TwoRankCheck]:
    """For every series measured at 1 and N > 1 ranks on one node: predicted vs measured step (mean)."""
    checks = []
    for line in lines:
        if line["world_size"] < 2 or line["num_nodes"] != 1 or line["engine"] == "ultralytics":
            continue
        single = next((o for o in lines if series_key(o) == series_key(line) and o["world_size"] == 1), None)
        links, spec = probed_links(line), spec_from_line(line)
        compute = compute_times(single) if single else None
        if compute is None or links is None or spec is None:
            continue
        # DeepSpeed on CPU has no side streams: its reductions block backward. DDP's gloo all-reduce runs on
        # gloo's own thread and can overlap; on GPUs both overlap.
        on_cpu = line.get("config", {}).get("device") == "cpu"
        can_overlap = line["engine"] == "ddp" or not on_cpu
        slowdown = line["breakdown_s"]["forward"] / single["breakdown_s"]["forward"]
        slowed = ComputeTimes(**{name: value * slowdown for name, value in vars(compute).items()})
        estimate, slowed_estimate = (
            estimate_step(
                times,
                spec,
                num_ranks=line["world_size"],
                link=links["all_reduce"],
                op_links=links,
                can_overlap=can_overlap,
            )
            for times in (compute, slowed)
        )
        checks.append(
            TwoRankCheck(
                label=series_label(line),
                num_ranks=line["world_size"],
                compute_s=compute.total_s,
                predicted_step_s=estimate.step_s,
                measured_step_s=line["step_time_s"]["mean"],
                predicted_comm_s=estimate.comm_s,
                forward_slowdown=slowdown,
                predicted_slowed_step_s=slowed_estimate.step_s,
            )
        )
    return checks


# ----------------------------------------------------------------------------------------------------------------
# Projection to 1-256 nodes


@dataclass(frozen=True)
class Projection:
    """Projected scaling of the goal model for each engine and link speed, and where its compute came from."""

    calibration: str
    measured: bool
    compute: ComputeTimes
    micro_batch: int
    specs: dict[str, CommSpec]
    points: dict[tuple[str, float], list[ScalingPoint]]  # (engine name, link Gb/s) -> points


def goal_model_specs(goal: Goal) -> dict[str, CommSpec]:
    """Communication of the goal model under DDP and yolods' default ZeRO 0-3 configs (bf16, EMA on), plus
    ZeRO-0 and ZeRO-2 with gradients communicated in bf16 (what-ifs)."""
    from ultralytics.nn.tasks import DetectionModel

    from yolods.bench.engines import comm_spec_for
    from yolods.config import default_deepspeed_config

    model = DetectionModel(goal.model, nc=goal.num_classes, verbose=False)  # only its structure is read
    specs = {"DDP": comm_spec_for(model, zero_stage=None, ds_config=None, ema=True)}
    for stage in range(4):
        ds_config = default_deepspeed_config(zero_stage=stage, precision="bf16")
        specs[f"ZeRO-{stage}"] = comm_spec_for(model, zero_stage=stage, ds_config=ds_config, ema=True)
    # What-ifs, not defaults: DeepSpeed's `communication_data_type: "bf16"` halves the gradient bytes
    for stage in (0, 2):
        specs[f"ZeRO-{stage} + bf16 grad comm"] = replace(specs[f"ZeRO-{stage}"], grad_bytes=2)
    return specs


def assumed_compute(step_s: float) -> ComputeTimes:
    """A GPU step of `step_s` seconds of compute, split as ASSUMED_COMPUTE_SPLIT."""
    return ComputeTimes(**{f"{phase}_s": share * step_s for phase, share in ASSUMED_COMPUTE_SPLIT.items()})


def _calibration_preference(line: Line, goal: Goal) -> tuple:
    """Sort key among 1-GPU lines of the goal model: the goal's precision, yolods' default memory format, the
    bare model (DDP) before ZeRO-0 before the partitioned stages, then the fastest."""
    channels_last = line.get("config", {}).get("channels_last")
    return (
        line["precision"] != goal.precision,
        channels_last is False,
        ENGINE_ORDER.index(engine_name(line)),
        -line["imgs_per_s"],
    )


def goal_compute(
    lines: list[Line], goal: Goal, *, assumed_imgs_per_s: float, given_imgs_per_s: float | None = None
) -> tuple[ComputeTimes, str, bool]:
    """One GPU's compute for the goal model: a rate given on the command line (`given_imgs_per_s`, measured
    elsewhere), else a 1-GPU synthetic line of it in these results, else the assumed rate.

    Returns the times, a sentence saying where they came from, and whether they were measured.
    """
    if given_imgs_per_s is not None:
        step_s = goal.micro_batch / given_imgs_per_s
        sentence = (
            f"given (--gpu-imgs-per-s, measured outside these results): {given_imgs_per_s:g} img/s per GPU "
            f"({step_s * 1e3:.1f} ms per step of {goal.micro_batch} images), split {ASSUMED_COMPUTE_SPLIT}"
        )
        return assumed_compute(step_s), sentence, True
    candidates = [
        line
        for line in lines
        if line["world_size"] == 1
        and line["model"] == goal.model
        and line["imgsz"] == goal.imgsz
        and line["micro_batch"] == goal.micro_batch
        and line["input"] == "synthetic"
        and line.get("config", {}).get("device") == "cuda"
        and line["engine"] in ("ddp", "deepspeed")
        and line.get("breakdown_s")
    ]
    if candidates:
        line = min(candidates, key=lambda line: _calibration_preference(line, goal))
        compute = compute_times(line)
        gpu = line.get("hardware", {}).get("gpu", "GPU")
        sentence = (
            f"measured: {series_label(line)} on one {gpu}, {compute.total_s * 1e3:.1f} ms of compute per step "
            f"({line['imgs_per_s']:.0f} img/s with the data wait)"
        )
        return compute, sentence, True
    step_s = goal.micro_batch / assumed_imgs_per_s
    sentence = (
        f"ASSUMED, not measured: {assumed_imgs_per_s:g} img/s per GPU ({step_s * 1e3:.1f} ms per step of "
        f"{goal.micro_batch} images), split {ASSUMED_COMPUTE_SPLIT}; no 1-GPU line of {goal.model}@{goal.imgsz} "
        f"with {goal.micro_batch} images per rank in these results"
    )
    return assumed_compute(step_s), sentence, False


def project_goal(
    lines: list[Line],
    goal: Goal,
    *,
    cluster: Cluster,
    assumed_imgs_per_s: float,
    given_imgs_per_s: float | None = None,
) -> Projection:
    """The goal model's throughput and efficiency at 1-256 nodes, per engine and link speed."""
    compute, calibration, measured = goal_compute(
        lines, goal, assumed_imgs_per_s=assumed_imgs_per_s, given_imgs_per_s=given_imgs_per_s
    )
    specs = goal_model_specs(goal)
    points = {
        (name, gbps): project_scaling(
            compute, spec, topology=cluster.topology(gbps), micro_batch=goal.micro_batch, node_counts=NODE_COUNTS
        )
        for name, spec in specs.items()
        for gbps in cluster.link_gbps
    }
    return Projection(
        calibration=calibration,
        measured=measured,
        compute=compute,
        micro_batch=goal.micro_batch,
        specs=specs,
        points=points,
    )


def efficiency_at(points: list[ScalingPoint], num_ranks: int) -> float | None:
    return next((p.efficiency for p in points if p.num_ranks == num_ranks), None)


def efficiency_at_rate(spec: CommSpec, goal: Goal, *, cluster: Cluster, imgs_per_s: float) -> float:
    """Projected efficiency at the goal's GPU count if one GPU computed `imgs_per_s` (assumed split)."""
    nodes = max(goal.num_gpus // cluster.ranks_per_node, 1)
    compute = assumed_compute(goal.micro_batch / imgs_per_s)
    topology = cluster.topology(goal.link_gbps)
    return project_scaling(compute, spec, topology=topology, micro_batch=goal.micro_batch, node_counts=[nodes])[
        0
    ].efficiency


def break_even_imgs_per_s(spec: CommSpec, goal: Goal, *, cluster: Cluster) -> float:
    """The fastest per-GPU compute (img/s) that still reaches the goal efficiency (bisection; efficiency falls as
    compute gets faster and hides less communication)."""
    low, high = 1.0, 1e6
    if efficiency_at_rate(spec, goal, cluster=cluster, imgs_per_s=low) < goal.efficiency:
        return 0.0
    for _ in range(60):
        middle = math.sqrt(low * high)
        reaches = efficiency_at_rate(spec, goal, cluster=cluster, imgs_per_s=middle) >= goal.efficiency
        low, high = (middle, high) if reaches else (low, middle)
    return low


# ----------------------------------------------------------------------------------------------------------------
# Model-state memory against the ZeRO paper


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
            )
        )
    return checks
