"""Bad input: one line that names the culprit and the fix, a non-zero exit, no traceback, no hang."""

from __future__ import annotations

import re

import pytest
from conftest import run_train, small_run_args


def assert_one_line_error(result, *fragments: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    # torchrun prints its own ChildFailedError traceback for any non-zero child; none may come from yolods.
    assert not re.search(r'File ".*yolods[/\\]', output), output[-3000:]
    if "torch.distributed.run" not in " ".join(result.args):
        assert "Traceback" not in output, output[-3000:]
    error_lines = [line for line in output.splitlines() if line.startswith("yolods: error:")]
    assert len(error_lines) == 1, output[-3000:]  # one voice: rank 0 alone reports it
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_missing_data_yaml(tmp_path):
    result = run_train(["--data", str(tmp_path / "nope.yaml"), "--project", str(tmp_path)])
    assert_one_line_error(result, "nope.yaml", "not found")


def test_unknown_model_name(shapes_data, tmp_path):
    result = run_train(small_run_args(shapes_data, tmp_path, "x", "--model", "yolov99z.yaml"))
    assert_one_line_error(result, "yolov99z.yaml", "unknown model")


def test_missing_weights_file_is_never_downloaded(shapes_data, tmp_path):
    result = run_train(small_run_args(shapes_data, tmp_path, "x", "--model", "yolov8n.pt"))
    assert_one_line_error(result, "yolov8n.pt", "never downloads")


def test_zero_stage_out_of_range(tmp_path):
    assert_one_line_error(run_train(["--zero", "5", "--project", str(tmp_path)]), "--zero 5", "0, 1, 2 or 3")


@pytest.mark.multirank
def test_batch_that_does_not_split_over_two_ranks(shapes_data, tmp_path):
    args = small_run_args(shapes_data, tmp_path, "x")
    args[args.index("--batch") + 1] = "7"
    assert_one_line_error(run_train(args, nproc=2, timeout=180), "--batch 7", "2 ranks", "--batch 6")


def test_config_that_disagrees_with_flags(shapes_data, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 3}}')
    result = run_train(small_run_args(shapes_data, tmp_path, "x", "--zero", "2", "--deepspeed_config", str(config)))
    assert_one_line_error(result, "--zero 2", "stage=3")
