"""yolods.val: real 2-rank jobs give Ultralytics' single-process numbers; bad input is one line, before any work."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from conftest import assert_ok, run_module
from test_errors import assert_one_line_error

from yolods.errors import ConfigError


def ultralytics_val(assets, **settings) -> dict[str, float]:
    from ultralytics import YOLO

    from yolods.fonts import local_fonts

    with local_fonts(), contextlib.redirect_stdout(io.StringIO()):
        metrics = YOLO(str(assets.weights)).val(data=str(assets.data_yaml), plots=False, **settings)
    return metrics.results_dict


@pytest.mark.multirank
def test_two_ranks_give_the_single_process_metrics(inference_assets, tmp_path):
    """9 images in rect batches of 2: 5 batches of different shapes, 3 on rank 0 and 2 on rank 1."""
    args = ["--model", str(inference_assets.weights), "--data", str(inference_assets.data_yaml), "--batch", "2"]
    result = run_module("yolods.val", [*args, "--no-plots", "--project", str(tmp_path)], nproc=2, timeout=240)
    assert_ok(result)
    assert "mAP50-95)" in result.stderr + result.stdout  # Ultralytics' table, printed once by rank 0
    report = json.loads((tmp_path / "exp" / "metrics.json").read_text())
    assert report["world_size"] == 2
    assert report["images_per_rank"] == [6, 3] and report["images"] == 9
    expected = ultralytics_val(inference_assets, batch=2)
    assert 0 < expected["metrics/mAP50-95(B)"] < expected["metrics/mAP50(B)"] < 1  # a test that can fail
    for key in ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"):
        assert report["metrics"][key] == pytest.approx(expected[key], abs=1e-4), key


def plan(argv: list[str]):
    from yolods.val import plan_validation

    return plan_validation(argv)


def test_bad_input_is_refused_before_any_work(inference_assets, tmp_path):
    weights, data = str(inference_assets.weights), str(inference_assets.data_yaml)
    cases = {
        "weights file not found": ["--model", str(tmp_path / "best.pt"), "--data", data],
        "without weights/best.pt": ["--model", str(tmp_path), "--data", data],
        "a yaml has none": ["--model", "yolov8n.yaml", "--data", data],
        "file not found": ["--model", weights, "--data", str(tmp_path / "data.yaml")],
        "no 'test' split": ["--model", weights, "--data", data, "--split", "test"],
        "multiple of the model stride": ["--model", weights, "--data", data, "--imgsz", "100"],
        "--hyp batch=0: yolods reads this from its own flag; pass --batch": ["--model", weights, "--hyp", "batch=0"],
        "--hyp split=test: .* pass --split": ["--model", weights, "--data", data, "--hyp", "split=test"],
    }
    # a split whose folder is missing: one line, and never the data.yaml's download: (a URL, or Python it would run)
    missing_test = tmp_path / "missing_test.yaml"
    ran = tmp_path / "download_ran"
    download = f"open({str(ran)!r}, 'w').close()"
    missing_test.write_text(data_text(inference_assets) + f"test: images/test\ndownload: {download}\n")
    cases["missing path .*images/test"] = ["--model", weights, "--data", str(missing_test), "--split", "test"]
    cases["'dnn=maybe' is of invalid type"] = ["--model", weights, "--data", data, "--hyp", "dnn=maybe"]
    grayscale = tmp_path / "grayscale.yaml"  # the model takes 3 channels: a torch error on the first batch before
    grayscale.write_text(data_text(inference_assets) + "channels: 1\n")
    cases["takes 3-channel images and --data .* has 1-channel"] = ["--model", weights, "--data", str(grayscale)]
    for fragment, argv in cases.items():
        with pytest.raises(ConfigError, match=fragment):
            plan(argv)
    assert not ran.exists()


def data_text(assets) -> str:
    """The assets' data.yaml, with its root written out (for a copy elsewhere)."""
    import yaml

    data = yaml.safe_load(assets.data_yaml.read_text())
    data["path"] = str(assets.data_yaml.parent)
    return yaml.safe_dump(data, sort_keys=False)


def test_fraction_validates_that_share_of_the_split(inference_assets, tmp_path):
    """Ultralytics applies a plain `fraction` to the train split only; --fraction is the split's share."""
    args = ["--model", str(inference_assets.weights), "--data", str(inference_assets.data_yaml), "--batch", "2"]
    result = run_module("yolods.val", [*args, "--fraction", "0.5", "--no-plots", "--project", str(tmp_path)])
    assert_ok(result)
    report = json.loads((tmp_path / "exp" / "metrics.json").read_text())
    assert report["images"] == 4  # the first round(9 * 0.5) images, as Ultralytics' BaseDataset keeps them


def test_a_run_directory_and_the_data_its_weights_name(inference_assets, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "best.pt").write_bytes(inference_assets.weights.read_bytes())
    resolved = plan(["--model", str(tmp_path)])  # no --data: the data.yaml the weights were trained on
    assert resolved.detector.weights == tmp_path / "weights" / "best.pt"
    assert resolved.settings["data"] == str(inference_assets.data_yaml)


def test_a_classifier_is_one_line_and_exit_2(inference_assets, tmp_path):
    import torch
    from ultralytics.nn.tasks import ClassificationModel

    classifier = tmp_path / "cls.pt"
    model = ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)
    torch.save({"model": model.half(), "train_args": {}}, classifier)  # its train args do not say 'classify'
    result = run_module("yolods.val", ["--model", str(classifier), "--data", str(inference_assets.data_yaml)])
    assert result.returncode == 2
    assert_one_line_error(result, "cls.pt", "a classify model")
