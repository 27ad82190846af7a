"""Synthetic data and the per-epoch loaders that make resumed runs see the same batches."""

from __future__ import annotations

import copy
import hashlib
import random

import numpy as np
import pytest
import torch

import yolods  # noqa: F401
from yolods.config import RunConfig, hyperparameters
from yolods.data import build_train_data, load_data_yaml
from yolods.data.loaders import shard_global_batches
from yolods.data.synthetic import main as synthetic_main
from yolods.data.synthetic import make_synthetic_dataset


def digest(root) -> str:
    files = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".txt"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", num_train=6, num_val=2, imgsz=64, seed=3)
    b = make_synthetic_dataset(tmp_path / "b", num_train=6, num_val=2, imgsz=64, seed=3)
    assert digest(a.parent) == digest(b.parent)
    data = load_data_yaml(str(a))
    assert data["nc"] == 3 and len(list((a.parent / "images" / "train").glob("*.jpg"))) == 6
    (a.parent / "images" / "train" / "mine.jpg").write_bytes(b"")  # not the generator's: left alone
    smaller = make_synthetic_dataset(tmp_path / "a", num_train=3, num_val=2, imgsz=64, seed=3)  # no stale images
    assert sorted(p.name for p in (smaller.parent / "images" / "train").iterdir()) == [
        "000000.jpg", "000001.jpg", "000002.jpg", "mine.jpg"
    ]  # fmt: skip
    assert len(list((smaller.parent / "labels" / "train").glob("*.txt"))) == 3


def test_a_moved_synthetic_set_loads_where_it_now_is(tmp_path):
    """A run dir moved or copied elsewhere keeps its drawn data (resumed or validated there, it looked in the old
    place: 'images not found'): the set's data.yaml is re-pointed where it now is, and nothing is redrawn."""
    import shutil

    old = make_synthetic_dataset(tmp_path / "old", num_train=3, num_val=2, imgsz=64, seed=0)
    moved = tmp_path / "moved"
    shutil.move(old.parent, moved)
    drawn = digest(moved)
    assert load_data_yaml(str(moved / "data.yaml"))["val"] == str(moved / "images" / "val")  # yolods.val --data
    assert make_synthetic_dataset(moved, num_train=3, num_val=2, imgsz=64, seed=0) == moved / "data.yaml"  # resume
    assert digest(moved) == drawn and sorted(p.name for p in moved.iterdir()) == [
        "data.yaml", "images", "labels", "synthetic.yaml"
    ]  # fmt: skip


def test_a_relative_dataset_root_that_resolves_nowhere_says_where_it_was_read_from(shapes_data, tmp_path, monkeypatch):
    """`path: shapes` is read from the current directory: a run resumed from another one (or yolods.val's printed
    command run there) failed with a path under Ultralytics' datasets dir and no word on why."""
    from yolods.errors import ConfigError

    monkeypatch.chdir(shapes_data.parent.parent)
    relative = tmp_path / "data.yaml"
    relative.write_text(
        shapes_data.read_text().replace(f"path: {shapes_data.parent}", f"path: {shapes_data.parent.name}")
    )
    assert load_data_yaml(str(relative))["val"] == str(shapes_data.parent / "images" / "val")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"Its path: {shapes_data.parent.name} is relative, .* current directory"):
        load_data_yaml(str(relative))


def test_synthetic_command_line(tmp_path, capsys):
    synthetic_main([str(tmp_path / "cli"), "--num-train", "4", "--num-val", "2", "--imgsz", "64"])
    assert capsys.readouterr().out.strip().endswith("data.yaml")


def test_epoch_loader_is_a_function_of_its_saved_state(shapes_data):
    """A loader rebuilt from the state saved at an epoch's start gives that epoch's augmented batches again
    (what a resumed run replays); the next epoch differs."""
    hyp = hyperparameters(RunConfig(data=str(shapes_data), device="cpu", imgsz=128))
    data = load_data_yaml(str(shapes_data))
    train = build_train_data(hyp, data, micro_batch=4, workers=0, seed=0, stride=32, pin_memory=False)

    def epoch_batches(epoch: int) -> list[torch.Tensor]:
        return [batch["img"].clone() for batch in train.loader_for_epoch(epoch)]

    epoch_batches(0)
    saved = copy.deepcopy(train.state_dict())
    first = epoch_batches(1)
    other = epoch_batches(2)
    train.load_state_dict(saved)
    again = epoch_batches(1)
    assert len(first) == 8 and all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


@pytest.mark.parametrize(("num_images", "global_batch"), [(32, 16), (30, 16), (17, 16), (5, 4), (3, 8)])
def test_ranks_share_each_global_batch(num_images, global_batch):
    """At 2 ranks each global batch holds the 1-rank run's images: rank 0 the first share, rank 1 the rest."""
    order = list(range(num_images))
    one_rank = shard_global_batches(order, global_batch=min(global_batch, num_images), world_size=1, rank=0)
    shards = [
        shard_global_batches(order, global_batch=min(global_batch, num_images), world_size=2, rank=rank)
        for rank in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == len(one_rank)
    for whole, first, second in zip(one_rank, *shards):
        assert first and second and abs(len(first) - len(second)) <= 1
        assert first + second == whole or (len(whole) == 1 and first + second == [*whole, order[0]])


@pytest.mark.parametrize("workers", [0, 2])
def test_paired_ranks_train_on_the_one_rank_runs_augmented_images(shapes_data, workers, monkeypatch):
    """--paired_data: at 2 ranks each rank's batch is its half of the 1-rank run's batch, pixel for pixel,
    augmentation and mosaic included, epoch after epoch; unpaired ranks augment the same images differently."""
    hyp = hyperparameters(RunConfig(data=str(shapes_data), device="cpu", imgsz=128))
    data = load_data_yaml(str(shapes_data))

    def batches(*, ranks: int, rank: int = 0, paired: bool = False) -> list[dict]:
        random.seed(0)  # what seed_run leaves for the augmentation at 1 rank, and at N ranks when paired
        np.random.seed(0)
        with monkeypatch.context() as launcher:  # what a launcher sets (collectives are no-ops without a group)
            launcher.setenv("RANK", str(rank))
            launcher.setenv("WORLD_SIZE", str(ranks))
            train = build_train_data(
                hyp, data, micro_batch=4 // ranks, workers=workers, seed=0, stride=32, pin_memory=False, paired=paired
            )
        # Global batch 4 over 32 images: the mosaic buffer (8 batches) is smaller than the set, so mosaic's partners
        # depend on its length, which a paired rank must take from the 1-rank run.
        return [batch for epoch in range(2) for batch in train.loader_for_epoch(epoch)]

    one_rank = batches(ranks=1)
    paired = [batches(ranks=2, rank=rank, paired=True) for rank in (0, 1)]
    assert len(one_rank) == len(paired[0]) == len(paired[1]) == 16
    for whole, first, second in zip(one_rank, *paired):
        assert first["im_file"] + second["im_file"] == whole["im_file"]
        assert torch.equal(torch.cat([first["img"], second["img"]]), whole["img"])
        assert torch.equal(torch.cat([first["bboxes"], second["bboxes"]]), whole["bboxes"])
    unpaired = batches(ranks=2, rank=1)
    assert [batch["im_file"] for batch in unpaired] == [batch["im_file"] for batch in paired[1]]
    assert not torch.equal(unpaired[0]["img"], paired[1][0]["img"])


def test_missing_and_broken_data_yaml(tmp_path):
    from yolods.config import ConfigError

    with pytest.raises(ConfigError, match="file not found"):
        load_data_yaml(str(tmp_path / "missing.yaml"))
    (tmp_path / "data.yaml").write_text("train: images/train\n")
    with pytest.raises(ConfigError, match=f"a directory, not a data.yaml; pass {tmp_path / 'data.yaml'}"):
        load_data_yaml(str(tmp_path))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: images/train\nnames: {0: a}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_data_yaml(str(broken))
