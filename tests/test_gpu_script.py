"""benchmarks/gpu/run.sh, the one-call GPU measurement script, checked without a GPU.

Its syntax, its argument check, and its smallest stages in --cpu-smoke mode: the environment check (imports, a
gloo process group of one), the data set, the stage runner's budget (a stage with too little time left is
skipped, not started) and the summary, with the output rules of the device tool (at most 8 files, flat).
The full smoke run, every stage tiny on CPU, is `bash benchmarks/gpu/run.sh --cpu-smoke OUT` (minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu" / "run.sh"


def _run(args: list[str], *, work: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "YOLODS_GPU_WORK": str(work), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_scripts_parse_and_bad_arguments_are_refused(tmp_path):
    for script in (SCRIPT, REPO / "benchmarks" / "gpu" / "prepare_wheels.sh"):
        completed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert completed.returncode == 0, completed.stderr
    completed = _run(["--no-such-flag", str(tmp_path / "out")], work=tmp_path / "work", timeout=30)
    assert completed.returncode == 2 and "usage:" in completed.stderr


def test_cpu_smoke_env_and_data_stages_then_budget_skip_and_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # A 250 s budget less the smoke mode's 150 s reserve for the report: env and data fit, thr-n (at least
    # 180 s) does not, so it is skipped without starting.
    completed = _run(["--cpu-smoke", "--stages", "env,data,thr-n", "--budget", "250", str(out)], work=work, timeout=150)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    timeline = {row.split("\t")[0]: row.split("\t") for row in (work / "timeline.tsv").read_text().splitlines()}
    assert timeline["env"][4] == "ok" and timeline["data"][4] == "ok", timeline
    assert timeline["thr-n"][4] == "skipped" and "no time" in timeline["thr-n"][5]
    assert "memory" not in timeline  # not asked for
    env = json.loads((out / "env.json").read_text())
    assert env["process_group"] == {**env["process_group"], "backend": "gloo", "world_size": 1, "all_reduce_ok": True}
    assert env["deepspeed"] and env["ultralytics"]
    images = list(work.glob("shapes-*/images/train/*.jpg"))
    assert len(images) == 10  # (burn-in 1 + timed 1 + 3 spare) batches of 2
    summary = (out / "summary.md").read_text()
    assert "| env |" in summary and "| thr-n |" in summary and "gloo" in summary
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8 and all(path.parent == out for path in files)  # what the device tool returns
    assert any("thr-n" in line and "skipped" in line for line in output.splitlines())  # the printed timeline


def test_profile_sums_the_gpus_own_events_only():
    """The H200 profile read 248% of the wall: it summed aten ops (which carry their kernels' time) and the step
    windows along with the kernels."""
    import importlib.util
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    spec = importlib.util.spec_from_file_location("gpu_stages", REPO / "benchmarks" / "gpu" / "stages.py")
    stages = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stages)

    def event(key, device_type, self_us):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_us)

    averages = [
        event("aten::native_batch_norm", DeviceType.CPU, 60.0),  # its kernel's time, counted again
        event("batch_norm_collect_statistics_channels_last_kernel", DeviceType.CUDA, 60.0),
        event("train_step_0", DeviceType.CUDA, 130.0),  # the step's window on the device
        event("sm90_xmma_fprop_implicit_gemm", DeviceType.CUDA, 40.0),
        event("Memset (Device)", DeviceType.CUDA, 0.0),
    ]
    kernels = stages._kernel_events(averages)
    assert [k.key for k in kernels] == [
        "batch_norm_collect_statistics_channels_last_kernel",
        "sm90_xmma_fprop_implicit_gemm",
    ]
