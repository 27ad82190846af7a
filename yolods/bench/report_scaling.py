"""The report's sections on scaling measured here: efficiency 1 -> N ranks with the repeats' spread, the
communication model against the measured step, DeepSpeed's own timers and comms logger, and the communication
model on points it was not fitted to."""

from __future__ import annotations

from yolods.bench import validation
from yolods.bench.analysis import Line, MeasuredScaling, TwoRankCheck, report_order, series_label
from yolods.bench.markdown import table


def scaling_section(lines: list[Line], scaling: list[MeasuredScaling], checks: list[TwoRankCheck]) -> list[str]:
    out = [
        "## Scaling measured here (weak scaling: fixed images per rank)",
        "",
        "Efficiency: img/s at N ranks over N x img/s at 1 rank, the median of repeat-by-repeat ratios where both",
        "sides have the same repeats (1- and N-rank runs alternated). `range`: the worst N-rank repeat over the best",
        "1-rank one, and the best over the worst: what load drift between the runs can do. A figure above 100% is",
        "noise when its range reaches below 100%, else less work per rank (ZeRO 1-3 update 1/N of the optimizer",
        "states) or load that differed between the runs; the `load` column is the 1-minute load average when the",
        "1-rank and the N-rank line were written.",
        "",
    ]
    if scaling:
        out += table(
            ["configuration", "ranks", "img/s", "efficiency (range)", "load 1 -> N", "step ms added (mean)", "note"],
            [
                [
                    row.label,
                    f"1 -> {row.num_ranks}",
                    f"{row.single_imgs_per_s:.1f} -> {row.multi_imgs_per_s:.1f}",
                    f"{row.efficiency:.0%} ({row.low:.0%}-{row.high:.0%})",
                    "-"
                    if row.load_single is None or row.load_multi is None
                    else f"{row.load_single:.1f} -> {row.load_multi:.1f}",
                    f"{row.step_ms_added:+.0f}",
                    row.note,
                ]
                for row in scaling
            ],
        )
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
            "them), which the model leaves out. `fitted`: every compute phase slowed by this line's own forward",
            "slowdown, so fitted to the line it predicts; `held out`: slowed by the median slowdown of the other",
            "configurations, so checked on a line it was not fitted to.",
            "",
        ]
        out += table(
            [
                "configuration",
                "ranks",
                "1-rank compute ms",
                "model comm ms",
                "predicted step ms",
                "measured step ms",
                "error",
                "fwd slowdown (fitted / held out)",
                "error, fitted",
                "error, held out",
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
                    f"{check.forward_slowdown:.2f}x / "
                    + ("-" if check.heldout_slowdown is None else f"{check.heldout_slowdown:.2f}x"),
                    f"{check.slowed_error:+.0%}",
                    "-" if check.heldout_error is None else f"{check.heldout_error:+.0%}",
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
        out += table(
            ["configuration", "ranks", *keys],
            [
                [series_label(line), str(line["world_size"])]
                + [f"{line['ds_wall_clock_breakdown_s'][key] * 1e3:.1f}" for key in keys]
                for line in sorted(timed, key=report_order)
            ],
        )
    logged = [row for row in lines if (row.get("comm") or {}).get("logged_per_step")]
    if logged:
        out += [
            "",
            "### DeepSpeed comms logger, per step (extra steps after the timed window; it syncs every call)",
            "",
        ]
        rows = []
        for line in sorted(logged, key=report_order):
            for op, stats in sorted(line["comm"]["logged_per_step"].items()):
                model_s = validation.logged_op_prediction(line, op, stats)
                rows.append(
                    [
                        series_label(line),
                        str(line["world_size"]),
                        op,
                        f"{stats['calls']:.0f}",
                        f"{stats['message_bytes'] / 1e6:.2f}",
                        f"{stats['seconds'] * 1e3:.1f}",
                        "-" if model_s is None else f"{model_s * 1e3:.1f}",
                        "-" if model_s is None or stats["seconds"] <= 0 else f"{model_s / stats['seconds'] - 1:+.0%}",
                    ]
                )
        out += [
            "`model ms`: the probe's link for that op at the logged calls and bytes (held out: the probe never saw",
            "these collectives). A logged time includes waiting for the slower rank; ZeRO-3's parameter all-gathers",
            "are async and timed at launch, so they have no model figure.",
            "",
        ]
        out += table(["configuration", "ranks", "op", "calls", "MB (input tensors)", "ms", "model ms", "error"], rows)
    return [*out, ""]


def heldout_section(points: list[validation.HeldOutPoint]) -> list[str]:
    """The communication model's error on measurements it was not fitted to, one row per check."""
    out = ["## The communication model on points it was not fitted to", ""]
    if not points:
        return [*out, "(needs multi-rank lines with a link probe)", ""]
    out += [
        "Each row fits the model on one set of measurements and predicts another (validation.py): link fits on two",
        "of the probe's four message sizes, scored on the other two; the full probe fit, scored on the collectives",
        "DeepSpeed's comms logger timed inside training steps; the 1 -> N step with the compute slowdown of the other",
        "configurations. Error: predicted / measured - 1; `worst` keeps its sign. Link-fit errors of tens of percent",
        "mean latency + bytes / bandwidth describes these links only roughly (on a loaded machine small messages",
        "are mostly noise); in-step all-reduces also wait for the slower rank, which the model leaves out. The",
        "projection's links are assumed, not fitted: these errors bound a fitted model, not the projection.",
        "",
        *table(
            ["predicted", "fitted on", "points", "median abs error", "worst"],
            [
                [
                    summary.check,
                    summary.fitted_on,
                    str(summary.points),
                    f"{summary.median_abs_error:.0%}",
                    f"{summary.worst_error:+.0%}",
                ]
                for summary in validation.summarize(points)
            ],
        ),
        "",
    ]
    return out
