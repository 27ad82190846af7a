"""The report's projection section: calibration, every assumed constant, the projected scaling, and how the
verdict moves with the assumed per-GPU rate, link speed and network latency."""

from __future__ import annotations

from dataclasses import replace

from yolods.bench.analysis import ENGINE_ORDER
from yolods.bench.comm_model import comm_bytes_per_rank, project_scaling
from yolods.bench.markdown import table
from yolods.bench.projection import (
    NODE_COUNTS,
    SENSITIVITY_IMGS_PER_S,
    Cluster,
    Goal,
    Projection,
    assumptions,
    break_even_imgs_per_s,
    sensitivity,
)

LATENCIES_US = (1.0, 2.0, 5.0, 10.0)


def _name(name: str) -> str:
    return name if name in ENGINE_ORDER else f"+ {name}"


def _assumptions(projection: Projection, goal: Goal, *, cluster: Cluster) -> list[str]:
    rows = [
        [f"**ASSUMED** {a.name}", a.value, a.basis, a.varied] for a in assumptions(projection, goal, cluster=cluster)
    ]
    return [
        "Constants the projection rests on, none measured in these results:",
        "",
        *table(["constant", "value", "basis", "varied in"], rows),
        "",
    ]


def _sensitivity(projection: Projection, goal: Goal, *, cluster: Cluster) -> list[str]:
    grid = sensitivity(projection, goal, cluster=cluster)
    rates = SENSITIVITY_IMGS_PER_S
    rows = []
    for name in projection.specs:
        for gbps in cluster.link_gbps:
            cells = [grid[(name, gbps, rate)] for rate in rates]
            rows.append(
                [_name(name), f"{gbps:g}"]
                + [f"{value:.1%}{' met' if value >= goal.efficiency else ''}" for value in cells]
            )
    out = [
        f"How the {goal.num_gpus}-GPU verdict (>= {goal.efficiency:.0%}) moves with the two main assumptions, the "
        f"per-GPU compute rate and the network line rate (assumed split of compute, {cluster.network_latency_s * 1e6:g} us "
        "per hop):",
        "",
        *table(["engine", "Gb/s", *(f"{rate:g} img/s" for rate in rates)], rows),
        "",
    ]
    cells = len(rates) * len(cluster.link_gbps)
    verdicts = []
    for name in projection.specs:
        met = sum(grid[(name, gbps, rate)] >= goal.efficiency for gbps in cluster.link_gbps for rate in rates)
        verdicts.append(f"{_name(name)} {met}/{cells}")
    out += [f"Cells meeting {goal.efficiency:.0%}: " + ", ".join(verdicts) + ".", ""]
    return out


def _break_even(projection: Projection, goal: Goal, *, cluster: Cluster) -> list[str]:
    rows = [
        [
            _name(name),
            f"{comm_bytes_per_rank(spec, num_ranks=goal.num_gpus) / 1e6:.1f}",
            *(
                f"{break_even_imgs_per_s(spec, goal, cluster=cluster, link_gbps=gbps):,.0f}"
                for gbps in cluster.link_gbps
            ),
        ]
        for name, spec in projection.specs.items()
    ]
    return [
        f"The fastest per-GPU compute that still keeps {goal.num_gpus} GPUs at {goal.efficiency:.0%} (assumed split "
        "of compute), per line rate:",
        "",
        *table(
            [
                "engine",
                f"comm MB/step/GPU at {goal.num_gpus} GPUs",
                *(f"max img/s per GPU at {gbps:g} Gb/s" for gbps in cluster.link_gbps),
            ],
            rows,
        ),
        "",
    ]


def _latency(projection: Projection, goal: Goal, *, cluster: Cluster) -> list[str]:
    nodes = max(goal.num_gpus // cluster.ranks_per_node, 1)
    rows = []
    for name, spec in projection.specs.items():
        row = [_name(name)]
        for latency_us in LATENCIES_US:
            topology = replace(cluster, network_latency_s=latency_us * 1e-6).topology(goal.link_gbps)
            point = project_scaling(
                projection.compute, spec, topology=topology, micro_batch=goal.micro_batch, node_counts=[nodes]
            )[0]
            row.append(f"{point.efficiency:.1%}")
        rows.append(row)
    return [
        f"Efficiency at {goal.num_gpus} GPUs, {goal.link_gbps:g} Gb/s, against the ASSUMED network latency per ring "
        "hop (the calibration's compute):",
        "",
        *table(["engine", *(f"{latency:g} us" for latency in LATENCIES_US)], rows),
        "",
    ]


def projection_section(projection: Projection, goal: Goal, *, cluster: Cluster) -> list[str]:
    out = [
        f"## Projection: {goal.model.removesuffix('.yaml')} @{goal.imgsz}px, {goal.micro_batch} img/GPU, "
        f"1-256 nodes of {cluster.ranks_per_node} GPUs",
        "",
        f"Compute calibration: {projection.calibration}.",
        "",
        *_assumptions(projection, goal, cluster=cluster),
        "Model (comm_model.py): ring collectives, latency per hop + bytes / bandwidth, for what each engine issues per",
        "step (yolods' ZeRO runs also all-reduce one stop flag per step); bucketed reductions hide behind backward",
        "where the engine overlaps them (DDP, ZeRO 1-3 with overlap_comm), DeepSpeed ZeRO-0's single after-backward",
        "all-reduce and ZeRO 1-2's parameter all-gather after the step do not. yolods' bf16 is torch_autocast:",
        "parameters and gradients stay fp32, so collectives move 4 bytes per element. ZeRO 1-3 update 1/N of the",
        "optimizer states per rank; the EMA update runs in full on every rank. Rows marked `+` are what-ifs, not",
        "yolods defaults.",
        "",
        "**Efficiency** here is the step's compute over the step (1 - exposed communication / step): img/s against",
        "the same per-rank compute with free communication, so it cannot exceed 100%. Measured against N x one GPU's",
        "img/s instead, ZeRO 1-3 would read above 100% on NVLink, because one GPU runs the whole optimizer update",
        "while each of N ranks runs 1/N of it: less work per rank, not free communication. That gain shows in img/s.",
        "",
    ]
    header = ["engine", "Gb/s"] + [f"{n} node{'s' if n > 1 else ''}" for n in NODE_COUNTS]
    rows = [
        [_name(name), f"{gbps:g}"] + [f"{p.efficiency:.0%} ({p.imgs_per_s:,.0f})" for p in points]
        for (name, gbps), points in projection.points.items()
    ]
    out += ["Scaling efficiency (global img/s):", "", *table(header, rows), ""]
    out += _sensitivity(projection, goal, cluster=cluster)
    out += _break_even(projection, goal, cluster=cluster)
    out += _latency(projection, goal, cluster=cluster)
    return out
