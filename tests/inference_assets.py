"""Small assets for the yolods.val / yolods.predict tests: weights in Ultralytics' format and data they score on.

Training a detector to a non-zero mAP takes minutes here, so the weights are an untrained yolov8n made to
produce varied boxes: BatchNorm statistics from the images themselves (scores then differ from image to image)
and box distances peaked at a couple of grid cells (boxes the size of the drawn shapes). The val labels are
two of the model's own confident boxes per image plus one drawn shape, so P, R and mAP are neither 0 nor 1
and every statistic the merge could get wrong is exercised. The images have mixed aspect ratios, so rect
batches differ in shape and a batch mixes letterbox paddings.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch

IMGSZ = 128
NUM_VAL_IMAGES = 9  # odd: two ranks get unequal shards
SHAPES_HW = [(128, 128), (96, 128), (128, 64), (64, 128), (128, 96), (80, 128), (128, 128), (128, 112), (48, 128)]
VIDEO_FRAMES = 7


@dataclass(frozen=True)
class InferenceAssets:
    data_yaml: Path
    weights: Path
    images: Path  # the val images
    source: Path  # the val images and a video of VIDEO_FRAMES frames
    video: Path


def make_inference_assets(root: Path) -> InferenceAssets:
    from yolods.data.synthetic import CLASS_NAMES, make_synthetic_dataset

    data_yaml = make_synthetic_dataset(root / "shapes", num_train=1, num_val=NUM_VAL_IMAGES, imgsz=IMGSZ, seed=0)
    images = data_yaml.parent / "images" / "val"
    paths = sorted(images.glob("*.jpg"))
    for path, (height, width) in zip(paths, SHAPES_HW):
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (width, height)))
    weights = root / "detector.pt"
    _save_untrained_detector(weights, data_yaml=data_yaml, images=paths, names=dict(enumerate(CLASS_NAMES)))
    _relabel_with_own_predictions(weights, data_yaml=data_yaml, work_dir=root / "relabel")
    source = root / "source"
    source.mkdir()
    for path in paths:
        (source / path.name).write_bytes(path.read_bytes())
    video = source / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (IMGSZ, 96))
    for path in paths[:VIDEO_FRAMES]:
        writer.write(cv2.resize(cv2.imread(str(path)), (IMGSZ, 96)))
    writer.release()
    return InferenceAssets(data_yaml=data_yaml, weights=weights, images=images, source=source, video=video)


def _save_untrained_detector(weights: Path, *, data_yaml: Path, images: list[Path], names: dict[int, str]) -> None:
    from yolods.hyp import ultralytics_settings
    from yolods.model import build_model, ultralytics_weights

    torch.manual_seed(0)
    hyp = ultralytics_settings({"imgsz": IMGSZ, "data": str(data_yaml)})
    model = build_model("yolov8n.yaml", num_classes=len(names), class_names=names, hyp=hyp, verbose=False)
    head = model.model[-1]
    with torch.no_grad():
        for branch in head.cv3:  # class scores: from the features, not from a shared bias
            branch[-1].bias.fill_(-2.0)
            branch[-1].weight.mul_(3.0)
        for branch in head.cv2:  # box sides: about one grid cell from the anchor
            branch[-1].weight.mul_(0.5)
            branch[-1].bias.copy_(torch.tensor([3.0 if bin_ == 1 else 0.0 for bin_ in range(head.reg_max)] * 4))
    batch = torch.stack(
        [torch.from_numpy(cv2.resize(cv2.imread(str(p)), (IMGSZ, IMGSZ))).permute(2, 0, 1) for p in images]
    )
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the one batch below
    model.train()
    with torch.no_grad():
        model(batch.float() / 255)
    checkpoint = ultralytics_weights(model.eval(), epoch=0, best_fitness=None, updates=0, metrics={})
    torch.save({**checkpoint, "train_args": vars(hyp)}, weights)


def _relabel_with_own_predictions(weights: Path, *, data_yaml: Path, work_dir: Path) -> None:
    from ultralytics import YOLO

    from yolods.fonts import local_fonts

    with local_fonts(), contextlib.redirect_stdout(io.StringIO()):
        YOLO(str(weights)).val(
            data=str(data_yaml), batch=2, plots=False, save_txt=True, save_conf=True, project=str(work_dir), name="p"
        )
    labels = data_yaml.parent / "labels" / "val"
    for label in sorted(labels.glob("*.txt")):
        predicted = (work_dir / "p" / "labels" / label.name).read_text().splitlines()
        rows = [line.split() for line in predicted if _inside_image(line.split())]
        rows.sort(key=lambda row: -float(row[5]))
        drawn = label.read_text().splitlines()[:1]
        label.write_text("\n".join([" ".join(row[:5]) for row in rows[:2]] + drawn) + "\n")
    (labels.parent / "val.cache").unlink()


def _inside_image(row: list[str]) -> bool:
    """A box wholly inside the image: clipped to it as a label, it still matches the prediction."""
    x, y, w, h = map(float, row[1:5])
    return w / 2 < x < 1 - w / 2 and h / 2 < y < 1 - h / 2
