"""`--cache ram|disk` (Ultralytics' `cache` setting), with a node's ranks sharing the work and, for ram, the memory.

Ultralytics' cache='ram' has every rank decode and hold every image: 8 ranks, 8 copies on the node
(ultralytics#22307). Here the node's first rank decodes them, with Ultralytics' own `load_image` (same resize, same
pixels), into one store (yolods.data.shared_images) that every rank on the node, and every loader worker, maps
read-only: one copy per node. The dataset then is what Ultralytics' cache='ram' makes of it: no image evicted, no
mosaic buffer, mosaic partners drawn from the whole set; and every rank makes the random draws Ultralytics' RAM check
makes, so a run with `--cache ram` trains as Ultralytics' trainer does with cache='ram', step for step.

cache='disk' is Ultralytics' too: a .npy of each decoded image beside it, kept across runs. Here rank 0 writes the
missing or stale ones, then each other node's first rank the ones its node still lacks (images on node-local disks),
and the other ranks only read: no two ranks write one file. Each file is written under a temporary name and renamed,
so no job reads a .npy another job is halfway through writing. Training with it is the same as without a cache,
except that with --workers 0 the random draws of Ultralytics' disk check (made here too) shift the augmentation.

    python -m yolods.train --data coco.yaml --cache ram     # one copy per node, in /dev/shm (YOLODS_CACHE_DIR)
    YOLODS_CACHE_PER_NODE=0 torchrun ... --cache ram         # Ultralytics' own per-rank cache, for comparison
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import secrets
import shutil
import sys
from copy import copy
from multiprocessing.pool import ThreadPool
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from yolods import dist
from yolods.data.shared_images import (
    FORMAT_VERSION,
    SharedImages,
    StoreError,
    StoreWriter,
    remove_stale_stores,
    store_path,
)
from yolods.errors import ConfigError

CACHE_MODES = ("ram", "disk")
# Where the node's store lives: a tmpfs, so its pages are memory and nothing is written to disk.
CACHE_DIR = Path(os.environ.get("YOLODS_CACHE_DIR", "/dev/shm"))
# 0: leave the cache to Ultralytics, which caches per rank (what `--cache ram` cost before; the benchmark's baseline).
SHARE_PER_NODE = os.environ.get("YOLODS_CACHE_PER_NODE", "1") != "0"
ULTRALYTICS_SAMPLE_IMAGES = 30  # its check_cache_ram / check_cache_disk extrapolate from this many random images
RAM_SAFETY_MARGIN = 1.0  # check_cache_ram's: twice the decoded size must be available (loader batches need room too)
DISK_SAFETY_MARGIN = 0.1  # check_cache_disk's
STORE_SLACK = 1.05  # the estimate comes from a sample: ask the store's file system for a little more
GIB = 1 << 30
MIB = 1 << 20


def cache_mode(setting: Any) -> str | None:
    """Ultralytics' reading of its `cache` setting: True or 'ram' -> 'ram', 'disk' -> 'disk', False/None -> None.

    Raises:
        ConfigError: any other value (Ultralytics would silently not cache).
    """
    if setting in (None, False) or (isinstance(setting, str) and setting.lower() in ("false", "none", "")):
        return None
    if setting is True or (isinstance(setting, str) and setting.lower() == "ram"):
        return "ram"
    if isinstance(setting, str) and setting.lower() == "disk":
        return "disk"
    raise ConfigError(f"cache={setting!r} is not a cache mode: use --cache ram, --cache disk, or leave it out")


def dataset_settings(hyp: SimpleNamespace) -> SimpleNamespace:
    """The settings to build an Ultralytics dataset with: without its cache, which `apply_cache` then adds."""
    if cache_mode(hyp.cache) is None or not SHARE_PER_NODE:
        return hyp
    settings = copy(hyp)
    settings.cache = False
    return settings


def apply_cache(dataset, *, mode: str | None, hyp: SimpleNamespace, split: str):
    """Cache a dataset built with `hyp` (`dataset_settings`' result) in `mode` (`cache_mode`'s); returns it.

    A collective: every rank calls it for the same dataset.

    Raises:
        ConfigError: on every rank, when the cache cannot be made on some rank (the bytes it needs and the fix).
    """
    if mode is None or not SHARE_PER_NODE:
        return dataset
    if mode == "ram":
        _share_in_ram(dataset, hyp=hyp, split=split)
    else:
        _cache_on_disk(dataset, split=split)
    return dataset


def size(num_bytes: float) -> str:
    """Bytes for people: '1.5 GiB', '92.3 MiB'."""
    return f"{num_bytes / GIB:.1f} GiB" if num_bytes >= GIB else f"{num_bytes / MIB:.1f} MiB"


def cache_key(dataset) -> str:
    """What the decoded images depend on: each file (path, size, mtime) in dataset order, imgsz, rect, channels."""
    digest = hashlib.sha256()
    settings = {"imgsz": dataset.imgsz, "rect": dataset.rect, "channels": dataset.channels, "format": FORMAT_VERSION}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for file in dataset.im_files:
        stat = os.stat(file)
        digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# ram: one store per node


def _node_id() -> str:
    """This node's index as its launcher numbers it, the same on all its ranks: two nodes of one job that share
    /dev/shm (nodes on one host, containers sharing IPC) make a store each instead of colliding on one name
    (FileExistsError on one of them)."""
    for variable in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID"):  # torchrun, deepspeed, srun
        if os.environ.get(variable, "").isdigit():
            return f"node{os.environ[variable]}"
    return "node0"


def _share_in_ram(dataset, *, hyp: SimpleNamespace, split: str) -> None:
    # Ultralytics' check_cache_ram draws these indices on every rank; drawing them too keeps Python's random state,
    # hence the augmentation of an in-process loader (--workers 0), what it is under Ultralytics' cache='ram'.
    sample = [random.randrange(dataset.ni) for _ in range(min(dataset.ni, ULTRALYTICS_SAMPLE_IMAGES))]
    key = cache_key(dataset)
    job_token = dist.broadcast_object(secrets.token_hex(6) if dist.is_main_process() else None)
    path = store_path(CACHE_DIR, job_token=f"{job_token}-{_node_id()}", key=key)
    dataset.cache = "ram"  # from here load_image neither buffers nor evicts, as in Ultralytics' cache_images
    writer, error = None, None
    try:
        if dist.is_local_main_process():
            try:
                _check_ram(dataset, sample=sample, split=split)
                writer = _write_store(dataset, path, key=key)
            except Exception as caught:  # every rank hears of it below
                error = caught
        _raise_if_any_failed(error)
        try:
            images = SharedImages(path, key=key)
        except (OSError, StoreError) as caught:
            error = ConfigError(
                f"--cache ram: cannot map {path} ({caught}); every rank of a node must see the same YOLODS_CACHE_DIR"
            )
        _raise_if_any_failed(error)
    finally:
        if writer is not None:
            writer.remove()  # every rank has mapped it (or failed): the name goes, the pages stay while mapped
    _install(dataset, images, hyp=hyp)
    local_ranks = dist.get_local_world_size()
    dist.print_main(
        f"yolods: --cache ram: {len(images)} {split} images, {size(images.nbytes)} decoded once per node and mapped "
        f"by its {dist.ranks_phrase(local_ranks)} (Ultralytics' per-rank cache: {size(local_ranks * images.nbytes)})"
    )


def _install(dataset, images: SharedImages, *, hyp: SimpleNamespace) -> None:
    """The dataset as Ultralytics' cache_images leaves it with cache='ram', its images in the store."""
    dataset.ims = images
    dataset.im_hw0 = list(images.original_hw)
    dataset.im_hw = [shape[:2] for shape in images.shapes]
    dataset.buffer.clear()
    # Transforms as Ultralytics builds them for cache='ram': Mosaic then takes partners from the whole set, not the
    # buffer of recent images (building them draws no random numbers).
    dataset.transforms = dataset.build_transforms(hyp=copy(hyp))


def _check_ram(dataset, *, sample: list[int], split: str) -> None:
    """Ultralytics' check_cache_ram, once per node instead of once per rank; plus room in the store's directory."""
    import psutil

    decoded = sum(dataset.load_image(index)[0].nbytes for index in sample) * dataset.ni / len(sample)
    needed, available = decoded * (1 + RAM_SAFETY_MARGIN), psutil.virtual_memory().available
    if needed > available:
        raise ConfigError(
            f"--cache ram: the {dataset.ni} {split} images need {size(needed)} of RAM per node ({size(decoded)} decoded, "
            f"x{1 + RAM_SAFETY_MARGIN:g} as Ultralytics checks) but {size(available)} is available: use --cache disk, or no --cache"
        )
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(CACHE_DIR).free
    except OSError as error:
        raise ConfigError(
            f"--cache ram: cannot use {CACHE_DIR} ({error.strerror}): set YOLODS_CACHE_DIR to a writable node-local "
            "directory, or use --cache disk"
        ) from None
    if decoded * STORE_SLACK > free:
        raise ConfigError(_no_room_message(decoded, free))


def _no_room_message(decoded: float, free: float) -> str:
    return (
        f"--cache ram: {CACHE_DIR} has {size(free)} free for {size(decoded)} of decoded images: enlarge it "
        "(docker run --shm-size), point YOLODS_CACHE_DIR at a node-local directory with room, or use --cache disk"
    )


def _write_store(dataset, path: Path, *, key: str) -> StoreWriter:
    """Decode every image with Ultralytics' load_image (threads, as its cache_images) into a new store file."""
    from ultralytics.utils import NUM_THREADS

    remove_stale_stores(CACHE_DIR)  # left by jobs killed while writing theirs
    writer = StoreWriter(path)
    try:
        with ThreadPool(NUM_THREADS) as pool:
            loaded = pool.imap(dataset.load_image, range(dataset.ni))
            writer.write(((image, hw0) for image, hw0, _ in loaded), key=key)
    except OSError as error:
        writer.remove()
        if error.errno == errno.ENOSPC:
            raise ConfigError(_no_room_message(_decoded_size(dataset), shutil.disk_usage(CACHE_DIR).free)) from None
        raise ConfigError(f"--cache ram: cannot write {path}: {error}") from None
    except BaseException:
        writer.remove()
        raise
    return writer


def _decoded_size(dataset) -> float:
    """The whole set's decoded size, from its first images (for a message)."""
    first = range(min(dataset.ni, ULTRALYTICS_SAMPLE_IMAGES))
    return sum(dataset.load_image(index)[0].nbytes for index in first) * dataset.ni / len(first)


# ----------------------------------------------------------------------------------------------------------------
# disk: Ultralytics' .npy files, written by one rank per file system


def _cache_on_disk(dataset, *, split: str) -> None:
    # Ultralytics' check_cache_disk draws these on every rank (see _share_in_ram for why they are drawn here too).
    sample = [random.choice(dataset.im_files) for _ in range(min(dataset.ni, ULTRALYTICS_SAMPLE_IMAGES))]
    first_writer = dist.is_main_process()
    node_writer = dist.is_local_main_process() and not first_writer  # its node's disk may hold other copies
    for writes in (first_writer, node_writer):
        error = None
        if writes:
            try:
                _check_disk(dataset, sample=sample, split=split)
                written = _write_npy_files(dataset)
                if written:
                    print(
                        f"yolods: --cache disk: wrote {written} {split} .npy files beside the images", file=sys.stderr
                    )
            except Exception as caught:  # every rank hears of it below
                error = caught
        _raise_if_any_failed(error)
    dataset.cache = "disk"  # load_image then reads each .npy without comparing its age to the image's


def _check_disk(dataset, *, sample: list[str], split: str) -> None:
    """Ultralytics' check_cache_disk: the images' directories writable, with room for the decoded images."""
    from ultralytics.utils.patches import imread

    decoded = 0
    for file in sample:
        if not os.access(Path(file).parent, os.W_OK):
            raise ConfigError(f"--cache disk: {Path(file).parent} is not writable: use --cache ram, or no --cache")
        image = imread(file, flags=dataset.cv2_flag)
        decoded += image.nbytes if image is not None else 0
    needed = decoded * dataset.ni / len(sample) * (1 + DISK_SAFETY_MARGIN)
    free = shutil.disk_usage(Path(dataset.im_files[0]).parent).free
    if needed > free:
        raise ConfigError(
            f"--cache disk: the {split} images need {size(needed)} beside them but {size(free)} is free: "
            "use --cache ram, or no --cache"
        )


def _write_npy_files(dataset) -> int:
    """Write each missing or stale .npy (Ultralytics' rule: older than its image); returns how many."""
    from ultralytics.utils import NUM_THREADS

    def stale(index: int) -> bool:
        npy = dataset.npy_files[index]
        return not npy.exists() or npy.stat().st_mtime < Path(dataset.im_files[index]).stat().st_mtime

    todo = [index for index in range(dataset.ni) if stale(index)]
    with ThreadPool(NUM_THREADS) as pool:
        pool.map(lambda index: _write_npy(dataset, index), todo)
    return len(todo)


def _write_npy(dataset, index: int) -> None:
    from ultralytics.utils.patches import imread

    image_file, npy = dataset.im_files[index], dataset.npy_files[index]
    image = imread(image_file, flags=dataset.cv2_flag)
    if image is None:
        raise ConfigError(f"--cache disk: cannot read {image_file}")
    partial = npy.with_name(f".{npy.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as file:
            np.save(file, image, allow_pickle=False)
        os.replace(partial, npy)  # atomic: readers see the old file, or none, or the whole new one
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"--cache disk: cannot write {npy}: {error.strerror or error}") from None


# ----------------------------------------------------------------------------------------------------------------


def _raise_if_any_failed(error: BaseException | None) -> None:
    """A collective: raise on every rank if any rank failed: its own error where it happened, else its first line."""
    messages = dist.all_gather_objects(None if error is None else _first_line(error))
    if error is not None:
        raise error
    failed = [message for message in messages if message is not None]
    if failed:
        raise ConfigError(failed[0])


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(error, ConfigError) else f"{type(error).__name__} on rank {dist.get_rank()}: {text}"
