"""A YOLO-format detection data set of drawn shapes, made on disk with no download.

It is the default data (`python -m yolods.train`) and the test data: three classes (rectangle, ellipse,
triangle) of random colour and size on a noisy background, with exact boxes, so a few epochs of yolov8n
learn it well enough for mAP to mean something.

Examples:
    >>> from yolods.data.synthetic import make_synthetic_dataset
    >>> yaml_path = make_synthetic_dataset("datasets/shapes", num_train=128, num_val=32, imgsz=160)

    $ python -m yolods.data.synthetic datasets/shapes --num-train 512 --imgsz 192
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np
import yaml

CLASS_NAMES = ("rectangle", "ellipse", "triangle")


def _draw_shape(image: np.ndarray, class_id: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draw one shape and return its box as normalised (x_center, y_center, width, height)."""
    height, width = image.shape[:2]
    box_w = int(rng.integers(width // 8, width // 2))
    box_h = int(rng.integers(height // 8, height // 2))
    x0 = int(rng.integers(0, width - box_w))
    y0 = int(rng.integers(0, height - box_h))
    x1, y1 = x0 + box_w - 1, y0 + box_h - 1
    color = tuple(int(c) for c in rng.integers(40, 256, size=3))
    if class_id == 0:
        cv2.rectangle(image, (x0, y0), (x1, y1), color, thickness=-1)
    elif class_id == 1:
        center = ((x0 + x1) // 2, (y0 + y1) // 2)
        cv2.ellipse(image, center, (box_w // 2, box_h // 2), 0, 0, 360, color, thickness=-1)
    else:
        points = np.array([[x0, y1], [x1, y1], [(x0 + x1) // 2, y0]], dtype=np.int32)
        cv2.fillPoly(image, [points], color)
    return ((x0 + x1 + 1) / 2 / width, (y0 + y1 + 1) / 2 / height, box_w / width, box_h / height)


def _write_split(root: Path, split: str, num_images: int, imgsz: int, rng: np.random.Generator) -> None:
    images_dir, labels_dir = root / "images" / split, root / "labels" / split
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        image = rng.integers(0, 60, size=(imgsz, imgsz, 3), dtype=np.uint8)  # dark noise background
        rows = []
        for _ in range(int(rng.integers(1, 4))):
            class_id = int(rng.integers(0, len(CLASS_NAMES)))
            x, y, w, h = _draw_shape(image, class_id, rng)
            rows.append(f"{class_id} {x:.6f} {y:.6f} {w:.6f} {h:.6f}")
        cv2.imwrite(str(images_dir / f"{index:06d}.jpg"), image)
        (labels_dir / f"{index:06d}.txt").write_text("\n".join(rows) + "\n")
    # A set regenerated smaller: the images of the earlier, larger one would still be read (only this set's own
    # numbered files go; anything else in the folders stays)
    for stale in [*images_dir.glob("[0-9]" * 6 + ".jpg"), *labels_dir.glob("[0-9]" * 6 + ".txt")]:
        if int(stale.stem) >= num_images:
            stale.unlink()


def make_synthetic_dataset(
    root: str | Path, *, num_train: int = 128, num_val: int = 32, imgsz: int = 160, seed: int = 0
) -> Path:
    """Write the data set under `root` (if not already there) and return its data.yaml path.

    The same arguments always give the same images, so ranks and resumed runs see identical data.
    """
    root = Path(root).resolve()
    yaml_path = root / "data.yaml"
    spec = {"num_train": num_train, "num_val": num_val, "imgsz": imgsz, "seed": seed}
    stamp = root / "synthetic.yaml"
    if yaml_path.exists() and stamp.exists() and yaml.safe_load(stamp.read_text()) == spec:
        repoint_if_moved(yaml_path)
        return yaml_path
    rng = np.random.default_rng(seed)
    _write_split(root, "train", num_train, imgsz, rng)
    _write_split(root, "val", num_val, imgsz, rng)
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(CLASS_NAMES))}
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    stamp.write_text(yaml.safe_dump(spec))  # written last: its presence means the set is complete
    return yaml_path


def repoint_if_moved(yaml_path: Path) -> None:
    """If `yaml_path` is a set drawn here (its stamp beside it) that has since moved, e.g. with a run dir, so that
    its `path:` names a place that is gone, point it where the set now is; nothing else in it changes."""
    if not (yaml_path.parent / "synthetic.yaml").is_file():
        return
    data = yaml.safe_load(yaml_path.read_text())
    recorded = data.get("path") if isinstance(data, dict) else None
    if not isinstance(recorded, str) or not Path(recorded).is_absolute() or Path(recorded).exists():
        return  # not as written here (absolute), or still there
    fresh = yaml_path.with_name(f"data.yaml.{os.getpid()}.tmp")  # every rank of yolods.val may get here
    fresh.write_text(yaml.safe_dump({**data, "path": str(yaml_path.parent.resolve())}, sort_keys=False))
    os.replace(fresh, yaml_path)  # readers see the old file or the new one


def val_images(num_train: int) -> int:
    """Validation images drawn beside `num_train` training images for `--data synthetic`."""
    return max(num_train // 4, 8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m yolods.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write images/, labels/ and data.yaml into")
    from yolods.config import SYNTHETIC_DEFAULTS

    # defaults: the set `python -m yolods.train` (--data synthetic) draws in its run directory
    images = SYNTHETIC_DEFAULTS["images"]
    parser.add_argument("--num-train", type=int, default=images, help="training images (default %(default)s)")
    parser.add_argument(
        "--num-val", type=int, default=val_images(images), help="validation images (default %(default)s)"
    )
    parser.add_argument(
        "--imgsz", type=int, default=SYNTHETIC_DEFAULTS["imgsz"], help="image side (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="drawing seed; --data synthetic uses --seed (default 0)")
    args = parser.parse_args(argv)
    path = make_synthetic_dataset(
        args.out, num_train=args.num_train, num_val=args.num_val, imgsz=args.imgsz, seed=args.seed
    )
    print(path)


if __name__ == "__main__":
    main()
