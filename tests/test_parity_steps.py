"""Step parity at one rank: yolods reproduces the Ultralytics trainer's own run, step for step.

Both trainers run the same short job in fresh processes (tests/step_trace.py records each): the same initial
weights, the same images with the same augmentation in the same order, the same losses, lr and momentum at every
micro-step and the same optimizer steps, and after each epoch the same parameters, BatchNorm statistics and EMA,
hence the same validation metrics. The jobs cover what can diverge: the warmup ramps (lr, momentum, accumulation),
accumulation cycles carried over epoch ends, close_mosaic resetting Ultralytics' loader mid-run, a short last batch,
loader workers whose random state and mosaic buffer live on across epochs, the optimizer `auto` rule (AdamW here)
and SGD, gradient clipping, YOLO26's per-epoch loss schedule, and Ultralytics' RAM cache (yolods' shared per node).

The bar is 1e-5 relative; on this CPU the runs agree in every bit. A negative control checks that the comparison
sees a known divergence (yolods' optional optimizer step at each epoch's end).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_ok, train_env

TRACER = Path(__file__).with_name("step_trace.py")
RELATIVE_TOLERANCE = 1e-5

JOBS = {
    # optimizer=auto picks AdamW for so few steps; accumulation ramps 1 -> 3 and carries over epoch ends;
    # mosaic closes for the last epoch, which resets Ultralytics' loader iterator.
    "yolov8n-auto": "--model yolov8n.yaml --batch 8 --workers 0 --hyp nbs=24 --hyp close_mosaic=1".split(),
    # 32 images in 7 batches of 5 (the last short) loaded by 2 workers, which take turns across epoch ends and
    # live on in Ultralytics' loader until close_mosaic resets it; SGD with momentum warmup; YOLO26's end-to-end
    # loss schedule.
    "yolo26n-sgd-workers": (
        "--model yolo26n.yaml --batch 5 --workers 2 --hyp optimizer=SGD --hyp nbs=10 --hyp close_mosaic=2".split()
    ),
    # Ultralytics' RAM cache against yolods' node-shared one: mosaic partners from the whole set, no buffer, and
    # the random numbers its cache check draws (in this process: workers 0).
    "yolov8n-cache-ram": "--model yolov8n.yaml --batch 8 --workers 0 --hyp nbs=24 --hyp close_mosaic=1 --hyp cache=ram".split(),
}
COMMON = ["--epochs", "3", "--imgsz", "96", "--seed", "0"]


def run_traces(data_yaml: Path, out_dir: Path, job: str, *, yolods_flags: tuple[str, ...] = ()) -> list[Path]:
    """Trace the job under Ultralytics and yolods, concurrently (one thread each); returns the two traces."""
    outputs = [out_dir / f"{job}-ultralytics.pt", out_dir / f"{job}-yolods{''.join(yolods_flags)}.pt"]
    processes = []
    for trainer, out in zip(("ultralytics", "yolods"), outputs):
        extra = [f"--yolods-flag={flag}" for flag in yolods_flags] if trainer == "yolods" else []
        if out.exists():
            continue
        command = [sys.executable, str(TRACER), trainer, str(data_yaml), str(out), *COMMON, *JOBS[job], *extra]
        processes.append(
            subprocess.Popen(command, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    for process in processes:
        output, _ = process.communicate(timeout=240)
        assert_ok(subprocess.CompletedProcess(process.args, process.returncode, output, ""))
    return outputs


def relative_difference(value: torch.Tensor | list[float], reference: torch.Tensor | list[float]) -> float:
    """Largest |value - reference|, relative to the largest |reference| of the tensor (or list)."""
    value, reference = torch.as_tensor(value, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return float((value - reference).abs().max()) / max(scale, 1e-12) if reference.numel() else 0.0


def state_difference(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert state.keys() == reference.keys()
    return max(relative_difference(state[name], reference[name]) for name in reference)


def compare(yolods_trace: dict, ultralytics_trace: dict) -> dict[str, float]:
    """Assert step and epoch agreement; returns the largest relative difference of each quantity."""
    worst = dict.fromkeys(("initial", "loss", "lr", "momentum", "model", "ema", "metrics"), 0.0)
    worst["initial"] = state_difference(yolods_trace["initial"], ultralytics_trace["initial"])
    assert worst["initial"] == 0.0, "different initial weights"
    steps, reference_steps = yolods_trace["steps"], ultralytics_trace["steps"]
    assert len(steps) == len(reference_steps)
    for index, (step, reference) in enumerate(zip(steps, reference_steps)):
        where = f"micro-step {index}"
        assert step["im_file"] == reference["im_file"], f"{where}: other images or order"
        assert step["img"] == reference["img"], f"{where}: same images, other augmentation"
        assert step["stepped"] == reference["stepped"], f"{where}: optimizer stepped {step['stepped']}"
        for quantity in ("loss", "lr", "momentum"):
            key = "losses" if quantity == "loss" else quantity
            worst[quantity] = max(worst[quantity], relative_difference(step[key], reference[key]))
            assert worst[quantity] <= RELATIVE_TOLERANCE, f"{where}: {quantity} {step[key]} vs {reference[key]}"
    assert len(yolods_trace["epochs"]) == len(ultralytics_trace["epochs"])
    for epoch, (state, reference) in enumerate(zip(yolods_trace["epochs"], ultralytics_trace["epochs"])):
        for kind in ("model", "ema"):
            worst[kind] = max(worst[kind], state_difference(state[kind], reference[kind]))
            assert worst[kind] <= RELATIVE_TOLERANCE, f"epoch {epoch + 1}: {kind} differs by {worst[kind]:.2e}"
        assert state["metrics"].keys() == reference["metrics"].keys()
        for name, value in reference["metrics"].items():  # both rounded to 5 decimals by Ultralytics' validator
            worst["metrics"] = max(worst["metrics"], abs(state["metrics"][name] - value))
            assert worst["metrics"] <= 1e-5, f"epoch {epoch + 1}: {name} {state['metrics'][name]} vs {value}"
    return worst


@pytest.fixture(scope="module")
def traces_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("traces")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("job", list(JOBS))
def test_one_rank_reproduces_the_ultralytics_trainer_step_for_step(job, shapes_data, traces_dir):
    ultralytics_path, yolods_path = run_traces(shapes_data, traces_dir, job)
    reference, trace = torch.load(ultralytics_path, weights_only=False), torch.load(yolods_path, weights_only=False)
    assert len(reference["steps"]) >= 12 and sum(step["stepped"] for step in reference["steps"]) >= 3
    worst = compare(trace, reference)
    print(f"{job}: {len(reference['steps'])} micro-steps, 3 epochs; largest relative differences {worst}")


@pytest.mark.timeout(240)
def test_the_comparison_sees_a_known_divergence(shapes_data, traces_dir):
    """Negative control: an optimizer step forced at each epoch's end (Ultralytics carries the cycle over)."""
    ultralytics_path, yolods_path = run_traces(
        shapes_data, traces_dir, "yolov8n-auto", yolods_flags=("--step_at_epoch_end",)
    )
    with pytest.raises(AssertionError, match="optimizer stepped"):
        compare(torch.load(yolods_path, weights_only=False), torch.load(ultralytics_path, weights_only=False))
