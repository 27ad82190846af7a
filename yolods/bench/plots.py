"""The report's PNG plots (matplotlib, Agg backend): each one titled and labelled to read without the tables."""

from __future__ import annotations

from pathlib import Path

from yolods import dist
from yolods.bench.analysis import (
    ENGINE_ORDER,
    Line,
    MeasuredScaling,
    TwoRankCheck,
    default_series,
    engine_name,
    memory_checks,
    series_label,
)
from yolods.bench.projection import SENSITIVITY_IMGS_PER_S, Cluster, Goal, Projection, efficiency_at_rate

MIB = 2**20
PHASE_COLORS = {"data_wait": "#9e9e9e", "forward": "#4c72b0", "backward": "#dd8452", "optimizer": "#55a868"}
ENGINE_COLORS = dict(zip(ENGINE_ORDER, ("#333333", "#4c72b0", "#55a868", "#dd8452", "#c44e52", "#8172b3")))
# ZeRO-1 and ZeRO-2 often coincide: ZeRO-1 is drawn dashed on top. What-ifs get their own colours, dotted.
ENGINE_STYLES = {"ZeRO-1": (0, (4, 2))}
WHAT_IF_COLORS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _color(name: str, what_ifs: tuple[str, ...] = ()) -> str:
    """An engine's colour; a what-if variant its own."""
    if name in ENGINE_COLORS:
        return ENGINE_COLORS[name]
    return WHAT_IF_COLORS[what_ifs.index(name) % len(WHAT_IF_COLORS)] if name in what_ifs else "#777777"


def _draw_order(names) -> list[str]:
    """ZeRO-1 last, so its dashes show over an identical ZeRO-2 line."""
    return sorted(names, key=lambda name: name == "ZeRO-1")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure to `path` as a PNG and close it; returns `path`.

    Closing matters: pyplot keeps every figure it made alive until it is closed, and a report draws several.
    """
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _groups(lines: list[Line]) -> dict[tuple, list[Line]]:
    """Lines by (model, imgsz, micro batch, precision, input, device): one panel each."""
    groups: dict[tuple, list[Line]] = {}
    for line in lines:
        key = (
            line["model"],
            line["imgsz"],
            line["micro_batch"],
            line["precision"],
            line["input"],
            line.get("config", {}).get("device"),
        )
        groups.setdefault(key, []).append(line)
    return groups


def _group_title(key: tuple) -> str:
    model, imgsz, micro, precision, input_mode, device = key
    return f"{model.removesuffix('.yaml')} @{imgsz}px, {micro} img/rank, {precision}, {input_mode} input ({device})"


def plot_throughput_vs_ranks(lines: list[Line], path: Path) -> Path:
    plt = _pyplot()
    groups = {
        key: group for key, group in _groups(lines).items() if any(row["engine"] != "ultralytics" for row in group)
    }
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 4.2 * len(groups)), squeeze=False)
    for ax, (key, group) in zip(axes[:, 0], groups.items()):
        for name in ENGINE_ORDER:
            series = sorted(
                (row for row in group if engine_name(row) == name and default_series(row)),
                key=lambda row: row["world_size"],
            )
            if not series:
                continue
            ranks = [row["world_size"] for row in series]
            marker = "*" if name == "Ultralytics" else "o"
            ax.plot(ranks, [row["imgs_per_s"] for row in series], marker=marker, color=_color(name), label=name)
            if series[0]["world_size"] == 1 and len(series) > 1:
                per_rank = series[0]["imgs_per_s"]
                ax.plot(ranks, [per_rank * r for r in ranks], ":", color=_color(name), alpha=0.6)
        ax.plot([], [], ":", color="grey", label="ideal (N x 1-rank img/s)")
        ax.set_title(_group_title(key), fontsize=10)
        ax.set_xlabel("ranks (world size)")
        ax.set_ylabel("images/s (global)")
        ax.set_xticks(sorted({row["world_size"] for row in group}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.suptitle("Measured throughput against ranks (dotted: ideal, N x the 1-rank figure)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return _save(fig, path)


def plot_throughput_vs_nodes(
    projection: Projection, goal: Goal, lines: list[Line], *, cluster: Cluster, path: Path
) -> Path:
    """Projected images/s against nodes, one panel per engine, one line per link speed, with the ideal line and
    any measured multi-node points of the goal model."""
    plt = _pyplot()
    names = [name for name in projection.specs if name in ENGINE_ORDER]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 4.3), sharey=True, squeeze=False)
    styles = dict(zip(sorted(cluster.link_gbps), ("--", "-", "-.", ":")))
    for ax, name in zip(axes[0], names):
        for gbps in cluster.link_gbps:
            points = projection.points[(name, gbps)]
            nodes = [point.num_nodes for point in points]
            ax.plot(nodes, [p.imgs_per_s for p in points], styles[gbps], color=_color(name), label=f"{gbps:g} Gb/s")
        # the same per-rank compute with free communication (ZeRO 1-3: their optimizer share shrinks with N)
        ax.plot(nodes, [p.ideal_imgs_per_s for p in points], ":", color="grey", label="ideal")
        measured = [
            row
            for row in lines
            if engine_name(row) == name
            and row["model"] == goal.model
            and row["imgsz"] == goal.imgsz
            and row["num_nodes"] > 1
        ]
        if measured:
            ax.plot(
                [row["num_nodes"] for row in measured], [row["imgs_per_s"] for row in measured], "ko", label="measured"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(f"nodes ({cluster.ranks_per_node} GPUs each)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("images/s, global (projected)")
    source = "measured" if projection.measured else "ASSUMED"
    fig.suptitle(
        f"{goal.model.removesuffix('.yaml')} @{goal.imgsz}px, {goal.micro_batch} img/GPU: projected throughput vs nodes "
        f"(compute {projection.compute.total_s * 1e3:.1f} ms/step, {source})",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_scaling_efficiency(scaling: list[MeasuredScaling], checks: list[TwoRankCheck], path: Path) -> Path:
    """Efficiency 1 -> N ranks measured here (with the repeats' spread), beside the communication model's
    prediction: raw, and with the compute slowed by the other configurations' measured slowdown (held out)."""
    plt = _pyplot()
    labels, measured, spread, predicted, heldout = [], [], [], [], []
    for check in checks:
        row = next((r for r in scaling if r.label == check.label and r.num_ranks == check.num_ranks), None)
        if row is None or check.predicted_heldout_step_s is None:
            continue
        labels.append(f"{check.label}, 1 -> {check.num_ranks} ranks")
        measured.append(row.efficiency)
        spread.append((row.efficiency - row.low, row.high - row.efficiency))
        predicted.append(check.compute_s / check.predicted_step_s)
        heldout.append(check.compute_s / check.predicted_heldout_step_s)
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(labels) + 1.6))
    positions = range(len(labels))
    ax.barh(
        [p - 0.27 for p in positions],
        measured,
        height=0.27,
        label="measured (bar: the repeats' spread)",
        color="#4c72b0",
        xerr=list(zip(*spread)) if spread else None,
        error_kw={"elinewidth": 0.8, "capsize": 2},
    )
    for offset, values, label, color in (
        (0.0, predicted, "comm. model, probed links", "#c7c7c7"),
        (0.27, heldout, "comm. model, compute slowed as the other configurations were", "#8da0cb"),
    ):
        ax.barh([p + offset for p in positions], values, height=0.27, label=label, color=color)
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_yticks(list(positions), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("scaling efficiency = img/s(N) / (N x img/s(1))")
    ax.set_title("This machine, 1 -> N ranks: measured and modelled", fontsize=10, pad=34)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)  # above the bars
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)


def plot_projected_efficiency(projection: Projection, goal: Goal, path: Path) -> Path:
    """Projected efficiency of the goal model against GPUs at the goal's link speed, per engine."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name in _draw_order(name for name in projection.specs if name in ENGINE_ORDER):
        points = projection.points[(name, goal.link_gbps)]
        ax.plot(
            [p.num_ranks for p in points],
            [p.efficiency for p in points],
            marker="o",
            markersize=4 if name == "ZeRO-1" else 6,
            color=_color(name),
            linestyle=ENGINE_STYLES.get(name, "-"),
            label=name,
        )
    ax.axhline(goal.efficiency, color="black", linestyle="--", linewidth=0.8, label=f"goal {goal.efficiency:.0%}")
    ax.axvline(goal.num_gpus, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("projected efficiency: compute / step")
    ax.set_title(
        f"{goal.model.removesuffix('.yaml')}@{goal.imgsz}, {goal.micro_batch} img/GPU, {goal.link_gbps:g} Gb/s per GPU "
        f"({'measured' if projection.measured else 'ASSUMED'} compute)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_sensitivity(projection: Projection, goal: Goal, *, cluster: Cluster, path: Path) -> Path:
    """Projected efficiency at the goal's GPU count against the ASSUMED per-GPU compute speed, one panel per
    link speed: how far the verdict rests on the two numbers the projection assumes most."""
    plt = _pyplot()
    rates = [100 * 1.25**i for i in range(24)]
    speeds = sorted(cluster.link_gbps)
    fig, axes = plt.subplots(1, len(speeds), figsize=(5.2 * len(speeds), 4.6), sharey=True, squeeze=False)
    what_ifs = tuple(name for name in projection.specs if name not in ENGINE_ORDER)
    calibrated_rate = goal.micro_batch / projection.compute.total_s
    for ax, gbps in zip(axes[0], speeds):
        for name in _draw_order(projection.specs):
            spec = projection.specs[name]
            efficiencies = [
                efficiency_at_rate(spec, goal, cluster=cluster, imgs_per_s=rate, link_gbps=gbps) for rate in rates
            ]
            style = ENGINE_STYLES.get(name, "-") if name in ENGINE_ORDER else ":"
            label = name if name in ENGINE_ORDER else f"what-if: {name}"
            ax.plot(rates, efficiencies, color=_color(name, what_ifs), linestyle=style, linewidth=1.6, label=label)
        ax.axvspan(min(SENSITIVITY_IMGS_PER_S), max(SENSITIVITY_IMGS_PER_S), color="#f2f2f2", zorder=0)
        ax.axhline(goal.efficiency, color="black", linestyle="--", linewidth=0.8)
        ax.axvline(calibrated_rate, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(
            f"{'measured' if projection.measured else 'ASSUMED'}: {calibrated_rate:.0f} img/s",
            (calibrated_rate, 0.05),
            fontsize=8,
            rotation=90,
            va="bottom",
            ha="right",
        )
        ax.set_xscale("log")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{gbps:g} Gb/s per GPU{' (goal)' if gbps == goal.link_gbps else ''}", fontsize=10)
        ax.set_xlabel(f"per-GPU compute of {goal.model.removesuffix('.yaml')}@{goal.imgsz} (img/s)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"projected efficiency at {goal.num_gpus} GPUs")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)  # below, off the curves
    fig.suptitle(
        f"{goal.micro_batch} img/GPU: the faster the GPU or the slower the link, the less communication hides "
        f"(shaded: {min(SENSITIVITY_IMGS_PER_S):g}-{max(SENSITIVITY_IMGS_PER_S):g} img/s, the report's table)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, path)


def _memory_rows(lines: list[Line]) -> list[Line]:
    """One line per (model, engine, ranks), default settings, fp32 and the smallest size first: model states do
    not depend on image size or on torch_autocast precision."""
    candidates = sorted(
        (row for row in lines if row.get("model_state_bytes") and default_series(row)),
        key=lambda row: (row["precision"] != "fp32", row["input"] != "synthetic", row["imgsz"]),
    )
    chosen: dict[tuple, Line] = {}
    for row in candidates:
        chosen.setdefault((row["model"], engine_name(row), row["world_size"]), row)
    return sorted(
        chosen.values(), key=lambda row: (row["model"], ENGINE_ORDER.index(engine_name(row)), row["world_size"])
    )


def plot_memory(lines: list[Line], path: Path) -> Path:
    """Model-state bytes per rank (stacked, with the formulas) and peak memory per rank, per engine and ranks."""
    plt = _pyplot()
    rows = _memory_rows(lines)
    fig, (states_ax, peak_ax) = plt.subplots(
        1, 2, figsize=(13, 0.32 * len(rows) + 1.8), sharey=True, gridspec_kw={"width_ratios": (3, 2)}
    )
    labels = [
        f"{row['model'].removesuffix('.yaml')} {engine_name(row)}, {dist.ranks_phrase(row['world_size'])}"
        for row in rows
    ]
    positions = list(range(len(rows)))
    left = [0.0] * len(rows)
    for part, color in (("params", "#4c72b0"), ("grads", "#dd8452"), ("optimizer", "#55a868")):
        values = [row["model_state_bytes"][part] / MIB for row in rows]
        states_ax.barh(positions, values, left=left, color=color, label=part)
        left = [a + b for a, b in zip(left, values)]
    checks = {(c.label, c.num_ranks): c for c in memory_checks(rows)}
    for position, line in zip(positions, rows):
        check = checks.get((series_label(line), line["world_size"]))
        if check:
            states_ax.plot(check.paper_fp32 / MIB, position, "k|", markersize=14)
            states_ax.plot(check.deepspeed_formula / MIB, position, "wo", markeredgecolor="black", markersize=5)
    states_ax.plot([], [], "k|", markersize=10, label="ZeRO paper, fp32 Adam")
    states_ax.plot([], [], "wo", markeredgecolor="black", markersize=5, label="DeepSpeed 0.19.8 formula")
    states_ax.set_yticks(positions, labels, fontsize=8)
    states_ax.invert_yaxis()
    states_ax.set_xlabel("MiB per rank")
    states_ax.set_title("Model states per rank, between backward and step", fontsize=10)
    states_ax.legend(fontsize=8, loc="upper right")
    states_ax.grid(alpha=0.3, axis="x")
    peak_ax.barh(
        positions,
        [row["peak_mem_bytes"] / MIB for row in rows],
        color=[ENGINE_COLORS[engine_name(row)] for row in rows],
    )
    sources = sorted({row.get("peak_mem_source", "?") for row in rows})
    peak_ax.set_xlabel(f"MiB ({', '.join(sources)}; CPU RSS includes torch itself)")
    peak_ax.set_title("Peak memory per rank (max over ranks)", fontsize=10)
    peak_ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)


def plot_breakdown(lines: list[Line], path: Path) -> Path:
    """Mean step time split into data wait, forward, backward (with reduction) and optimizer step."""
    plt = _pyplot()
    rows = [row for row in lines if row.get("breakdown_s")]
    rows.sort(
        key=lambda row: (
            row["model"],
            row["imgsz"],
            row["input"],
            row["world_size"],
            ENGINE_ORDER.index(engine_name(row)),
        )
    )
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.5))
    labels = [f"{series_label(row)} | {row['world_size']} rank(s)" for row in rows]
    left = [0.0] * len(rows)
    for phase, color in PHASE_COLORS.items():
        values = [row["breakdown_s"][phase] * 1e3 for row in rows]
        ax.barh(range(len(rows)), values, left=left, color=color, label=phase.replace("_", " "))
        left = [a + b for a, b in zip(left, values)]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (mean over timed steps and ranks); backward includes gradient reduction")
    ax.set_title("Step-time breakdown", fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _save(fig, path)
