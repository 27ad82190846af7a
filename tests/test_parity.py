"""benchmarks/parity.py: row names, the bar's arithmetic, and a tiny end-to-end run that writes parity.md/json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import train_env

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "parity.py"


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["parity"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("parity", None)


def test_row_names(parity):
    assert parity.parse_row("ultralytics").trainer == "ultralytics"
    row = parity.parse_row("zero3-2rank-bf16")
    assert (row.trainer, row.zero, row.ranks, row.precision) == ("yolods", 3, 2, "bf16")
    assert row.label == "yolods ZeRO-3, 2 ranks, bf16"
    for bad in ("zero4-2rank-fp32", "zero2-0rank-fp32", "zero2-2rank-fp64", "ddp"):
        with pytest.raises(ValueError, match="--rows"):
            parity.parse_row(bad)


def test_bar_is_the_larger_of_the_floor_and_two_reference_stds(parity):
    assert parity.tolerance(0.001) == pytest.approx(0.01)
    assert parity.tolerance(0.02) == pytest.approx(0.04)
    assert parity.judge(0.305, reference_mean=0.30, reference_std=0.001)["passed"]
    assert not parity.judge(0.315, reference_mean=0.30, reference_std=0.001)["passed"]
    assert parity.judge(0.27, reference_mean=0.30, reference_std=0.02)["passed"]
    verdict = parity.judge(0.25, reference_mean=0.30, reference_std=0.02)
    assert not verdict["passed"] and verdict["diff"] == pytest.approx(-0.05)
    assert not parity.judge(None, reference_mean=0.30, reference_std=0.02)["passed"]  # a failed run never passes
    assert parity.mean_std([0.2, 0.4]) == (pytest.approx(0.3), pytest.approx(0.1414, abs=1e-4))
    assert parity.mean_std([0.2]) == (0.2, 0.0)


@pytest.mark.timeout(150)
def test_tiny_parity_run_writes_markdown_and_json(tmp_path):
    """Ultralytics and a 1-rank yolods row, 1 seed, 1 epoch, 16 images: the whole pipeline, not the accuracy."""
    out_dir = tmp_path / "out"
    command = [
        sys.executable,
        str(SCRIPT),
        "--epochs",
        "1",
        "--num-train",
        "16",
        "--num-val",
        "8",
        "--imgsz",
        "64",
        "--batch",
        "8",
        "--seeds",
        "1",
        "--yolods-seeds",
        "1",
        "--rows",
        "ultralytics,zero0-1rank-fp32",
        "--out-dir",
        str(out_dir),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    result = subprocess.run(command, env=train_env(), capture_output=True, text=True, timeout=140)
    # 0: within the bar, 1: outside it (one epoch proves nothing about accuracy); 2 would mean a run failed.
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out_dir / "parity.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["ultralytics", "zero0-1rank-fp32"]
    reference, yolods_row = report["rows"]
    assert reference["bar"] is None and set(yolods_row["bar"]) == {"diff", "tolerance", "passed"}
    for row in report["rows"]:
        assert row["failed_seeds"] == [] and len(row["runs"]) == 1
        run = row["runs"][0]
        assert run["network_attempts"] == 0, run["run_dir"]
        assert set(run["final"]) == {"mAP50", "mAP50-95"} and run["wall_s"] > 0 and len(run["load_avg_start"]) == 3
        assert len(row["per_epoch_mean"]["train/box_loss"]) == 1
        assert {"train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/mAP50-95(B)"} <= set(run["epochs"][0])
    assert report["environment"]["versions"]["ultralytics"]
    code = report["yolods_code"]  # the runs imported a copy of yolods/ taken at start, named by its content hash
    assert (Path(code["snapshot"]) / "yolods" / "train.py").is_file() and Path(code["snapshot"]).name == code["sha256"]
    markdown = (out_dir / "parity.md").read_text()
    assert "| row | seeds | mAP50 | mAP50-95 | mAP50-95 per seed | Δ mAP50-95 | within bar |" in markdown
    assert "yolods ZeRO-0, 1 rank, fp32" in markdown and "Ultralytics (reference)" in markdown
    (out_dir / "parity.md").unlink()
    subprocess.run([sys.executable, str(SCRIPT), "--render", str(out_dir / "parity.json")], check=True, timeout=60)
    assert (out_dir / "parity.md").read_text() == markdown  # the table is a function of the JSON alone
