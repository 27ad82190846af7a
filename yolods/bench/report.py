"""`python -m yolods.bench.report DIR`: DIR/report.md (tables) and PNG plots from DIR/results.jsonl.

    python -m yolods.bench.report benchmarks/results/cpu
    python -m yolods.bench.report DIR --link-gbps 100,200,400 --ranks-per-node 8 --assumed-gpu-imgs-per-s 600
    python -m yolods.bench.report benchmarks/results/cpu --gpu-imgs-per-s 1400   # a rate measured on a GPU

Each configuration is reported from its latest run, at the median of that run's repeats. The projection to
1-256 nodes is calibrated with measured compute: a rate given with --gpu-imgs-per-s (measured elsewhere, e.g. by
benchmarks/gpu/run.sh), else a one-GPU line of the goal model when DIR has one, else an assumed per-GPU rate
(--assumed-gpu-imgs-per-s, 600 img/s), which the report says it is and varies in a plot.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from yolods.bench import plots
from yolods.bench.analysis import (
    ENGINE_ORDER,
    NODE_COUNTS,
    Cluster,
    Goal,
    Line,
    MemoryCheck,
    Projection,
    TwoRankCheck,
    break_even_imgs_per_s,
    efficiency_at,
    engine_name,
    memory_checks,
    project_goal,
    ratio_vs,
    select_lines,
    series_key,
    series_label,
    two_rank_checks,
)
from yolods.bench.comm_model import comm_bytes_per_rank, project_scaling
from yolods.bench.results import RESULTS_FILE, read_lines

MIB = 2**20
PHASES = ("data_wait", "forward", "backward", "optimizer")
PRECISION_ORDER = ("fp32", "bf16", "fp16")
LAYOUT_NAMES = {None: "default", True: "NHWC", False: "NCHW"}
TIE_TOLERANCE = 0.02  # paired repeats on the shared CPU machine still scatter by a few percent


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _sort_key(line: Line) -> tuple:
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


def _environment_section(lines: list[Line]) -> list[str]:
    hardware = sorted(
        {(row["hardware"].get("gpu") or row["hardware"].get("cpu"), row["hardware"].get("cpu_count")) for row in lines},
        key=str,
    )
    loads = [row["load_avg"][0] for row in lines if row.get("load_avg")]
    out = ["## Where and how", ""]
    out += [f"- hardware: {name}, {cpus} logical CPUs per node" for name, cpus in hardware]
    out.append(
        f"- backends: {', '.join(sorted({row['interconnect']['backend'] for row in lines}))}; "
        f"world sizes {sorted({row['world_size'] for row in lines})}; nodes {sorted({row['num_nodes'] for row in lines})}"
    )
    versions = lines[-1]["versions"]
    out.append("- versions: " + ", ".join(f"{name} {value}" for name, value in versions.items() if value is not None))
    threads = sorted({row["hardware"].get("torch_threads_per_rank") for row in lines} - {None})
    out.append(f"- torch threads per rank: {threads}")
    if loads:
        out.append(
            f"- 1-minute load average when each line was written: {min(loads):.2f} to {max(loads):.2f} "
            "(above the core count: other work shared the machine)"
        )
    repeats = sorted({row.get("repeats", 1) for row in lines})
    out.append(
        f"- repeats per configuration: {repeats}; tables show the median repeat, `range` its spread; "
        f"timed steps per repeat: {sorted({row['steps'] for row in lines})} after {sorted({row['warmup_steps'] for row in lines})} burn-in"
    )
    out.append(f"- measured {min(row['timestamp'] for row in lines)} to {max(row['timestamp'] for row in lines)}")
    return [*out, ""]


def _verdict(ratio: float) -> str:
    if ratio >= 1.0:
        return "met"
    return "tie" if ratio >= 1.0 - TIE_TOLERANCE else "MISSED"


def _goal_section(lines: list[Line], projection: Projection, goal: Goal) -> list[str]:
    out = ["## Goals", ""]
    rows = []
    for line in sorted(lines, key=_sort_key):
        if line["engine"] != "deepspeed" or not plots.default_series(line):
            continue
        for baseline in ("ddp", "ultralytics"):
            ratio = ratio_vs(line, lines, baseline)
            if ratio is not None:
                rows.append([series_label(line), str(line["world_size"]), baseline, f"{ratio:.3f}x", _verdict(ratio)])
    out += [
        "**1. yolods at least as fast as DDP and the Ultralytics trainer at every world size** "
        f"(`tie`: within {TIE_TOLERANCE:.0%}, below what repeats here resolve)",
        "",
    ]
    out += (
        _table(["yolods configuration", "ranks", "baseline", "img/s ratio", "verdict"], rows)
        if rows
        else ["(no pairs)"]
    )
    out += ["", "**2. ZeRO-2 within 5% of DDP at 2 ranks**", ""]
    zero2 = [
        row
        for row in lines
        if row["engine"] == "deepspeed"
        and row["zero_stage"] == 2
        and row["world_size"] == 2
        and plots.default_series(row)
    ]
    for line in sorted(zero2, key=_sort_key):
        ratio = ratio_vs(line, lines, "ddp")
        if ratio is not None:
            verdict = "met" if ratio >= goal.ratio_vs_ddp_at_2 else "MISSED"
            out.append(f"- {series_label(line)}: {ratio:.2f}x DDP, {verdict}")
    if not zero2:
        out.append("- (no 2-rank ZeRO-2 line)")
    source = "measured" if projection.measured else "ASSUMED"
    out += [
        "",
        f"**3. Projected efficiency >= {goal.efficiency:.0%} at {goal.num_gpus} GPUs on {goal.link_gbps:g} Gb/s, "
        f"{goal.model.removesuffix('.yaml')}@{goal.imgsz}** ({source} compute, see the projection section)",
        "",
    ]
    rows = []
    for (name, gbps), points in projection.points.items():
        efficiency = efficiency_at(points, goal.num_gpus)
        if gbps == goal.link_gbps and efficiency is not None:
            label = name if name in ENGINE_ORDER else f"what-if: {name}"
            rows.append([label, f"{efficiency:.1%}", "met" if efficiency >= goal.efficiency else "MISSED"])
    out += _table(["engine", "efficiency", "verdict"], rows)
    return [*out, ""]


def _results_section(lines: list[Line]) -> list[str]:
    header = [
        "configuration",
        "ranks",
        "nodes",
        "img/s (range)",
        "img/s/rank",
        "vs DDP",
        "vs Ultralytics",
        "step ms (median)",
        "data / fwd / bwd / opt ms",
        "peak MiB/rank",
        "model states MiB/rank",
        "comm MB/step/rank",
    ]
    rows = []
    for line in sorted(lines, key=_sort_key):
        breakdown = line.get("breakdown_s")
        low, high = line.get("imgs_per_s_range", [line["imgs_per_s"]] * 2)
        comm = line.get("comm")
        rows.append(
            [
                series_label(line),
                str(line["world_size"]),
                str(line["num_nodes"]),
                f"{line['imgs_per_s']:.1f} ({low:.1f}-{high:.1f})",
                f"{line['imgs_per_s_per_rank']:.1f}",
                _ratio(ratio_vs(line, lines, "ddp")) if line["engine"] != "ddp" else "1.00x",
                _ratio(ratio_vs(line, lines, "ultralytics")) if line["engine"] != "ultralytics" else "1.00x",
                f"{line['step_time_s']['median'] * 1e3:.0f}",
                " / ".join(f"{breakdown[phase] * 1e3:.0f}" for phase in PHASES) if breakdown else "-",
                _mib(line["peak_mem_bytes"]),
                _mib((line.get("model_state_bytes") or {}).get("total")),
                f"{comm['bytes_per_rank_per_step'] / 1e6:.1f}" if comm and line["world_size"] > 1 else "-",
            ]
        )
    return [
        "## Results",
        "",
        "`vs DDP`: img/s over torch DDP's at the same model, size, batch, precision, input and ranks. `vs Ultralytics`:",
        "over the Ultralytics trainer's, one rank, real input (it always reads through its dataloader; its multi-GPU",
        "mode spawns its own processes, so it is measured at world size 1 only). With repeats on both sides a ratio",
        "is the median of the repeat-by-repeat ratios (paired in time), so it can differ from the ratio of the medians",
        "shown in `img/s`. Backward includes the gradient",
        "reduction; optimizer includes gradient clipping, ZeRO's parameter all-gather and the EMA update.",
        "Comm MB: bytes each rank sends per step for the collectives the engine issues (comm_model.py).",
        "",
        *_table(header, rows),
        "",
    ]


def _peak_memory_section(lines: list[Line]) -> list[str]:
    """Peak memory per rank by engine (rows) and precision x memory format (columns), for each (model, size,
    batch, input, ranks, device) measured at more than one precision or memory format."""
    groups: dict[tuple, list[Line]] = {}
    for line in lines:
        if line["engine"] == "ultralytics":
            continue
        config = line.get("config", {})
        key = (
            line["model"],
            line["imgsz"],
            line["micro_batch"],
            line["input"],
            line["world_size"],
            config.get("device"),
        )
        groups.setdefault(key, []).append(line)
    out = []
    for (model, imgsz, micro, input_mode, ranks, device), group in sorted(
        groups.items(), key=lambda item: str(item[0])
    ):
        columns = sorted(
            {(line["precision"], line.get("config", {}).get("channels_last")) for line in group},
            key=lambda column: (PRECISION_ORDER.index(column[0]), [None, True, False].index(column[1])),
        )
        if len(columns) < 2:
            continue
        cells: dict[tuple, Line] = {}
        for line in group:
            if plots.default_series(line) or line.get("config", {}).get("channels_last") is not None:
                column = (line["precision"], line.get("config", {}).get("channels_last"))
                cells.setdefault((engine_name(line), column), line)
        engines = [name for name in ENGINE_ORDER if any(name == row for row, _ in cells)]
        rows = [
            [name]
            + [_mib(cells[(name, column)]["peak_mem_bytes"]) if (name, column) in cells else "-" for column in columns]
            for name in engines
        ]
        header = ["engine", *(f"{precision} {LAYOUT_NAMES[layout]}" for precision, layout in columns)]
        out += [
            f"{model.removesuffix('.yaml')} @{imgsz}px, {micro} img/rank, {input_mode} input, {ranks} rank(s), {device}:",
            "",
            *_table(header, rows),
            "",
        ]
    if not out:
        return []
    return [
        "## Peak memory per rank by ZeRO stage, precision and memory format",
        "",
        "MiB, `torch.cuda.max_memory_allocated` on GPU (CPU: peak RSS, torch included). `default`: yolods' own",
        "memory format (NHWC on CUDA); NHWC / NCHW: set with `--channels-last on,off` (CPU always trains NCHW).",
        "",
        *out,
    ]


def _scaling_section(lines: list[Line], checks: list[TwoRankCheck]) -> list[str]:
    rows = []
    for line in sorted(lines, key=_sort_key):
        if line["world_size"] == 1 or line["engine"] == "ultralytics":
            continue
        single = next((o for o in lines if series_key(o) == series_key(line) and o["world_size"] == 1), None)
        if single is None:
            continue
        rows.append(
            [
                series_label(line),
                f"1 -> {line['world_size']}",
                f"{single['imgs_per_s']:.1f} -> {line['imgs_per_s']:.1f}",
                f"{line['imgs_per_s'] / (line['world_size'] * single['imgs_per_s']):.0%}",
                f"{(line['step_time_s']['mean'] - single['step_time_s']['mean']) * 1e3:+.0f}",
            ]
        )
    out = ["## Scaling measured here (weak scaling: fixed images per rank)", ""]
    if rows:
        out += _table(["configuration", "ranks", "img/s", "efficiency", "step ms added (mean)"], rows)
    else:
        out.append("(one world size only)")
    out += ["", "### The communication model against the measured 1 -> N rank step", ""]
    if checks:
        out += [
            "Calibration: compute = the 1-rank line's data + forward + backward + optimizer time; links = the all-reduce,",
            "all-gather and reduce-scatter fits probed at the start of the N-rank run (`interconnect.probe` in each",
            "line). DeepSpeed on CPU cannot overlap (no side streams); DDP's gloo reduction runs on gloo's own thread.",
            "`fwd slowdown` is the forward time at N ranks over 1 rank: forward has no communication outside ZeRO-3,",
            "so it measures how much the ranks slowed each other's compute (and other work on the machine slowed",
            "them), which the model leaves out. The last two columns apply that slowdown to every compute phase:",
            "what is left is the communication model's own error (for ZeRO-3, whose forward gathers, it overcorrects).",
            "",
        ]
        out += _table(
            [
                "configuration",
                "ranks",
                "1-rank compute ms",
                "model comm ms",
                "predicted step ms",
                "measured step ms",
                "error",
                "fwd slowdown",
                "predicted with slowdown ms",
                "error with slowdown",
            ],
            [
                [
                    check.label,
                    str(check.num_ranks),
                    f"{check.compute_s * 1e3:.0f}",
                    f"{check.predicted_comm_s * 1e3:.0f}",
                    f"{check.predicted_step_s * 1e3:.0f}",
                    f"{check.measured_step_s * 1e3:.0f}",
                    f"{check.error:+.0%}",
                    f"{check.forward_slowdown:.2f}x",
                    f"{check.predicted_slowed_step_s * 1e3:.0f}",
                    f"{check.slowed_error:+.0%}",
                ]
                for check in checks
            ],
        )
    else:
        out.append("(needs lines at 1 and at N > 1 ranks of the same configuration)")
    timed = [row for row in lines if row.get("ds_wall_clock_breakdown_s")]
    if timed:
        out += ["", "### DeepSpeed's wall-clock breakdown (`--wall-clock-breakdown`, rank 0, ms per step)", ""]
        keys = ("forward", "backward", "backward_inner", "backward_allreduce", "step")
        out += _table(
            ["configuration", "ranks", *keys],
            [
                [series_label(line), str(line["world_size"])]
                + [f"{line['ds_wall_clock_breakdown_s'][key] * 1e3:.1f}" for key in keys]
                for line in sorted(timed, key=_sort_key)
            ],
        )
    logged = [row for row in lines if (row.get("comm") or {}).get("logged_per_step")]
    if logged:
        out += [
            "",
            "### DeepSpeed comms logger, per step (extra steps after the timed window; it syncs every call)",
            "",
        ]
        rows = [
            [
                series_label(line),
                str(line["world_size"]),
                op,
                f"{stats['calls']:.0f}",
                f"{stats['message_bytes'] / 1e6:.2f}",
                f"{stats['seconds'] * 1e3:.1f}",
            ]
            for line in sorted(logged, key=_sort_key)
            for op, stats in sorted(line["comm"]["logged_per_step"].items())
        ]
        out += _table(["configuration", "ranks", "op", "calls", "MB (input tensors)", "ms"], rows)
    return [*out, ""]


def _memory_section(checks: list[MemoryCheck]) -> list[str]:
    out = [
        "## Model-state bytes per rank against the ZeRO paper",
        "",
        "Measured between backward and step, every storage once (memory.py). Paper (Rajbhandari et al. 2020), P",
        "parameters, N ranks, mixed-precision Adam: stage 1 4P + 12P/N, stage 2 2P + 14P/N, stage 3 16P/N. Its fp32",
        "equivalent, which is what yolods' torch_autocast precision holds (parameters and gradients stay fp32): stage 1",
        "8P + 8P/N, stage 2 4P + 12P/N, stage 3 16P/N. DeepSpeed 0.19.8 as implemented adds an fp32 master partition",
        "(+4P/N) even for fp32 parameters, and at stage 1 has reduced the gradients into the partition by the end of",
        "backward (stage 1 then holds what stage 2 holds). Communication buckets are not model states and not counted.",
        "",
    ]
    if not checks:
        return [*out, "(no DeepSpeed lines)", ""]
    rows = [
        [
            check.label,
            str(check.num_ranks),
            " / ".join(_mib(check.measured[key]) for key in ("params", "grads", "optimizer")),
            _mib(check.measured["total"]),
            _mib(check.deepspeed_formula),
            f"{check.measured['total'] / check.deepspeed_formula - 1:+.1%}",
            _mib(check.paper_fp32),
            _mib(check.paper_mixed),
        ]
        for check in checks
    ]
    header = [
        "configuration",
        "ranks",
        "measured params / grads / optimizer MiB",
        "measured MiB",
        "DeepSpeed formula MiB",
        "measured vs formula",
        "paper fp32 MiB",
        "paper mixed MiB",
    ]
    return [*out, *_table(header, rows), ""]


def _projection_section(projection: Projection, goal: Goal, *, cluster: Cluster) -> list[str]:
    out = [
        f"## Projection: {goal.model.removesuffix('.yaml')} @{goal.imgsz}px, {goal.micro_batch} img/GPU, "
        f"1-256 nodes of {cluster.ranks_per_node} GPUs",
        "",
        f"Compute calibration: {projection.calibration}.",
        "",
        "Model (comm_model.py): ring collectives, latency per hop + bytes / bandwidth, for what each engine issues per",
        "step; bucketed reductions hide behind backward where the engine overlaps them (DDP, ZeRO 1-3 with",
        "overlap_comm), DeepSpeed ZeRO-0's single after-backward all-reduce and ZeRO 1-2's parameter all-gather after",
        f"the step do not. One NIC per GPU at the line rate (90% achievable), NVLink inside a node, "
        f"{cluster.network_latency_s * 1e6:g} us per network hop.",
        "yolods' bf16 is torch_autocast: parameters and gradients stay fp32, so collectives move 4 bytes per element.",
        "The ring latency grows with the ranks: NCCL's trees shrink it for all-reduce, so at hundreds of nodes this",
        "is a pessimistic bound. Rows marked `+` are what-ifs, not yolods defaults.",
        "",
    ]
    header = ["engine", "Gb/s"] + [f"{n} node{'s' if n > 1 else ''}" for n in NODE_COUNTS]
    rows = [
        [name if name in ENGINE_ORDER else f"+ {name}", f"{gbps:g}"]
        + [f"{p.efficiency:.0%} ({p.imgs_per_s:,.0f})" for p in points]
        for (name, gbps), points in projection.points.items()
    ]
    out += ["Scaling efficiency (global img/s):", "", *_table(header, rows), ""]
    out += [
        f"How fast one GPU may compute before {goal.num_gpus} GPUs at {goal.link_gbps:g} Gb/s fall below "
        f"{goal.efficiency:.0%} (assumed split of compute):",
        "",
    ]
    out += _table(
        ["engine", f"comm MB/step/GPU at {goal.num_gpus} GPUs", "max img/s per GPU"],
        [
            [
                name if name in ENGINE_ORDER else f"+ {name}",
                f"{comm_bytes_per_rank(spec, num_ranks=goal.num_gpus) / 1e6:.1f}",
                f"{break_even_imgs_per_s(spec, goal, cluster=cluster):,.0f}",
            ]
            for name, spec in projection.specs.items()
        ],
    )
    latencies_us = (1.0, 2.0, 5.0, 10.0)
    nodes = max(goal.num_gpus // cluster.ranks_per_node, 1)
    out += [
        "",
        f"Efficiency at {goal.num_gpus} GPUs, {goal.link_gbps:g} Gb/s, against the network latency per ring hop "
        "(the calibration's compute):",
        "",
    ]
    rows = []
    for name, spec in projection.specs.items():
        row = [name if name in ENGINE_ORDER else f"+ {name}"]
        for latency_us in latencies_us:
            topology = replace(cluster, network_latency_s=latency_us * 1e-6).topology(goal.link_gbps)
            point = project_scaling(
                projection.compute, spec, topology=topology, micro_batch=goal.micro_batch, node_counts=[nodes]
            )[0]
            row.append(f"{point.efficiency:.1%}")
        rows.append(row)
    out += _table(["engine", *(f"{latency:g} us" for latency in latencies_us)], rows)
    return [*out, ""]


def write_report(
    out_dir: Path,
    *,
    goal: Goal,
    cluster: Cluster,
    assumed_imgs_per_s: float,
    given_imgs_per_s: float | None = None,
) -> Path:
    """Read out_dir/results.jsonl, write report.md and the PNGs next to it; returns report.md's path."""
    results = out_dir / RESULTS_FILE
    if not results.is_file():
        raise FileNotFoundError(f"{results} not found: run `python -m yolods.bench --out {out_dir}` first")
    lines = select_lines(read_lines(results))
    checks = two_rank_checks(lines)
    projection = project_goal(
        lines, goal, cluster=cluster, assumed_imgs_per_s=assumed_imgs_per_s, given_imgs_per_s=given_imgs_per_s
    )
    pngs = [
        plots.plot_throughput_vs_ranks(lines, out_dir / "throughput_vs_ranks.png"),
        plots.plot_throughput_vs_nodes(
            projection, goal, lines, cluster=cluster, path=out_dir / "throughput_vs_nodes.png"
        ),
        plots.plot_scaling_efficiency(lines, checks, out_dir / "scaling_efficiency.png"),
        plots.plot_projected_efficiency(projection, goal, out_dir / "projected_efficiency.png"),
        plots.plot_sensitivity(projection, goal, cluster=cluster, path=out_dir / "projection_sensitivity.png"),
        plots.plot_memory(lines, out_dir / "memory_per_rank.png"),
        plots.plot_breakdown(lines, out_dir / "step_breakdown.png"),
    ]
    text = [
        f"# yolods benchmark report: {out_dir.name}",
        "",
        f"`python -m yolods.bench.report {out_dir}` from {len(lines)} configurations in {RESULTS_FILE}.",
        "",
        *_environment_section(lines),
        *_goal_section(lines, projection, goal),
        *_results_section(lines),
        *_peak_memory_section(lines),
        *_scaling_section(lines, checks),
        *_memory_section(memory_checks(lines)),
        *_projection_section(projection, goal, cluster=cluster),
        "## Plots",
        "",
        *(f"![{png.stem}]({png.name})\n" for png in pngs),
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(text))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yolods.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="directory holding results.jsonl")
    parser.add_argument("--link-gbps", default="100,200,400", help="network line rates per GPU to project")
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--network-latency-us", type=float, default=5.0, help="per ring hop between nodes")
    parser.add_argument("--goal-model", default=Goal.model)
    parser.add_argument("--goal-imgsz", type=int, default=Goal.imgsz)
    parser.add_argument("--goal-micro-batch", type=int, default=Goal.micro_batch)
    parser.add_argument(
        "--assumed-gpu-imgs-per-s",
        type=float,
        default=600.0,
        help="the goal model's per-GPU compute rate when no 1-GPU line measures it (benchmarks/README.md says why 600)",
    )
    parser.add_argument(
        "--gpu-imgs-per-s",
        type=float,
        help="the goal model's per-GPU rate measured elsewhere (benchmarks/gpu/run.sh prints it); overrides both "
        "a 1-GPU line in DIR and --assumed-gpu-imgs-per-s",
    )
    args = parser.parse_args(argv)
    goal = Goal(model=args.goal_model, imgsz=args.goal_imgsz, micro_batch=args.goal_micro_batch)
    link_gbps = tuple(dict.fromkeys([*(float(v) for v in args.link_gbps.split(",")), goal.link_gbps]))
    cluster = Cluster(
        ranks_per_node=args.ranks_per_node, link_gbps=link_gbps, network_latency_s=args.network_latency_us * 1e-6
    )
    try:
        report = write_report(
            args.dir,
            goal=goal,
            cluster=cluster,
            assumed_imgs_per_s=args.assumed_gpu_imgs_per_s,
            given_imgs_per_s=args.gpu_imgs_per_s,
        )
    except FileNotFoundError as error:
        print(f"yolods.bench.report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report} and its plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
