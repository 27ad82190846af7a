"""`python -m yolods.bench.report DIR`: DIR/report.md (tables) and PNG plots from DIR/results.jsonl.

    python -m yolods.bench.report benchmarks/results/cpu
    python -m yolods.bench.report DIR --link-gbps 100,200,400 --ranks-per-node 8 --assumed-gpu-imgs-per-s 600
    python -m yolods.bench.report benchmarks/results/cpu --gpu-imgs-per-s 1400   # a rate measured on a GPU

    python -m yolods.bench.report benchmarks/results/cpu --require-clean   # refuse lines from a dirty tree

Each configuration is reported from its latest run, at the median of that run's repeats. The report opens with
where the lines came from: their yolods commits, and how many were measured from a dirty tree (or before the bench
recorded it). The projection to 1-256 nodes is calibrated with measured compute: a rate given with
--gpu-imgs-per-s (measured elsewhere, e.g. by benchmarks/gpu/run.sh), else a one-GPU line of the goal model when
DIR has one, else an assumed per-GPU rate (--assumed-gpu-imgs-per-s, default one H200's 304 img/s); every constant
it assumes is listed as such, and the report shows how the verdict moves when they vary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from yolods.bench import plots, provenance, validation
from yolods.bench.analysis import (
    ENGINE_ORDER,
    Line,
    MemoryCheck,
    PeakAgainstZero0,
    default_series,
    engine_name,
    mean_bounds,
    measured_scaling,
    memory_checks,
    paired_ratios,
    peak_against_zero0,
    ratio_vs,
    report_order,
    select_lines,
    series_label,
    two_rank_checks,
)
from yolods.bench.markdown import mib as _mib
from yolods.bench.markdown import table
from yolods.bench.projection import H200_GOAL_IMGS_PER_S, Cluster, Goal, Projection, efficiency_at, project_goal
from yolods.bench.report_options import options_section
from yolods.bench.report_projection import projection_section
from yolods.bench.report_scaling import heldout_section, scaling_section
from yolods.bench.results import RESULTS_FILE, read_lines
from yolods.bench.sweep import model_yaml
from yolods.config import check_imgsz

PHASES = ("data_wait", "forward", "backward", "optimizer")
PRECISION_ORDER = ("fp32", "bf16", "fp16")
LAYOUT_NAMES = {None: "default", True: "NHWC", False: "NCHW"}
TIE_TOLERANCE = 0.02  # paired repeats on the shared CPU machine still scatter by a few percent


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _environment_section(lines: list[Line]) -> list[str]:
    hardware = sorted(
        {(row["hardware"].get("gpu") or row["hardware"].get("cpu"), row["hardware"].get("cpu_count")) for row in lines},
        key=str,
    )
    loads = [row["load_avg"][0] for row in lines if row.get("load_avg")]
    out = ["## Where and how", ""]
    out += [f"- hardware: {name}, {cpus} logical CPUs per node" for name, cpus in hardware]
    labels = sorted({row["interconnect"].get("label") for row in lines} - {None})
    if labels:  # what the user said the links are (--interconnect)
        out.append(f"- interconnect: {'; '.join(labels)}")
    out.append(
        f"- backends: {', '.join(sorted({row['interconnect']['backend'] for row in lines}))}; "
        f"world sizes {sorted({row['world_size'] for row in lines})}; nodes {sorted({row['num_nodes'] for row in lines})}"
    )
    versions = lines[-1]["versions"]  # the commit is in the provenance section, per line
    out.append(
        "- versions: "
        + ", ".join(
            f"{name} {value}" for name, value in versions.items() if value is not None and name != "yolods_commit"
        )
    )
    threads = sorted({row["hardware"].get("torch_threads_per_rank") for row in lines} - {None})
    out.append(f"- torch threads per rank: {threads}")
    if loads:
        cores = min((row["hardware"].get("cpu_count") or 0 for row in lines), default=0)
        crowded = (
            f" (above the {cores} cores: oversubscribed, by the job's own threads or by other work)"
            if cores and max(loads) > cores
            else ""
        )
        out.append(f"- 1-minute load average when each line was written: {min(loads):.2f} to {max(loads):.2f}{crowded}")
    repeats = sorted({row.get("repeats", 1) for row in lines})
    out.append(
        f"- repeats per configuration: {repeats}; tables show the median repeat, `range` its spread; "
        f"timed steps per repeat: {sorted({row['steps'] for row in lines})} after {sorted({row['warmup_steps'] for row in lines})} burn-in"
    )
    out.append(f"- measured {min(row['timestamp'] for row in lines)} to {max(row['timestamp'] for row in lines)}")
    return [*out, ""]


def _earlier_runs_note(all_lines: list[dict], lines: list[dict]) -> str:
    """Say how many lines of earlier runs of the same configurations the report leaves out (it reads each
    configuration's latest run only), so a re-measured configuration's older figures are not missed silently."""
    left_out = len(all_lines) - sum(line["repeats"] for line in lines)
    if not left_out:
        return ""
    return f", each from its latest run ({left_out} line(s) of earlier runs of the same configurations left out)"


def _provenance_section(lines: list[Line]) -> list[str]:
    """Which commits measured the lines, and a loud count of those from a dirty or unrecorded tree."""
    state = provenance.provenance(lines)
    dirty, unrecorded = state.count(provenance.DIRTY), state.count(provenance.UNRECORDED)
    out = ["## Provenance", ""]
    if state.all_clean:
        out += [f"All {state.total} lines were measured from clean trees (committed code).", ""]
    else:
        out += [
            f"> **WARNING: rows from a dirty tree: {dirty} of {state.total}; rows whose tree state was not recorded: "
            f"{unrecorded} of {state.total}.** A dirty line measured uncommitted code, which no commit reproduces. "
            "Lines written before the bench recorded `source` carry only a commit: they may come from a dirty "
            "tree. `--require-clean` refuses to report them.",
            "",
        ]
    rows = [
        [
            f"`{commit[:12]}`" if commit else "(none)",
            line_state if line_state == provenance.CLEAN else f"**{line_state}**",
            str(number),
        ]
        for (commit, line_state), number in sorted(state.counts.items(), key=lambda item: str(item[0]))
    ]
    out += [*table(["yolods commit", "tree", "lines"], rows), ""]
    return out


def _verdict(ratio: float) -> str:
    if ratio >= 1.0:
        return "met"
    return "tie" if ratio >= 1.0 - TIE_TOLERANCE else "MISSED"


def _goal_section(lines: list[Line], projection: Projection, goal: Goal) -> list[str]:
    out = ["## Goals", ""]
    rows = []
    for line in sorted(lines, key=report_order):
        if line["engine"] != "deepspeed" or not default_series(line):
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
        table(["yolods configuration", "ranks", "baseline", "img/s ratio", "verdict"], rows) if rows else ["(no pairs)"]
    )
    out += ["", *_zero_against_ddp_goal(lines, goal)]
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
    out += table(["engine", "efficiency", "verdict"], rows)
    return [*out, ""]


def _zero_against_ddp_goal(lines: list[Line], goal: Goal) -> list[str]:
    """Goal 2, with the repeats' spread: a 2-repeat cell moves by a few percent here, as much as the margins."""
    out = [
        f"**2. ZeRO-1/2 at >= {goal.ratio_vs_ddp_at_2:.2f}x DDP and ZeRO-3 at >= {goal.zero3_ratio_vs_ddp_at_2:.2f}x DDP "
        "at 2 ranks** (each repeat over DDP's repeat in the same pass; `met` when the mean's lower 95% bound clears "
        "the goal, `MISSED` when its upper bound is below it, `unresolved` between; with fewer than 3 pairs the "
        "median decides)",
        "",
    ]
    rows = []
    for line in sorted(lines, key=report_order):
        goal_ratio = goal.ratio_vs_ddp_for(line["zero_stage"]) if line["engine"] == "deepspeed" else None
        ratios = paired_ratios(line, lines, "ddp")
        if goal_ratio is None or line["world_size"] != 2 or not default_series(line) or not ratios:
            continue
        bounds = mean_bounds(ratios)
        if bounds is None:
            verdict = "met" if statistics.median(ratios) >= goal_ratio else "MISSED"
        else:
            verdict = "met" if bounds[0] >= goal_ratio else "MISSED" if bounds[1] < goal_ratio else "unresolved"
        rows.append(
            [
                series_label(line),
                f"{goal_ratio:.2f}x",
                str(len(ratios)),
                f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})",
                "-" if bounds is None else f"{statistics.fmean(ratios):.3f}x ({bounds[0]:.3f}-{bounds[1]:.3f})",
                verdict,
            ]
        )
    header = ["yolods configuration", "goal", "pairs", "median ratio (range)", "mean (90% interval)", "verdict"]
    return [*out, *(table(header, rows) if rows else ["(no 2-rank ZeRO-1, 2 or 3 line with a DDP line)"])]


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
    for line in sorted(lines, key=report_order):
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
        *table(header, rows),
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
            if default_series(line) or line.get("config", {}).get("channels_last") is not None:
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
            *table(header, rows),
            "",
        ]
    if not out:
        return []
    return [
        "## Peak memory per rank by ZeRO stage, precision and memory format",
        "",
        "MiB, `torch.cuda.max_memory_allocated` on GPU (CPU: peak RSS, torch included). `default`: yolods' own",
        "memory format (standard-layout images; until 2026-11-29 NHWC images on CUDA, as in results/gpu); NHWC / NCHW:",
        "the images' layout, set with `--channels-last on,off` (NHWC at ZeRO-0 on CUDA only; CPU always trains NCHW).",
        "",
        *out,
    ]


def _peak_against_zero0_section(rows: list[PeakAgainstZero0]) -> list[str]:
    """What partitioning saved in model states against what the peak did, per ZeRO 1-3 line."""
    if not rows:
        return []
    return [
        "## Does ZeRO save memory here? Model states against peak memory, vs ZeRO-0",
        "",
        "Per rank, against ZeRO-0 at the same model, size, batch, precision, input and ranks. ZeRO 1-3 partition the",
        "model states (negative: saved), but DeepSpeed also allocates flat buffers and bucket copies during",
        "initialize, backward and step (not model states, so not in the states column). For a 3-11M parameter",
        "detector those exceed what partitioning saves, so the peak goes up, not down.",
        "",
        *table(
            [
                "configuration",
                "ranks",
                "model states vs ZeRO-0 MiB",
                "peak vs ZeRO-0 MiB",
                "peak / ZeRO-0",
                "peak / DDP",
            ],
            [
                [
                    row.label,
                    str(row.num_ranks),
                    f"{row.states_delta_bytes / 2**20:+,.1f}",
                    f"{row.peak_delta_bytes / 2**20:+,.1f}",
                    f"{row.peak_ratio:.2f}x",
                    "-" if row.peak_ratio_vs_ddp is None else f"{row.peak_ratio_vs_ddp:.2f}x",
                ]
                for row in rows
            ],
        ),
        "",
    ]


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
        "The EMA of the weights (fp32, 4P) is counted apart: ZeRO-3 partitions it like the parameters (4P/N, yolods.ema),",
        "with no per-step communication; its update time is the median of 5 updates after the timed steps (`-`: no EMA",
        "or a line measured before the bench recorded it).",
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
            _ema_cells(check),
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
        "EMA MiB (vs 4P or 4P/N), update ms",
    ]
    return [*out, *table(header, rows), ""]


def _ema_cells(check: MemoryCheck) -> str:
    measured = check.measured.get("ema")
    if not measured:
        return "-"
    update = "-" if check.ema_update_s is None else f"{check.ema_update_s * 1000:.1f}"
    return f"{_mib(measured)} ({measured / check.ema_formula - 1:+.1%}), {update}"


class DirtyResultsError(ValueError):
    """--require-clean and a line from a dirty (or unrecorded) tree."""


def write_report(
    out_dir: Path,
    *,
    goal: Goal,
    cluster: Cluster,
    assumed_imgs_per_s: float,
    given_imgs_per_s: float | None = None,
    require_clean: bool = False,
) -> Path:
    """Read out_dir/results.jsonl, write report.md and the PNGs next to it; returns report.md's path.

    Raises:
        FileNotFoundError: no results.jsonl in out_dir.
        DirtyResultsError: `require_clean` and a selected line was not measured from a clean tree.
    """
    results = out_dir / RESULTS_FILE
    if not results.is_file():
        raise FileNotFoundError(f"{results} not found: run `python -m yolods.bench --out {out_dir}` first")
    skipped: list[str] = []
    all_lines = read_lines(results, skipped=skipped)
    for where in skipped:
        print(f"yolods.bench.report: WARNING: {where}: left out", file=sys.stderr)
    if not any(line["engine"] != "ultralytics" for line in all_lines):
        raise FileNotFoundError(
            f"{results} holds no yolods line (DeepSpeed or DDP) to report on"
            + (f" ({len(all_lines)} Ultralytics baseline line(s))" if all_lines else "")
            + f": measure one with `python -m yolods.bench --out {out_dir}`"
        )
    lines = select_lines(all_lines)
    state = provenance.provenance(lines)
    if require_clean and not state.all_clean:
        raise DirtyResultsError(
            f"--require-clean: {state.count(provenance.DIRTY)} of {state.total} configurations come from a dirty "
            f"tree and {state.count(provenance.UNRECORDED)} did not record it; rerun them from a clean commit"
        )
    checks = two_rank_checks(lines)
    scaling = measured_scaling(lines)
    heldout = validation.probe_holdout(all_lines) + validation.logged_op_checks(lines) + validation.step_holdout(checks)
    projection = project_goal(
        lines, goal, cluster=cluster, assumed_imgs_per_s=assumed_imgs_per_s, given_imgs_per_s=given_imgs_per_s
    )
    pngs = [
        plots.plot_throughput_vs_ranks(lines, out_dir / "throughput_vs_ranks.png"),
        plots.plot_throughput_vs_nodes(
            projection, goal, lines, cluster=cluster, path=out_dir / "throughput_vs_nodes.png"
        ),
        plots.plot_scaling_efficiency(scaling, checks, out_dir / "scaling_efficiency.png"),
        plots.plot_projected_efficiency(projection, goal, out_dir / "projected_efficiency.png"),
        plots.plot_sensitivity(projection, goal, cluster=cluster, path=out_dir / "projection_sensitivity.png"),
        plots.plot_memory(lines, out_dir / "memory_per_rank.png"),
        plots.plot_breakdown(lines, out_dir / "step_breakdown.png"),
    ]
    text = [
        f"# yolods benchmark report: {out_dir.name}",
        "",
        f"`python -m yolods.bench.report {out_dir}` from {len(lines)} configurations in {RESULTS_FILE}"
        f"{_earlier_runs_note(all_lines, lines)}.",
        "",
        *_provenance_section(lines),
        *_environment_section(lines),
        *_goal_section(lines, projection, goal),
        *_results_section(lines),
        *_peak_memory_section(lines),
        *_peak_against_zero0_section(peak_against_zero0(lines)),
        *options_section(lines),
        *scaling_section(lines, scaling, checks),
        *heldout_section(heldout),
        *_memory_section(memory_checks(lines)),
        *projection_section(projection, goal, cluster=cluster),
        "## Plots",
        "",
        *(f"![{png.stem}]({png.name})\n" for png in pngs),
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(text))
    return report


def _goal_and_cluster(args: argparse.Namespace) -> tuple[Goal, Cluster]:
    """The projection's goal and cluster from the flags; a value no projection can use raises ValueError."""
    for flag, value, least in (
        ("--ranks-per-node", args.ranks_per_node, 1),
        ("--goal-micro-batch", args.goal_micro_batch, 1),
        ("--network-latency-us", args.network_latency_us, 0),
    ):
        if value < least:
            raise ValueError(f"{flag} {value:g} must be at least {least}")
    check_imgsz(args.goal_imgsz, flag="--goal-imgsz")  # a ConfigError, which is a ValueError
    for flag, rate in (
        ("--assumed-gpu-imgs-per-s", args.assumed_gpu_imgs_per_s),
        ("--gpu-imgs-per-s", args.gpu_imgs_per_s),
    ):
        if rate is not None and not rate > 0:
            raise ValueError(f"{flag} {rate:g}: a rate must be above 0 img/s")
    try:
        rates = [float(value) for value in args.link_gbps.split(",")]
    except ValueError:
        raise ValueError(f"--link-gbps {args.link_gbps!r} takes Gb/s numbers, e.g. --link-gbps 100,200,400") from None
    if not all(rate > 0 for rate in rates):
        raise ValueError(f"--link-gbps {args.link_gbps}: line rates must be above 0 Gb/s")
    goal = Goal(model=model_yaml(args.goal_model), imgsz=args.goal_imgsz, micro_batch=args.goal_micro_batch)
    cluster = Cluster(
        ranks_per_node=args.ranks_per_node,
        link_gbps=tuple(dict.fromkeys([*rates, goal.link_gbps])),
        network_latency_s=args.network_latency_us * 1e-6,
    )
    return goal, cluster


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
        default=H200_GOAL_IMGS_PER_S,
        help="the goal model's per-GPU compute rate when no 1-GPU line measures it (default: one H200's, measured "
        "by benchmarks/gpu/run.sh: benchmarks/results/gpu)",
    )
    parser.add_argument(
        "--gpu-imgs-per-s",
        type=float,
        help="the goal model's per-GPU rate measured elsewhere (benchmarks/gpu/run.sh prints it); overrides both "
        "a 1-GPU line in DIR and --assumed-gpu-imgs-per-s",
    )
    parser.add_argument(
        "--require-clean",
        action="store_true",
        help="refuse (exit 2, nothing written) when a configuration was measured from a dirty or unrecorded tree",
    )
    args = parser.parse_args(argv)
    try:
        goal, cluster = _goal_and_cluster(args)
    except ValueError as error:
        print(f"yolods.bench.report: error: {error}", file=sys.stderr)
        return 2
    try:
        report = write_report(
            args.dir,
            goal=goal,
            cluster=cluster,
            assumed_imgs_per_s=args.assumed_gpu_imgs_per_s,
            given_imgs_per_s=args.gpu_imgs_per_s,
            require_clean=args.require_clean,
        )
    except (FileNotFoundError, DirtyResultsError) as error:
        print(f"yolods.bench.report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report} and its plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
