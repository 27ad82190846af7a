"""The communication model checked on points it was not fitted to.

Three held-out checks, each fitted on one set of measurements and scored on another:

- link fits: each multi-rank run's probe times every collective at 4 KiB, 1 MiB, 8 MiB and 32 MiB. Fitted on the
  two ends, the line latency + bytes / bandwidth predicts the two middle sizes (interpolation, where yolods' 8 MB
  buckets fall); fitted on the two smallest, it predicts the two largest (extrapolation, 8-32x).
- in-step collectives: DeepSpeed's comms logger times the collectives of real training steps (`--comms-logger`);
  the link fitted on all four probe sizes, which never saw them, predicts each one from its calls and bytes.
  A logged time includes waiting for the slower rank to arrive, which the model leaves out. ZeRO-3's parameter
  all-gathers are left out: DeepSpeed issues them with async_op=True and the logger stops its timer when the
  call returns (its synchronize is a no-op on CPU), so their logged time is the launch, not the transfer.
- the 1 -> N step: analysis.TwoRankCheck, with the compute slowdown taken from the other configurations.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from yolods.bench.analysis import Line, TwoRankCheck, series_label
from yolods.bench.comm_model import (
    ALL_GATHER,
    ALL_REDUCE,
    REDUCE_SCATTER,
    Collective,
    Link,
    collective_time_s,
    fit_link,
)

# DeepSpeed comms-logger op names -> the model's ring collectives. The logger counts input bytes: an all-gather's
# input is this rank's shard, so its whole tensor is N times that.
LOGGED_OPS = {
    "all_reduce": (ALL_REDUCE, False),
    "all_gather_into_tensor": (ALL_GATHER, True),
    "reduce_scatter_tensor": (REDUCE_SCATTER, False),
}
PROBE_SPLITS = ((0, 3), (0, 1))  # indices into the probe's 4 sizes to fit on; the other two are predicted


def _size(message_bytes: float) -> str:
    return f"{message_bytes / 2**20:g} MiB" if message_bytes >= 2**20 else f"{message_bytes / 2**10:g} KiB"


@dataclass(frozen=True)
class HeldOutPoint:
    """One prediction on a measurement the model was not fitted to."""

    check: str  # which check, e.g. "all_reduce at 8 MiB"
    fitted_on: str
    label: str  # what was measured
    predicted_s: float
    measured_s: float

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


def _time_s(op: str, message_bytes: float, *, calls: int, num_ranks: int, link: Link) -> float:
    return collective_time_s(Collective(op, message_bytes, calls, "backward", False), num_ranks=num_ranks, link=link)


def _probes(lines: list[Line]) -> list[tuple[str, int, dict]]:
    """Each distinct probe (one per multi-rank invocation; its lines share it): (first timestamp, ranks, probe)."""
    probes: dict[tuple, tuple[str, int, dict]] = {}
    for line in sorted(lines, key=lambda line: line["timestamp"]):
        probe = line.get("interconnect", {}).get("probe")
        if probe and line["world_size"] > 1:
            key = (line["world_size"], tuple(tuple(fit["seconds"]) for _, fit in sorted(probe["ops"].items())))
            probes.setdefault(key, (line["timestamp"], line["world_size"], probe))
    return list(probes.values())


def probe_holdout(lines: list[Line]) -> list[HeldOutPoint]:
    """Link fits on two probe sizes, scored on the other two, for every op of every probe in `lines` (pass all
    lines, not only the selected repeats: each multi-rank invocation probed once)."""
    points = []
    for timestamp, ranks, probe in _probes(lines):
        for op, fit in sorted(probe["ops"].items()):
            sizes, seconds = fit["message_bytes"], fit["seconds"]
            if len(sizes) != 4:
                continue
            for fitted in PROBE_SPLITS:
                link = fit_link(
                    op=op,
                    num_ranks=ranks,
                    message_bytes=[sizes[i] for i in fitted],
                    seconds=[seconds[i] for i in fitted],
                )
                points += [
                    HeldOutPoint(
                        check=f"{op} at {_size(sizes[i])}",
                        fitted_on=f"probe at {' + '.join(_size(sizes[j]) for j in fitted)}",
                        label=f"probe of {timestamp}, {ranks} ranks",
                        predicted_s=_time_s(op, sizes[i], calls=1, num_ranks=ranks, link=link),
                        measured_s=seconds[i],
                    )
                    for i in range(len(sizes))
                    if i not in fitted
                ]
    return points


def logged_op_prediction(line: Line, name: str, stats: dict[str, float]) -> float | None:
    """Seconds per step the probe's link gives one logged op (`stats`: calls, message_bytes, seconds), or None
    where the model has no such op, the run no probe, or the logger cannot time it."""
    probe = line.get("interconnect", {}).get("probe")
    if name not in LOGGED_OPS or not probe:  # e.g. broadcast at initialize
        return None
    if line["zero_stage"] == 3 and name == "all_gather_into_tensor":
        return None  # timed at launch (async_op=True): see the module doc
    op, input_is_shard = LOGGED_OPS[name]
    fit = probe["ops"].get(op)
    if fit is None:
        return None
    ranks = line["world_size"]
    whole_bytes = stats["message_bytes"] * (ranks if input_is_shard else 1)
    link = Link(fit["bandwidth_bytes_per_s"], fit["latency_s"])
    return _time_s(op, whole_bytes, calls=max(round(stats["calls"]), 1), num_ranks=ranks, link=link)


def logged_op_checks(lines: list[Line]) -> list[HeldOutPoint]:
    """Each collective DeepSpeed's comms logger timed in training, against the probe's link for that op."""
    points = []
    for line in lines:
        for name, stats in sorted(((line.get("comm") or {}).get("logged_per_step") or {}).items()):
            predicted = logged_op_prediction(line, name, stats)
            if predicted is None or stats["seconds"] <= 0:
                continue
            points.append(
                HeldOutPoint(
                    check=f"in-step {LOGGED_OPS[name][0]} (comms logger)",
                    fitted_on="this run's probe, all 4 sizes",
                    label=f"{series_label(line)}: {name}, {stats['calls']:.0f} calls",
                    predicted_s=predicted,
                    measured_s=stats["seconds"],
                )
            )
    return points


def step_holdout(checks: list[TwoRankCheck]) -> list[HeldOutPoint]:
    """The 1 -> N step predictions whose compute slowdown came from the other configurations."""
    return [
        HeldOutPoint(
            check=f"1 -> {check.num_ranks} rank step",
            fitted_on="1-rank compute, probed links, median forward slowdown of the other configurations",
            label=check.label,
            predicted_s=check.predicted_heldout_step_s,
            measured_s=check.measured_step_s,
        )
        for check in checks
        if check.predicted_heldout_step_s is not None
    ]


@dataclass(frozen=True)
class HeldOutSummary:
    """One check's held-out errors: how many points, the median of |error| and the worst error (signed)."""

    check: str
    fitted_on: str
    points: int
    median_abs_error: float
    worst_error: float


def summarize(points: list[HeldOutPoint]) -> list[HeldOutSummary]:
    """Per (check, what it was fitted on), in the order first seen."""
    by_check: dict[tuple[str, str], list[HeldOutPoint]] = {}
    for point in points:
        by_check.setdefault((point.check, point.fitted_on), []).append(point)
    summaries = []
    for (check, fitted_on), group in by_check.items():
        summaries.append(
            HeldOutSummary(
                check=check,
                fitted_on=fitted_on,
                points=len(group),
                median_abs_error=statistics.median(abs(point.error) for point in group),
                worst_error=max((point.error for point in group), key=abs),
            )
        )
    return summaries
