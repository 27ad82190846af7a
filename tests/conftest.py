"""Fixtures: small synthetic data on disk, and real `yolods.train` processes (1 rank, or 2 ranks over gloo)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from yolods.dist import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parents[1]
TRAIN_TIMEOUT_S = 420
IMGSZ = 128


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_env(*, all_cores: bool = False) -> dict[str, str]:
    """The environment of a test's job: one thread per process, or with `all_cores` (a lone process: the suite runs
    one job at a time) as many as yolods gives it, every core, as a user's `python -m yolods.train` gets."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", YOLO_OFFLINE="1")
    if all_cores:
        env.pop("OMP_NUM_THREADS")
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return env


def torchrun_command(nproc: int) -> list[str]:
    """torchrun with `nproc` ranks on a free port; append a script, or `-m MODULE`, and its arguments."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]


def ranks_command(nproc: int) -> list[str]:
    """`nproc` ranks on a free port, started as torchrun starts them but without its 1.8 s (tests/local_ranks.py);
    append a script, or `-m MODULE`, and its arguments. Tests of torchrun's own part use torchrun_command."""
    return [sys.executable, str(REPO / "tests" / "local_ranks.py"), str(nproc), str(free_port())]


def module_command(module: str, args: list[str], *, nproc: int) -> list[str]:
    """`python -m MODULE ARGS`, or `nproc` ranks of it on a free port."""
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [*ranks_command(nproc), "-m", module, *args]


def train_command(args: list[str], *, nproc: int) -> list[str]:
    """`python -m yolods.train ARGS`, or `nproc` ranks of it on a free port."""
    return module_command("yolods.train", args, nproc=nproc)


def run_module(
    module: str,
    args: list[str],
    *,
    nproc: int = 1,
    cwd: Path | None = None,
    timeout: int = TRAIN_TIMEOUT_S,
    all_cores: bool | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m MODULE` (on `nproc` ranks) to completion and return its output (stdout + stderr, text).

    A lone process (`nproc` 1) gets every core, as a user's run does, unless `all_cores=False`: one that is compared
    bit for bit with a run of 1 thread a rank must have 1 thread too (another thread count sums in another order).
    """
    return subprocess.run(
        module_command(module, args, nproc=nproc),
        cwd=cwd,
        env=train_env(all_cores=nproc == 1 if all_cores is None else all_cores),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_train(
    args: list[str],
    *,
    nproc: int = 1,
    cwd: Path | None = None,
    timeout: int = TRAIN_TIMEOUT_S,
    all_cores: bool | None = None,
) -> subprocess.CompletedProcess:
    """Run a real training process to completion and return its output (stdout + stderr, text)."""
    return run_module("yolods.train", args, nproc=nproc, cwd=cwd, timeout=timeout, all_cores=all_cores)


# results.png costs a finished job ~2 s (matplotlib); tests that read it pass plots=True (tests/test_metrics.py).
NO_PLOTS = ("--hyp", "plots=False")


def small_run_args(
    data_yaml: Path, project: Path, name: str, *extra: str, epochs: int = 3, plots: bool = False
) -> list[str]:
    """A short job on the small shapes set: 32 images, batch 8, imgsz 128, an optimizer step per batch.

    (At Ultralytics' nbs of 64 the accumulation would ramp up to 8 batches and leave 3 epochs of 4 batches with 2
    optimizer steps in all, too few to see a loss fall.)
    """
    return [
        *(() if plots else NO_PLOTS),
        "--data",
        str(data_yaml),
        "--epochs",
        str(epochs),
        "--imgsz",
        str(IMGSZ),
        "--batch",
        "8",
        "--nbs",
        "8",
        "--workers",
        "0",
        "--project",
        str(project),
        "--name",
        name,
        *extra,
    ]


def stoppable_job_args(
    data_yaml: Path, project: Path, name: str, zero_stage: int, extra: tuple[str, ...] = ()
) -> list[str]:
    """3 epochs of 8 batches of 4 images (2 per rank on 2 ranks), a step after each (nbs = batch): stops land mid-epoch.

    `extra` flags come last and win (argparse keeps the last value).
    """
    return [
        *NO_PLOTS,
        "--data",
        str(data_yaml),
        "--epochs",
        "3",
        "--imgsz",
        "128",
        "--batch",
        "4",
        "--nbs",
        "4",
        "--workers",
        "0",
        "--zero",
        str(zero_stage),
        "--project",
        str(project),
        "--name",
        name,
        *extra,
    ]


def results_without_time(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "results.csv").open() as file:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(file)]


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """data.yaml of 32 train / 8 val synthetic images."""
    from yolods.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("shapes"), num_train=32, num_val=8, imgsz=IMGSZ, seed=0)


@pytest.fixture(scope="session")
def projects(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="session")
def zero2_run(shapes_data, projects) -> Path:
    """A finished 2-rank ZeRO-2 fp32 run with a few profiled steps (read by several tests)."""
    args = small_run_args(
        shapes_data, projects, "zero2", "--zero", "2", "--profile", "1,1,1", "--comms_logger", plots=True
    )
    result = run_train(args, nproc=2)
    assert_ok(result)
    (projects / "zero2" / "train.log").write_text(result.stdout + result.stderr)
    return projects / "zero2"


def shipped_config_args(config: str, data_yaml: Path, project: Path, *extra: str) -> list[str]:
    """2 epochs of the small job under one of ds_configs/*.json; the run is named after the config."""
    path = REPO / "ds_configs" / config
    return small_run_args(
        data_yaml, project, config.removesuffix(".json"), "--deepspeed_config", str(path), *extra, epochs=2
    )


@pytest.fixture(scope="session")
def shipped_config_run(shapes_data, projects):
    """A finished 2-rank run per shipped config, trained on first use (test_train and test_memory read them)."""
    runs: dict[str, Path] = {}

    def run(config: str) -> Path:
        if config not in runs:
            assert_ok(run_train(shipped_config_args(config, shapes_data, projects), nproc=2))
            runs[config] = projects / config.removesuffix(".json")
        return runs[config]

    return run


@pytest.fixture(scope="session")
def inference_assets(tmp_path_factory):
    """Weights in Ultralytics' format, 9 val images of mixed shapes with labels it scores on, and a video."""
    from inference_assets import make_inference_assets

    return make_inference_assets(tmp_path_factory.mktemp("inference"))
