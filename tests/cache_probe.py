"""What `--cache ram` does on each rank of a node, for tests/test_cache.py.

Run under torchrun: every rank builds the train split through yolods' own `_build_dataset` with cache='ram',
counting the images it decodes, then checks what it got against a fresh uncached dataset, reads every image
through the mapping (and in a forked loader worker), and writes what it saw to OUT_DIR/rank{N}.json.

    YOLODS_CACHE_DIR=/dev/shm/x python -m torch.distributed.run --nproc_per_node 2 tests/cache_probe.py DATA OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import yolods  # noqa: F401  (offline environment first)
from yolods import dist


def store_mapping(pid: int | None = None) -> dict[str, int] | None:
    """This process's mapping of the store: its path and resident/proportional sizes (bytes), or None."""
    import psutil

    for mapping in psutil.Process(pid).memory_maps(grouped=True):
        if "yolods-images-" in mapping.path:
            return {"path": mapping.path, "rss": mapping.rss, "pss": mapping.pss, "private": mapping.private_dirty}
    return None


class ImageSums(torch.utils.data.Dataset):
    """Reads the dataset's cached images in a loader worker and reports what the worker sees."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _):
        sums = [int(self.dataset.ims[i].sum(dtype=np.int64)) for i in range(len(self.dataset.ims))]
        return {"sums": sums, "mapping": store_mapping(), "type": type(self.dataset.ims).__name__}


def main() -> None:
    data_yaml, out_dir = sys.argv[1], Path(sys.argv[2])
    from ultralytics.data.dataset import YOLODataset

    from yolods.config import hyperparameters, parse_args
    from yolods.data import image_cache
    from yolods.data.loaders import _build_dataset, load_data_yaml

    decoded = []
    load_image = YOLODataset.load_image

    def counting_load_image(self, i, *args, **kwargs):
        if self.ims[i] is None:  # not served from a cache: read from disk and decoded here
            decoded.append(i)
        return load_image(self, i, *args, **kwargs)

    YOLODataset.load_image = counting_load_image
    dist.init_distributed("cpu", for_deepspeed=False)
    data = load_data_yaml(data_yaml)
    hyp = hyperparameters(parse_args(["--data", data_yaml, "--imgsz", "128", "--cache", "ram"]))
    dataset = _build_dataset(hyp, data, split="train", batch=4, stride=32)
    decoded_while_building = len(decoded)
    YOLODataset.load_image = load_image
    dist.barrier()
    # Nothing of the store has a name any more: a job killed from here on leaves nothing behind.
    names_after_build = sorted(path.name for path in image_cache.CACHE_DIR.iterdir())

    fresh = _build_dataset(
        hyperparameters(parse_args(["--data", data_yaml, "--imgsz", "128"])), data, split="train", batch=4, stride=32
    )
    fresh.cache = "ram"  # load_image without the mosaic buffer's bookkeeping
    same_pixels = all(
        np.array_equal(dataset.ims[i], image)
        and image.dtype == dataset.ims[i].dtype
        and (hw0, hw) == (dataset.im_hw0[i], dataset.im_hw[i])
        for i in range(fresh.ni)
        for image, hw0, hw in [fresh.load_image(i)]
    )
    sums = [int(dataset.ims[i].sum(dtype=np.int64)) for i in range(dataset.ni)]  # every page of the store touched
    dist.barrier()
    mapping = store_mapping()
    worker = next(
        iter(torch.utils.data.DataLoader(ImageSums(dataset), num_workers=1, collate_fn=lambda batch: batch[0]))
    )
    report = {
        "rank": dist.get_rank(),
        "decoded_while_building": decoded_while_building,
        "names_after_build": names_after_build,
        "num_images": dataset.ni,
        "cache": dataset.cache,
        "ims_type": type(dataset.ims).__name__,
        "writeable": bool(dataset.ims[0].flags.writeable),
        "same_pixels_as_fresh_load": same_pixels,
        "store_bytes": int(dataset.ims.nbytes),
        "mapping": mapping,
        "worker_type": worker["type"],
        "worker_mapping": worker["mapping"],
        "worker_sums_match": worker["sums"] == sums,
        "mosaic_buffer_enabled": dataset.transforms.transforms[0].transforms[0].buffer_enabled,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    main()
