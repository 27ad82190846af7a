"""One logging rank: console progress, results.csv, TensorBoard scalars and results.png; progress bars for inference.

Uses Ultralytics' LOGGER and TQDM progress bar, so the console reads as Ultralytics' trainer does.

Every method is a no-op on ranks other than 0, so callers never check the rank.
"""

from __future__ import annotations

import csv
import importlib.util
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from shlex import quote
from typing import Any

import torch

from yolods import dist

MAP50, MAP50_95 = "metrics/mAP50(B)", "metrics/mAP50-95(B)"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: CUDA max allocated on GPU, peak RSS of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass(frozen=True)
class RunFacts:
    """What the end-of-run summary reports besides results.csv."""

    epochs_done: int
    epochs: int
    wall_s: float
    imgs_per_s: float
    world_size: int
    zero_stage: int
    precision: str
    data_yaml: str
    latest_checkpoint: str | None
    stopped: str | None = None  # the stop signal's checkpoint tag, when a signal ended the run early
    best_epoch: int | None = None  # the epoch best.pt holds (from 1)


def best_epoch(fitness_history: list[float | None]) -> int | None:
    """The epoch (from 1) best.pt holds: the latest with the highest fitness, as the Trainer saves it (a tie
    replaces best.pt); None before any epoch was validated."""
    scored = [(fitness, epoch) for epoch, fitness in enumerate(fitness_history, start=1) if fitness is not None]
    return max(scored)[1] if scored else None


def summary_text(facts: RunFacts, *, best: dict[str, Any] | None, run_dir: Path) -> str:
    """Ultralytics-style closing lines, then the next commands to run (paths quoted for a shell where needed)."""
    minutes = facts.wall_s / 60
    # a resumed run that had finished already trains nothing: no speed to report
    speed = f"in {minutes:.1f} min ({facts.imgs_per_s:.1f} img/s overall)" if facts.imgs_per_s else "(none now)"
    lines = [
        "",
        f"{facts.epochs_done}/{facts.epochs} epochs completed {speed} on "
        f"{dist.ranks_phrase(facts.world_size)}, ZeRO-{facts.zero_stage}, {facts.precision}",
    ]
    if best is not None:
        lines.append(
            f"best epoch {best['epoch']}: mAP50 {float(best[MAP50]):.3f}, mAP50-95 {float(best[MAP50_95]):.3f}"
        )
    weights = run_dir / "weights"
    for label, path in (("best.pt", weights / "best.pt"), ("last.pt", weights / "last.pt")):
        if path.exists():
            lines.append(f"{label:<12} {path}")
    plotted = ", results.png" if (run_dir / "results.png").exists() else ""  # none under --hyp plots=False
    if (run_dir / "results.csv").exists():  # none before the first epoch ends
        lines.append(f"{'results':<12} {run_dir / 'results.csv'}{plotted}")
    if facts.latest_checkpoint:
        lines.append(f"{'checkpoint':<12} {run_dir / 'checkpoints' / facts.latest_checkpoint}")
    lines.append("Next:")
    if facts.stopped:
        lines.append(f"  python -m yolods.train --resume {quote(str(run_dir))}      # continue from {facts.stopped}")
    best_weights = quote(str(weights / "best.pt"))
    have_weights = (weights / "best.pt").exists()  # none before the first epoch ends (a stop, a diverged loss)
    if have_weights and importlib.util.find_spec("yolods.val") is not None:
        lines.append(f"  python -m yolods.val --model {best_weights} --data {quote(str(facts.data_yaml))}")
    if have_weights and importlib.util.find_spec("yolods.predict") is not None:
        source = quote(str(_val_images(facts.data_yaml) or "path/to/images"))
        lines.append(f"  python -m yolods.predict --model {best_weights} --source {source}")
    lines.append(f"  tensorboard --logdir {quote(str(run_dir))}")
    return "\n".join(lines)


def _val_images(data_yaml: str) -> Path | None:
    """The data.yaml's val image folder, for a "Next:" predict line that runs as printed; None if not one folder."""
    import yaml

    try:
        data = yaml.safe_load(Path(data_yaml).read_text())
        folder = Path(data.get("path") or Path(data_yaml).parent) / data["val"]
    except Exception:  # a summary line is no place to fail: fall back to a placeholder
        return None
    return folder if folder.is_dir() else None


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(*, total: int, desc: str, unit: str):
    """Ultralytics' progress bar on rank 0 (its rate reads `unit`/s), a no-op elsewhere; call update(n), close()."""
    if not dist.is_main_process():
        return _NoBar()
    from ultralytics.utils import TQDM

    return TQDM(total=total, desc=desc, unit=unit)


class RunLogger:
    """Writes what rank 0 sees of a run.

    Examples:
        >>> logger = RunLogger(run_dir, loss_names=("box_loss", "cls_loss", "dfl_loss"))
        >>> for batch in logger.progress(loader, epoch=0, epochs=10): ...
        >>> logger.log_epoch(epoch=0, values={"metrics/mAP50(B)": 0.5})
    """

    def __init__(
        self, run_dir: Path, *, loss_names: tuple[str, ...], tensorboard: bool = True, plot_results: bool = True
    ):
        self.enabled = dist.is_main_process()
        self.plot_results = plot_results
        self.run_dir = run_dir
        self.loss_names = loss_names
        self.csv_path = run_dir / "results.csv"
        self.started = time.time()
        self.writer = None
        self._bar = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir))

    def info(self, message: str) -> None:
        if self.enabled:
            from ultralytics.utils import LOGGER

            LOGGER.info(message)

    def progress(self, loader: Iterable, *, epoch: int, epochs: int, total: int) -> Iterable:
        """The loader, wrapped in a progress bar with an epoch header on rank 0."""
        if not self.enabled:
            return loader
        from ultralytics.utils import TQDM

        self.info(
            ("\n" + "%11s" * (4 + len(self.loss_names))) % ("Epoch", "Mem(GiB)", *self.loss_names, "Instances", "Size")
        )
        self._bar = TQDM(loader, total=total)
        self._bar.set_description(f"{epoch + 1}/{epochs}")
        return self._bar

    def update_bar(
        self, *, epoch: int, epochs: int, mean_losses: list[float], instances: int, mem_gib: float, imgsz: int
    ) -> None:
        if self._bar is not None:
            self._bar.set_description(
                ("%11s" * 2 + "%11.4g" * (len(mean_losses) + 1) + "%11s")
                % (f"{epoch + 1}/{epochs}", f"{mem_gib:.3g}G", *mean_losses, instances, imgsz)
            )

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """Per optimizer step scalars to TensorBoard (x axis: optimizer steps)."""
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        """A results.csv row (Ultralytics' columns) and the same values to TensorBoard (x axis: epochs)."""
        if not self.enabled:
            return
        row = {"epoch": epoch + 1, "time": round(time.time() - self.started, 3), **values}
        new_file = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row), lineterminator="\n")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for name, value in values.items():
                # Train losses and lr also exist per step; their epoch means get their own tags.
                tag = f"epoch/{name}" if name.startswith(("train/", "lr/")) else name
                self.writer.add_scalar(tag, value, epoch + 1)
            self.writer.flush()

    def truncate_results(self, *, completed_epochs: int) -> None:
        """Drop results.csv rows of epochs a resumed run will redo (written after the checkpoint it resumes from)."""
        if not self.enabled or not self.csv_path.exists():
            return
        header, rows, damaged = _parse_results(self.csv_path)
        if damaged:  # a crash or a full disk mid-row: the file is a log, and must not stop the run (TensorBoard has it)
            self.info(f"WARNING: {self.csv_path}: left out {damaged} damaged line(s)")
        if header is None:
            self.csv_path.unlink()  # no usable header: log_epoch starts the file anew
            return
        kept = [row for row in rows if int(row[0]) <= completed_epochs]
        with self.csv_path.open("w", newline="") as file:
            csv.writer(file, lineterminator="\n").writerows([header, *kept])

    def plot(self) -> Path | None:
        """results.png: one panel per results.csv column (losses, P, R, mAP, lr), as Ultralytics draws them.

        Ultralytics' own plot_results leaves the lr out; this adds it. matplotlib's bundled font only: no download.
        """
        if not self.enabled or not self.plot_results or not self.csv_path.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")  # headless nodes have no display
        import matplotlib.pyplot as plt

        rows = self.read_results()
        if not rows:
            return None
        columns = [c for c in rows[0] if c not in ("epoch", "time")]
        epochs = [int(row["epoch"]) for row in rows]
        num_cols = (len(columns) + 1) // 2
        figure, axes = plt.subplots(2, num_cols, figsize=(2.6 * num_cols, 5.5), tight_layout=True)
        for axis in axes.ravel()[len(columns) :]:
            axis.set_visible(False)
        for axis, column in zip(axes.ravel(), columns):
            axis.plot(epochs, [float(row[column]) for row in rows], marker=".", linewidth=2, markersize=8)
            axis.set_title(column, fontsize=10)
            axis.set_xlabel("epoch", fontsize=8)
        path = self.run_dir / "results.png"
        figure.savefig(path, dpi=150)
        plt.close(figure)
        return path

    def summary(self, facts: RunFacts) -> None:
        """The run's last lines on rank 0: how good it got and when, how fast, where things are, what to run next."""
        if self.enabled:
            rows = self.read_results() if self.csv_path.exists() else []
            best = next((row for row in rows if facts.best_epoch and int(row["epoch"]) == facts.best_epoch), None)
            self.info(summary_text(facts, best=best, run_dir=self.run_dir))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def read_results(self) -> list[dict[str, Any]]:
        """results.csv's whole rows (a damaged line left out), as dicts of strings."""
        header, rows, _ = _parse_results(self.csv_path)
        return [dict(zip(header, row)) for row in rows] if header else []


def _parse_results(path: Path) -> tuple[list[str] | None, list[list[str]], int]:
    """results.csv as (header, whole rows, how many lines are damaged); header None when it is unusable.

    A whole row ends in a newline and has the header's fields, all filled, and an integer epoch first. A line cut
    off by a crash or a full disk (results.csv is appended to at each epoch end) does not, nor does garbage.
    """
    try:
        lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
    except (OSError, UnicodeDecodeError):
        return None, [], 1
    records = [_csv_record(line) if line.endswith("\n") else [] for line in lines]
    if not records or records[0][:1] != ["epoch"]:
        return None, [], len(records)
    header, rows = records[0], [record for record in records[1:] if _whole_row(record, len(records[0]))]
    return header, rows, len(records) - 1 - len(rows)


def _csv_record(line: str) -> list[str]:
    try:
        return next(csv.reader([line]))
    except (csv.Error, StopIteration):
        return []


def _whole_row(record: list[str], num_fields: int) -> bool:
    return len(record) == num_fields and all(record) and record[0].isdigit()
