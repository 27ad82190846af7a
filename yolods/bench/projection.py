"""The goal model projected to 1-256 nodes of GPUs: its compute calibration, every assumed constant, and how the
verdict moves when the assumed per-GPU rate and link speed vary.

Pure functions of the results lines and of the goal model's structure; report.py writes them out, plots.py draws
them. The communication itself is comm_model.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from yolods.bench.analysis import EMA_SHARE_OF_OPTIMIZER, ENGINE_ORDER, Line, compute_times, engine_name, series_label
from yolods.bench.comm_model import (
    NETWORK_EFFICIENCY,
    NETWORK_LATENCY_S,
    NVLINK_H100,
    CommSpec,
    ComputeTimes,
    ScalingPoint,
    h100_cluster,
    project_scaling,
)

NODE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# ASSUMED split of a GPU step's compute when no GPU line calibrates it: backward ~2x forward, a small update, and
# the EMA (Ultralytics' ModelEMA loops over ~300 tensors: on a GPU as long as the foreach AdamW update, assumed).
ASSUMED_COMPUTE_SPLIT = {"forward": 0.32, "backward": 0.64, "optimizer": 0.02, "ema": 0.02}
# The rates and link speeds the sensitivity table crosses: one H200 measured (304) up to 4x it.
SENSITIVITY_IMGS_PER_S = (300.0, 600.0, 900.0, 1200.0)
# One H200's rate for the goal model and batch (yolov8s @640, 16 img/GPU, bf16, yolods ZeRO-0, standard layout),
# measured 2026-11-29 by benchmarks/gpu/ (benchmarks/results/gpu): the rate used when neither a 1-GPU line in the
# results nor --gpu-imgs-per-s gives one, ASSUMED the same on the H100 nodes the cluster model describes. It replaced
# an assumed 600 img/s. At 16 images the step (52 ms) is mostly the CPU launching kernels; batch 128 ran 1067 img/s.
H200_GOAL_IMGS_PER_S = 304.0


@dataclass(frozen=True)
class Goal:
    """The issues' goals: ZeRO-1/2 at >= 0.95x and ZeRO-3 at >= 0.8x DDP's img/s at 2 ranks (issue 9); >= 90%
    efficiency at 64 GPUs on 200 Gb/s."""

    model: str = "yolov8s.yaml"
    imgsz: int = 640
    micro_batch: int = 16
    precision: str = "bf16"  # the calibration line's, when several were measured
    num_classes: int = 80  # COCO
    num_gpus: int = 64
    link_gbps: float = 200.0
    efficiency: float = 0.90
    ratio_vs_ddp_at_2: float = 0.95  # ZeRO-1 and ZeRO-2
    zero3_ratio_vs_ddp_at_2: float = 0.80  # ZeRO-3 gathers parameters and hooks every layer, forward and backward

    def ratio_vs_ddp_for(self, zero_stage: int) -> float | None:
        """The img/s ratio to DDP at 2 ranks a stage must reach; None for ZeRO-0 (DDP's own algorithm)."""
        if zero_stage == 0:
            return None
        return self.zero3_ratio_vs_ddp_at_2 if zero_stage == 3 else self.ratio_vs_ddp_at_2


@dataclass(frozen=True)
class Cluster:
    """The projected cluster: GPUs per node, link speeds to compare, network latency per ring hop."""

    ranks_per_node: int = 8
    link_gbps: tuple[float, ...] = (100.0, 200.0, 400.0)
    network_latency_s: float = NETWORK_LATENCY_S

    def topology(self, gbps: float):
        return h100_cluster(gbps, ranks_per_node=self.ranks_per_node, network_latency_s=self.network_latency_s)


@dataclass(frozen=True)
class Projection:
    """Projected scaling of the goal model for each engine and link speed, and where its compute came from."""

    calibration: str
    measured: bool  # the per-GPU rate: measured (a 1-GPU line, or given) or assumed
    split_measured: bool  # the forward/backward/optimizer split: from a 1-GPU line, else assumed
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
    specs = {"DDP": comm_spec_for(model, zero_stage=None, ds_config=None)}
    for stage in range(4):
        ds_config = default_deepspeed_config(zero_stage=stage, precision="bf16")
        specs[f"ZeRO-{stage}"] = comm_spec_for(model, zero_stage=stage, ds_config=ds_config)
    # What-ifs, not defaults: DeepSpeed's `communication_data_type: "bf16"` halves the gradient bytes
    for stage in (0, 2):
        specs[f"ZeRO-{stage} + bf16 grad comm"] = replace(specs[f"ZeRO-{stage}"], grad_bytes=2)
    return specs


def assumed_compute(step_s: float) -> ComputeTimes:
    """A GPU step of `step_s` seconds of compute, split as ASSUMED_COMPUTE_SPLIT."""
    return ComputeTimes(**{f"{phase}_s": share * step_s for phase, share in ASSUMED_COMPUTE_SPLIT.items()})


def _calibration_preference(line: Line, goal: Goal) -> tuple:
    """Sort key among 1-GPU lines of the goal model: the goal's precision, yolods' default memory format (standard
    images: channels_last None or False), the bare model (DDP) before ZeRO-0 before the partitioned stages, then the
    fastest."""
    channels_last = line.get("config", {}).get("channels_last")
    return (
        line["precision"] != goal.precision,
        channels_last is True,
        ENGINE_ORDER.index(engine_name(line)),
        -line["imgs_per_s"],
    )


def goal_compute(
    lines: list[Line], goal: Goal, *, assumed_imgs_per_s: float, given_imgs_per_s: float | None = None
) -> tuple[ComputeTimes, str, bool]:
    """One GPU's compute for the goal model: a rate given on the command line (`given_imgs_per_s`, measured
    elsewhere), else a 1-GPU synthetic line of it in these results, else the assumed rate.

    Returns the times, a sentence saying where they came from, and whether the rate was measured.
    """
    if given_imgs_per_s is not None:
        step_s = goal.micro_batch / given_imgs_per_s
        sentence = (
            f"given (--gpu-imgs-per-s, measured outside these results): {given_imgs_per_s:g} img/s per GPU "
            f"({step_s * 1e3:.1f} ms per step of {goal.micro_batch} images), split ASSUMED {ASSUMED_COMPUTE_SPLIT}"
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
            f"({line['imgs_per_s']:.0f} img/s with the data wait); the EMA's share of its optimizer phase is "
            f"ASSUMED {EMA_SHARE_OF_OPTIMIZER['cuda']:.0%}"
        )
        return compute, sentence, True
    step_s = goal.micro_batch / assumed_imgs_per_s
    sentence = (
        f"ASSUMED, not measured here: {assumed_imgs_per_s:g} img/s per GPU ({step_s * 1e3:.1f} ms per step of "
        f"{goal.micro_batch} images{_provenance(assumed_imgs_per_s, goal)}), split {ASSUMED_COMPUTE_SPLIT}; no 1-GPU line "
        f"of {goal.model}@{goal.imgsz} with {goal.micro_batch} images per rank in these results"
    )
    return assumed_compute(step_s), sentence, False


def _measured_on_h200(imgs_per_s: float, goal: Goal) -> bool:
    """Whether a rate is the one the H200 measured (the default) for the job it measured (the default goal:
    yolov8s@640, 16 images), to name where it came from; for any other goal it is an assumption."""
    h200_job = (Goal.model, Goal.imgsz, Goal.micro_batch)
    return round(imgs_per_s) == round(H200_GOAL_IMGS_PER_S) and (goal.model, goal.imgsz, goal.micro_batch) == h200_job


def _provenance(imgs_per_s: float, goal: Goal) -> str:
    if _measured_on_h200(imgs_per_s, goal):
        return "; one H200 measured this rate: benchmarks/results/gpu, 2026-11-29"
    return ""


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
        split_measured=measured and given_imgs_per_s is None,
        compute=compute,
        micro_batch=goal.micro_batch,
        specs=specs,
        points=points,
    )


def efficiency_at(points: list[ScalingPoint], num_ranks: int) -> float | None:
    return next((p.efficiency for p in points if p.num_ranks == num_ranks), None)


def efficiency_at_rate(
    spec: CommSpec, goal: Goal, *, cluster: Cluster, imgs_per_s: float, link_gbps: float | None = None
) -> float:
    """Projected efficiency at the goal's GPU count if one GPU computed `imgs_per_s` (assumed split), on
    `link_gbps` (default: the goal's)."""
    nodes = max(goal.num_gpus // cluster.ranks_per_node, 1)
    compute = assumed_compute(goal.micro_batch / imgs_per_s)
    topology = cluster.topology(goal.link_gbps if link_gbps is None else link_gbps)
    return project_scaling(compute, spec, topology=topology, micro_batch=goal.micro_batch, node_counts=[nodes])[
        0
    ].efficiency


def break_even_imgs_per_s(spec: CommSpec, goal: Goal, *, cluster: Cluster, link_gbps: float | None = None) -> float:
    """The fastest per-GPU compute (img/s) that still reaches the goal efficiency (bisection; efficiency falls as
    compute gets faster and hides less communication)."""
    low, high = 1.0, 1e6

    def reaches(rate: float) -> bool:
        efficiency = efficiency_at_rate(spec, goal, cluster=cluster, imgs_per_s=rate, link_gbps=link_gbps)
        return efficiency >= goal.efficiency

    if not reaches(low):
        return 0.0
    for _ in range(60):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if reaches(middle) else (low, middle)
    return low


def sensitivity(
    projection: Projection,
    goal: Goal,
    *,
    cluster: Cluster,
    rates: tuple[float, ...] = SENSITIVITY_IMGS_PER_S,
) -> dict[tuple[str, float, float], float]:
    """Efficiency at the goal's GPU count for every (engine, link Gb/s, per-GPU img/s) of the grid."""
    return {
        (name, gbps, rate): efficiency_at_rate(spec, goal, cluster=cluster, imgs_per_s=rate, link_gbps=gbps)
        for name, spec in projection.specs.items()
        for gbps in cluster.link_gbps
        for rate in rates
    }


@dataclass(frozen=True)
class Assumption:
    """One constant the projection rests on: its value, why that value, and whether the report varies it."""

    name: str
    value: str
    basis: str
    varied: str


def assumptions(projection: Projection, goal: Goal, *, cluster: Cluster) -> list[Assumption]:
    """Every constant of the projection that no line in these results measured."""
    rate = goal.micro_batch / projection.compute.total_s
    listed = []
    if not projection.measured:
        listed.append(
            Assumption(
                "per-GPU compute",
                f"{rate:.0f} img/s ({projection.compute.total_s * 1e3:.1f} ms per {goal.micro_batch}-image step)",
                "no 1-GPU line of the goal model in these results; "
                + (
                    "one H200 measured it (benchmarks/results/gpu), the same on the cluster's H100s"
                    if _measured_on_h200(rate, goal)
                    else "--assumed-gpu-imgs-per-s"
                ),
                f"sensitivity table ({', '.join(f'{r:g}' for r in SENSITIVITY_IMGS_PER_S)}) and plot",
            )
        )
    if not projection.split_measured:
        split = ", ".join(f"{phase} {share:.0%}" for phase, share in ASSUMED_COMPUTE_SPLIT.items())
        listed.append(Assumption("compute split", split, "backward ~2x forward; a small update", "no"))
    else:
        listed.append(
            Assumption(
                "EMA share of the optimizer phase",
                f"{EMA_SHARE_OF_OPTIMIZER['cuda']:.0%}",
                "the step's phases do not time the EMA apart; it is not partitioned by ZeRO",
                "no",
            )
        )
    gbps = ", ".join(f"{value:g}" for value in cluster.link_gbps)
    listed += [
        Assumption(
            "network line rate per GPU",
            f"{goal.link_gbps:g} Gb/s for the goal",
            "one NIC per GPU (rail-optimised, as DGX/HGX H100 nodes)",
            f"every table at {gbps} Gb/s",
        ),
        Assumption("achievable share of the line rate", f"{NETWORK_EFFICIENCY:.0%}", "NCCL bus bandwidth", "no"),
        Assumption(
            "network latency per ring hop",
            f"{cluster.network_latency_s * 1e6:g} us",
            "InfiniBand/RoCE through NCCL, on the pessimistic side",
            "latency table (1-10 us)",
        ),
        Assumption(
            "NVLink inside a node",
            f"{NVLINK_H100.bandwidth_bytes_per_s / 1e9:.0f} GB/s, {NVLINK_H100.latency_s * 1e6:g} us per hop",
            "NVLink 4 NCCL bus bandwidth; matters on 1 node only (beyond, the network is the ring's bottleneck)",
            "no",
        ),
        Assumption("GPUs per node", str(cluster.ranks_per_node), "HGX/DGX nodes", "--ranks-per-node"),
        Assumption(
            "collective algorithm",
            "ring for every collective",
            "NCCL uses trees for small all-reduces at scale: latency grows as log N, not N (pessimistic here)",
            "no",
        ),
        Assumption(
            "compute contention",
            "none: a rank computes as fast alone as beside 7 others",
            "GPUs do not share cores (ranks sharing CPU cores do slow each other: the report's forward slowdown)",
            "no",
        ),
        Assumption(
            "overlap",
            "gradient buckets ready evenly through backward",
            "the last bucket's reduction is always exposed",
            "no",
        ),
    ]
    return listed
