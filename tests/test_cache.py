"""`--cache ram` held once per node, `--cache disk` written once (yolods.data.image_cache, shared_images).

Ultralytics' cache='ram' differs from no cache in one way, which yolods keeps (tests/test_parity_steps.py runs it
against Ultralytics' own trainer): mosaic draws its partners from the whole set instead of a buffer of recent
images. These runs are one epoch, where close_mosaic (10) has closed mosaic, and load in a worker (--workers 1),
where the random numbers Ultralytics' cache check draws in the training process do not reach the augmentation:
so each cache must give exactly the losses of no cache.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_ok, ranks_command, run_train, small_run_args, train_env

PROBE = Path(__file__).with_name("cache_probe.py")
ONE_EPOCH_IN_A_WORKER = ("--workers", "1")


def private_cache_dir() -> Path:
    """A store directory of this test's own (on /dev/shm where there is one, as in real runs)."""
    parent = "/dev/shm" if Path("/dev/shm").is_dir() else None
    return Path(tempfile.mkdtemp(prefix="yolods-test-cache-", dir=parent))


def tensorboard_series(run_dir: Path) -> dict[str, list[float]]:
    """Every per-step and per-epoch scalar of the losses and metrics, at full float precision."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [event.value for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith(("train/", "val/", "metrics/", "epoch/train/"))
    }


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    """A private copy of the shapes set: --cache disk writes .npy files beside its images."""
    from yolods.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("cached"), num_train=32, num_val=8, imgsz=128, seed=0)


@pytest.fixture(scope="module")
def runs(data_yaml, tmp_path_factory) -> dict[str, Path]:
    """One-epoch 2-rank runs without cache, with --cache ram and with --cache disk; the store directory each run
    used is checked empty after it."""
    project = tmp_path_factory.mktemp("cache-runs")
    done = {}
    for name, flags in (("none", ()), ("ram", ("--cache", "ram")), ("disk", ("--cache", "disk"))):  # disk last: no
        cache_dir = private_cache_dir()  # .npy exists beside the images before it
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("YOLODS_CACHE_DIR", str(cache_dir))
            result = run_train(
                small_run_args(data_yaml, project, name, *ONE_EPOCH_IN_A_WORKER, *flags, epochs=1), nproc=2
            )
        assert_ok(result)
        left = list(cache_dir.iterdir())
        shutil.rmtree(cache_dir)
        assert not left, f"{name}: the job left {left} in its store directory"
        (project / name / "train.log").write_text(result.stdout + result.stderr)
        done[name] = project / name
    return done


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_the_second_rank_maps_what_the_first_decoded(data_yaml, tmp_path):
    """On 2 ranks: rank 0 decodes each image once (plus Ultralytics' 30-image estimate), rank 1 none; both, and a
    forked loader worker, read the same pages read-only (proportional size half the resident one per rank); the
    pixels are what Ultralytics' load_image gives; the file's name is gone as soon as the dataset is built."""
    cache_dir = private_cache_dir()
    env = {**train_env(), "YOLODS_CACHE_DIR": str(cache_dir)}
    try:
        result = subprocess.run(
            [*ranks_command(2), str(PROBE), str(data_yaml), str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=110,
        )
        assert_ok(result)
        left = list(cache_dir.iterdir())
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    assert not left, f"store files left: {left}"
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first["decoded_while_building"] == first["num_images"] + min(first["num_images"], 30)
    assert second["decoded_while_building"] == 0
    assert "decoded once per node and mapped by its 2 ranks" in result.stderr
    assert first["names_after_build"] == second["names_after_build"] == []  # a crash from here leaves nothing
    for report in (first, second):
        assert report["cache"] == "ram" and report["ims_type"] == report["worker_type"] == "SharedImages"
        assert report["same_pixels_as_fresh_load"] and report["worker_sums_match"]
        assert not report["writeable"] and not report["mosaic_buffer_enabled"]
        mapping = report["mapping"]
        assert mapping["path"] == first["mapping"]["path"] == report["worker_mapping"]["path"]
        assert mapping["private"] == 0 and mapping["rss"] >= report["store_bytes"]
        assert mapping["pss"] <= mapping["rss"] / 2 + 4096  # its pages counted half to each rank: one copy in all


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_ram_and_disk_caches_train_as_without_on_two_ranks(runs):
    reference = tensorboard_series(runs["none"])
    assert len(reference["train/box_loss"]) == 4
    for name in ("ram", "disk"):
        assert tensorboard_series(runs[name]) == reference, f"--cache {name} trained otherwise than without a cache"
    log = (runs["ram"] / "train.log").read_text()
    assert "32 train images, 1.5 MiB decoded once per node and mapped by its 2 ranks" in log
    assert "8 val images" in log


def test_disk_cache_writes_each_npy_once_with_the_decoded_image(runs, data_yaml):
    from ultralytics.utils.patches import imread

    images = sorted((data_yaml.parent / "images").rglob("*.jpg"))
    assert len(images) == 40
    for image in images:
        assert np.array_equal(np.load(image.with_suffix(".npy")), imread(str(image)))
    assert not list((data_yaml.parent / "images").rglob("*.partial"))
    log = (runs["disk"] / "train.log").read_text()
    assert log.count("wrote 32 train .npy files") == 1 and log.count("wrote 8 val .npy files") == 1


# ----------------------------------------------------------------------------------------------------------------
# In one process


def test_cache_settings():
    from yolods.config import ConfigError, hyperparameters, parse_args
    from yolods.data.image_cache import cache_mode

    assert [cache_mode(value) for value in (True, "ram", "RAM", "disk", False, None, "False")] == [
        "ram",
        "ram",
        "ram",
        "disk",
        None,
        None,
        None,
    ]
    assert hyperparameters(parse_args(["--cache", "disk"])).cache == "disk"
    assert parse_args(["--hyp", "cache=True"]).hyp["cache"] is True  # Ultralytics' spelling of ram
    with pytest.raises(ConfigError, match="cache='ssd' is not a cache mode: use --cache ram"):
        parse_args(["--hyp", "cache=ssd"])
    with pytest.raises(ConfigError, match=r"argument --cache: invalid choice: 'ssd' \(choose from 'ram', 'disk'\)"):
        parse_args(["--cache", "ssd"])


def test_one_process_ram_cache_gives_the_batches_of_no_cache(data_yaml, monkeypatch, tmp_path):
    """One process, the epoch's loader (a worker, mosaic closed) with and without --cache ram: the same batches bit
    for bit, hence the same losses (the 2-rank test above trains on them); with mosaic open they differ, as
    Ultralytics' cache='ram' differs from no cache."""
    from copy import copy

    from yolods.build import seed_run
    from yolods.config import hyperparameters, parse_args
    from yolods.data import image_cache
    from yolods.data.loaders import build_train_data, load_data_yaml

    monkeypatch.setattr(image_cache, "CACHE_DIR", tmp_path)
    data = load_data_yaml(str(data_yaml))

    def epoch(*flags: str, mosaic: bool) -> list[tuple]:
        seed_run(0)
        hyp = hyperparameters(parse_args(["--data", str(data_yaml), "--imgsz", "128", *ONE_EPOCH_IN_A_WORKER, *flags]))
        train = build_train_data(hyp, data, micro_batch=8, workers=1, seed=0, stride=32, pin_memory=False)
        loader = train.loader_for_epoch(0, close_mosaic=None if mosaic else copy(hyp))
        return [(batch["img"], batch["cls"], batch["bboxes"], batch["im_file"]) for batch in loader]

    def same(first: list[tuple], second: list[tuple]) -> bool:
        return len(first) == len(second) and all(
            all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(x, y)) for x, y in zip(first, second)
        )

    assert same(epoch("--cache", "ram", mosaic=False), epoch(mosaic=False))
    assert not same(epoch("--cache", "ram", mosaic=True), epoch(mosaic=True))
    assert not list(tmp_path.iterdir())


def test_too_little_ram_is_one_line_naming_the_bytes_and_the_fix(data_yaml, monkeypatch, tmp_path):
    import psutil

    from yolods.config import ConfigError, hyperparameters, parse_args
    from yolods.data import image_cache
    from yolods.data.loaders import _build_dataset, load_data_yaml

    monkeypatch.setattr(image_cache, "CACHE_DIR", tmp_path)
    memory = psutil.virtual_memory()._replace(available=1 << 20)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    hyp = hyperparameters(parse_args(["--data", str(data_yaml), "--imgsz", "128", "--cache", "ram"]))
    with pytest.raises(ConfigError) as raised:
        _build_dataset(hyp, load_data_yaml(str(data_yaml)), split="train", batch=4, stride=32)
    message = str(raised.value)
    assert "\n" not in message
    assert "the 32 train images need 3.0 MiB of RAM per node (1.5 MiB decoded, x2" in message
    assert "but 1.0 MiB is available: use --cache disk, or no --cache" in message
    assert not list(tmp_path.iterdir())


def test_a_stale_store_is_swept_and_a_live_one_kept(tmp_path):
    from yolods.data.shared_images import STALE_AFTER_S, StoreWriter, remove_stale_stores, store_path

    stale = store_path(tmp_path, job_token="dead", key="0" * 64)
    stale.write_bytes(b"half written")
    live = StoreWriter(store_path(tmp_path, job_token="live", key="1" * 64))  # holds its lock
    long_ago = time.time() - 2 * STALE_AFTER_S
    for path in (stale, live.path):
        os.utime(path, (long_ago, long_ago))
    assert remove_stale_stores(tmp_path) == [stale]
    assert live.path.exists()
    live.remove()
    assert not list(tmp_path.iterdir())


def test_store_round_trip_read_only_and_through_pickle(tmp_path):
    """A spawned worker gets the images by pickle: it reopens the store through this process's descriptor,
    which outlives the file's name."""
    from yolods.data.shared_images import SharedImages, StoreError, StoreWriter, store_path

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (3, 4), (6, 6))]
    images.append(rng.integers(0, 65535, (4, 2, 1), dtype=np.uint16))
    writer = StoreWriter(store_path(tmp_path, job_token="job", key="k" * 64))
    writer.write(((image, (2 * image.shape[0], 2 * image.shape[1])) for image in images), key="k" * 64)
    with pytest.raises(StoreError, match="other images"):
        SharedImages(writer.path, key="x" * 64)
    shared = SharedImages(writer.path, key="k" * 64)
    writer.remove()
    assert not writer.path.exists()
    copy = pickle.loads(pickle.dumps(shared))
    for store in (shared, copy):
        assert len(store) == 4 and store.nbytes == sum(image.nbytes for image in images)
        for image, stored in zip(images, store):
            assert np.array_equal(stored, image) and stored.dtype == image.dtype and not stored.flags.writeable
        assert store.original_hw[1] == (6, 8)
    with pytest.raises(ValueError, match="read-only"):
        shared[0][0, 0, 0] = 1


def test_an_unfinished_store_is_refused(tmp_path):
    from yolods.data.shared_images import SharedImages, StoreError, StoreWriter, store_path

    writer = StoreWriter(store_path(tmp_path, job_token="job", key="k" * 64))
    with open(writer.path, "r+b") as file:  # pixels under way, no header yet
        file.write(b"\0" * 64)
    with pytest.raises(StoreError, match="incomplete"):
        SharedImages(writer.path, key="k" * 64)
    writer.remove()
