"""Ultralytics datasets (label cache, augmentation, mosaic) sharded over ranks.

At one rank the train loader draws what Ultralytics' trainer draws (order, augmentation, mosaic partners), so
the two see the same batches; at N ranks each global batch holds the images of the 1-rank run's. The loader is
rebuilt every epoch from the random state at the epoch's start (`TrainData.state_dict`, kept in checkpoints), so a
run resumed mid-epoch replays that epoch exactly.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from copy import copy
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from yolods import dist
from yolods.data import image_cache
from yolods.errors import ConfigError
from yolods.fonts import local_fonts
from yolods.preemption import ignore_stop_signals, signals_blocked

T = TypeVar("T")


def _offline_check_det_dataset(data_yaml: str) -> dict[str, Any]:
    """Ultralytics' check_det_dataset without its font download (it asks for the font plots use) or dataset one."""
    from ultralytics.data.utils import check_det_dataset

    with local_fonts():
        return check_det_dataset(data_yaml, autodownload=False)


def load_data_yaml(data_yaml: str, *, split: str = "val") -> dict[str, Any]:
    """Ultralytics' parsed data dict (absolute train/val paths, nc, names), with one-line errors.

    `split` must be in it: training validates on 'val' every epoch; `yolods.val --split test` needs 'test'.
    """
    path = Path(data_yaml)
    if path.is_dir():
        inside = next((str(path / name) for name in ("data.yaml", "dataset.yaml") if (path / name).is_file()), None)
        hint = f"pass {inside}" if inside else "pass the data.yaml that lists its train and val images"
        raise ConfigError(f"--data {data_yaml}: a directory, not a data.yaml; {hint}")
    if not path.is_file():
        raise ConfigError(
            f"--data {data_yaml}: file not found; pass an Ultralytics data.yaml (or, to yolods.train, 'synthetic')"
        )
    from yolods.data.synthetic import repoint_if_moved

    repoint_if_moved(path)  # a run dir moved with its drawn data: its data.yaml names the old place
    try:
        data = _offline_check_det_dataset(str(path))
    except Exception as error:  # Ultralytics raises FileNotFoundError/SyntaxError/KeyError with long messages
        raise ConfigError(f"--data {data_yaml}: {one_line(error)}{_relative_root_hint(path)}") from None
    if not data.get(split):
        raise ConfigError(f"--data {data_yaml}: no '{split}' split; add {split}: images/{split} to it")
    # Ultralytics checks only 'val' here; its validator checks `split` again with downloads on (the data.yaml's
    # `download:` URL, or Python it runs), so a missing folder must stop the job before that
    folders = data[split] if isinstance(data[split], list) else [data[split]]
    missing = next((folder for folder in folders if not Path(folder).exists()), None)
    if missing is not None:
        raise ConfigError(
            f"--data {data_yaml}: its {split} images are not there (missing path {missing}); fix its {split}: entry "
            "(yolods downloads no data set)"
        )
    return data


def _relative_root_hint(data_yaml: Path) -> str:
    """What a relative `path:` means, where it is the likely culprit: Ultralytics reads it from the current
    directory, else under its datasets dir (which its message leaves unsaid), so a run resumed elsewhere missed it."""
    try:
        root = yaml.safe_load(data_yaml.read_text()).get("path")
    except Exception:  # its own error says what is wrong
        return ""
    if not isinstance(root, str) or Path(root).is_absolute():
        return ""
    return (
        f" Its path: {root} is relative, which Ultralytics reads from the current directory ({Path.cwd()}), else "
        "from its datasets dir: make it absolute"
    )


def one_line(error: BaseException) -> str:
    """Ultralytics' message as one plain line: its colour codes, emoji and line breaks removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).replace("❌", "").replace("⚠️", "")
    lines = [re.sub(r"^(train|val|test): ", "", line.strip()) for line in text.splitlines() if line.strip()]
    # The first line says what is wrong; a second one sometimes says what is required. Further lines repeat
    # per-image warnings or point to the docs.
    kept = lines[:1] + [line for line in lines[1:2] if not line.startswith(("See ", "/", "Note dataset download"))]
    return " ".join(line.rstrip(" .") + "." for line in kept) or type(error).__name__


def _main_first(build: Callable[[], T]) -> T:
    """Run `build` on rank 0, then on the others (label caches are written once); a failure stops every rank.

    A collective. Rank 0 re-raises its own error; the others raise its first line as a ConfigError.
    """
    error = None
    if dist.is_main_process():
        try:
            result = build()
        except Exception as caught:  # re-raised below, after the other ranks hear of it
            error = caught
    message = dist.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise ConfigError(message.splitlines()[0])
    if not dist.is_main_process():
        result = build()
    dist.barrier()
    return result


def build_dataset_once(build: Callable[[], T], *, images: str) -> T:
    """An Ultralytics dataset from `build`, made on rank 0 first; its errors become one line naming `images`."""

    def build_checked() -> T:
        try:
            return build()
        except (FileNotFoundError, AssertionError, RuntimeError) as error:  # no images, no labels, a bad cache
            raise ConfigError(
                f"{images}: {one_line(error)} Check that entry of the data.yaml, that the images there are readable "
                "and that their labels are valid (class ids below nc; Ultralytics' warnings above name each file)"
            ) from None
        except ValueError as error:
            unlabelled = re.search(r"No labels found in (.+?)(?:\.cache)?\. ", str(error))  # paths may hold spaces
            if unlabelled is None:
                raise
            raise ConfigError(
                f"{images}: no image has a label (looked for {unlabelled[1]}/*.txt): give each training image a YOLO "
                "label file, images/.../x.jpg -> labels/.../x.txt, one 'class x_center y_center width height' row per "
                "box, normalised to 0-1"
            ) from None

    return _main_first(build_checked)


def _build_dataset(hyp: SimpleNamespace, data: dict[str, Any], *, split: str, batch: int, stride: int):
    """Ultralytics' dataset of a split, with `hyp.cache` made once per node (see image_cache). A collective."""
    from ultralytics.data.build import build_yolo_dataset

    mode = "train" if split == "train" else "val"
    cache, settings = image_cache.cache_mode(hyp.cache), image_cache.dataset_settings(hyp)
    dataset = build_dataset_once(
        lambda: build_yolo_dataset(settings, data[split], batch, data, mode=mode, rect=mode == "val", stride=stride),
        images=f"{split} images {data[split]} (the data.yaml's '{split}:')",
    )
    return image_cache.apply_cache(dataset, mode=cache, hyp=settings, split=split)


# Ultralytics' build_dataloader seeds its loader's generator with this constant + RANK + seed (RANK -1 alone).
ULTRALYTICS_LOADER_SEED = 6148914691236517205
ULTRALYTICS_PREFETCH_FACTOR = 4  # batches per worker its train loader requests ahead
RANK_SEED_STRIDE = 7919  # worker seeds of rank r > 0 are offset by r x this, so ranks augment differently
WORKER_STATE_KEY = "_yolods_worker_state"  # a worker's random state after a batch, riding on the batch


@dataclass
class TrainData:
    """The training dataset and how to make each epoch's loader, drawing exactly what Ultralytics' trainer draws.

    Ultralytics' trainer (one process) takes the data order from a RandomSampler on a seeded generator inside one
    persistent InfiniteDataLoader iterator, and the augmentation from Python's and NumPy's random state (in loader
    workers: seeded from that generator, then living on across epochs), with a mosaic buffer of recent images that
    lives on across epochs too. yolods builds a fresh DataLoader each epoch (what lets a resumed run replay an
    epoch), so it makes the same draws on the same generator itself (the iterator's base seed when Ultralytics opens
    it: first epoch, and again when close_mosaic resets it, after the permutations its prefetching drew; each
    epoch's permutation; the one RandomSampler draws as an epoch runs out) and hands each epoch's workers the random
    state and mosaic buffer that Ultralytics' worker for the same batches has. The random state that decides an
    epoch is `state_dict()`, which checkpoints carry per rank.

    At N ranks every rank draws the same permutation of the whole set, and rank r takes the r-th share of each
    global batch: a global batch holds the images a 1-rank run at the same global batch trains on together. Each
    rank augments them from its own stream (Ultralytics' DDP seeding), unless `paired`: then every rank loads and
    augments the whole global batch as the 1-rank run's loader does (its worker seeds and mosaic buffer) and keeps
    its share, so an N-rank run trains on the 1-rank run's very images, at N times the loading work.
    """

    dataset: Any
    micro_batch: int
    workers: int
    seed: int
    pin_memory: bool
    world_size: int = 1
    rank: int = 0
    accelerators_per_node: int = 0
    paired: bool = False  # load the whole global batch as 1 rank does, keep this rank's share
    order_generator: torch.Generator = field(init=False)
    iterator_open: bool = field(default=False, init=False)  # Ultralytics' persistent loader iterator exists
    iterator_batches: int = field(default=0, init=False)  # batches that iterator has given out
    sampler_draws: int = field(default=0, init=False)  # permutations drawn since it opened
    worker_states: dict[int, tuple] = field(default_factory=dict, init=False)  # its workers' states, by worker id
    mosaic_closed: bool = field(default=False, init=False)
    epoch_start_state: dict[str, Any] | None = field(default=None, init=False)  # what replays the current epoch

    def __post_init__(self) -> None:
        # build_dataloader: seed = torch.initial_seed() - RANK - 1 (= the run's seed), generator seed below
        self.order_generator = torch.Generator().manual_seed((ULTRALYTICS_LOADER_SEED - 1 + self.seed) % 2**64)

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def global_batch(self) -> int:
        return min(self.micro_batch * self.world_size, self.num_images)  # Ultralytics: min(batch, len(dataset))

    @property
    def num_workers(self) -> int:
        """Ultralytics' count: no more than the node's cores per accelerator, nor than the epoch's batches."""
        batches = self.batches_per_epoch()
        cores = (os.cpu_count() or 1) // max(self.accelerators_per_node, 1)
        return min(cores, self.workers, 0 if batches <= 1 else batches)

    def batches_per_epoch(self) -> int:
        return -(-self.num_images // self.global_batch)

    def loader_for_epoch(self, epoch: int, *, close_mosaic: SimpleNamespace | None = None) -> _EpochLoader:
        """This rank's batches of the next epoch; `close_mosaic`: the hyperparameters, in the epochs without mosaic.

        Call it once per epoch, in order (or after `load_state_dict`), and iterate it to the end before the next
        call (or checkpoint `epoch_start_state`): each call draws the epoch's random order.
        """
        self.epoch_start_state = self.state_dict()
        if close_mosaic is not None:  # Ultralytics' last-epochs switch to plain letterboxed images
            self.dataset.mosaic = False
            self.dataset.close_mosaic(hyp=copy(close_mosaic))
            if not self.mosaic_closed:
                self.mosaic_closed = True
                self._reset_iterator()  # Ultralytics resets its loader here
        worker_seeds = self._open_iterator() if not self.iterator_open else None
        # The epoch's permutation is the sampler's 2k-th draw (k epochs in, each with its end-of-epoch draw before).
        epoch_in_iterator = self.iterator_batches // self.batches_per_epoch()
        self._draw_permutations_until(2 * epoch_in_iterator)
        order = torch.randperm(self.num_images, generator=self.order_generator).tolist()
        self.sampler_draws += 1
        if self.paired:  # the whole global batches; the collate keeps this rank's share
            batches = global_batches(order, global_batch=self.global_batch, world_size=self.world_size)
        else:
            batches = shard_global_batches(
                order, global_batch=self.global_batch, world_size=self.world_size, rank=self.rank
            )
        first_worker = self.iterator_batches % max(self.num_workers, 1)  # whose turn Ultralytics' next batch is
        self.iterator_batches += len(batches)
        return _EpochLoader(self, batches, worker_seeds=worker_seeds, first_worker=first_worker)

    def _sampler_draws_for(self, batches: int) -> int:
        """Permutations RandomSampler has drawn once `batches` batches were asked of it: one per epoch started, and
        one more as each epoch runs out (with its last, short batch, or when the next batch is asked for)."""
        if batches <= 0:
            return 0
        per_epoch = self.batches_per_epoch()
        ran_out = batches // per_epoch if self.num_images % self.global_batch else (batches - 1) // per_epoch
        return -(-batches // per_epoch) + ran_out

    def _draw_permutations_until(self, draws: int) -> None:
        while self.sampler_draws < draws:
            torch.randperm(self.num_images, generator=self.order_generator)
            self.sampler_draws += 1

    def _reset_iterator(self) -> None:
        """Ultralytics' `train_loader.reset()`: its old iterator had asked for the prefetched batches too."""
        if self.iterator_open:
            prefetched = ULTRALYTICS_PREFETCH_FACTOR * self.num_workers
            self._draw_permutations_until(self._sampler_draws_for(self.iterator_batches + prefetched))
        self.iterator_open = False

    def _open_iterator(self) -> torch.Generator:
        """A fresh Ultralytics iterator draws its workers' base seed first; returns the generator the DataLoader
        draws it from: a copy of the state Ultralytics draws it from, so fresh workers seed as Ultralytics' do."""
        worker_seeds = torch.Generator()
        worker_seeds.set_state(self.order_generator.get_state())
        torch.empty((), dtype=torch.int64).random_(generator=self.order_generator)
        self.iterator_open, self.iterator_batches, self.sampler_draws = True, 0, 0
        self.worker_states = {}
        return worker_seeds

    def state_dict(self) -> dict[str, Any]:
        """This rank's random state that decides the data from here on (checkpoints save it per rank)."""
        return {
            "python_random": random.getstate(),
            "numpy_random": np.random.get_state(),
            "order_generator": self.order_generator.get_state(),
            "iterator_open": self.iterator_open,
            "iterator_batches": self.iterator_batches,
            "sampler_draws": self.sampler_draws,
            "worker_states": dict(self.worker_states),
            "mosaic_closed": self.mosaic_closed,
            "mosaic_buffer": list(self.dataset.buffer) if self.dataset.cache != "ram" else [],
            "num_images": self.num_images,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next `loader_for_epoch` draws what the saved run drew next."""
        self._check_same_images(state)
        random.setstate(state["python_random"])
        np.random.set_state(state["numpy_random"])
        self.order_generator.set_state(state["order_generator"])
        self.iterator_open = state["iterator_open"]
        self.iterator_batches = state["iterator_batches"]
        self.sampler_draws = state["sampler_draws"]
        self.worker_states = dict(state["worker_states"])
        self.mosaic_closed = state["mosaic_closed"]
        _refill_mosaic_buffer(self.dataset, state["mosaic_buffer"])

    def _check_same_images(self, state: dict[str, Any]) -> None:
        """The saved data order and mosaic buffer index the train set as it was: refuse one that has changed since.

        Before, a resume after train images were deleted died in a loader worker (IndexError on the mosaic buffer).
        Checkpoints from before the count was saved are checked by their mosaic buffer's indices alone.
        """
        saved = state.get("num_images")
        beyond = max(state["mosaic_buffer"], default=-1) >= self.num_images
        if saved == self.num_images or (saved is None and not beyond):
            return
        was = f"{saved} when the checkpoint was saved" if saved is not None else "more when the checkpoint was saved"
        raise ConfigError(
            f"--resume: the train set now has {self.num_images} usable images, {was}; resuming exactly needs the "
            "same images: restore them, or start a new run from RUN_DIR/weights/last.pt (--model)"
        )


class _EpochLoader:
    """One epoch's DataLoader over this rank's batches; it notes where each worker's random state ends up.

    Worker k of this loader takes batches k, k + W, ... as Ultralytics' worker (first_worker + k) mod W does in
    its persistent iterator, so it starts from that worker's state (fresh seeds when the iterator is new).
    """

    def __init__(
        self, data: TrainData, batches: list[list[int]], *, worker_seeds: torch.Generator | None, first_worker: int
    ):
        self.data, self.batches = data, batches
        num_workers = data.num_workers
        self.worker_ids = [(first_worker + k) % max(num_workers, 1) for k in range(num_workers)]
        initial_states = [data.worker_states.get(worker_id) for worker_id in self.worker_ids]
        if worker_seeds is None:  # a continuing iterator: every state comes from the previous epoch
            worker_seeds = torch.Generator().manual_seed(data.seed)  # unused: each worker gets a saved state
        share = (data.world_size, data.rank) if data.paired else None
        self.loader = _StopSafeDataLoader(
            data.dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=partial(_collate_noting_worker_state, data.dataset.collate_fn, share=share),
            # paired: every rank's workers seed as the 1-rank run's do
            worker_init_fn=partial(_init_worker, rank=0 if data.paired else data.rank, states=initial_states),
            generator=worker_seeds,
            pin_memory=data.pin_memory,
            persistent_workers=False,  # fresh workers each epoch: what lets a resumed run replay an epoch
        )

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        final_states = {}
        for batch in self.loader:
            worker_id, state = batch.pop(WORKER_STATE_KEY, (None, None))
            if worker_id is not None:
                final_states[self.worker_ids[worker_id]] = state
            yield batch
        self.data.worker_states.update(final_states)


def global_batches(order: list[int], *, global_batch: int, world_size: int) -> list[list[int]]:
    """Consecutive `global_batch`es of `order`; a last one with fewer images than ranks is topped up from the start
    of `order` (as DistributedSampler pads), so every rank has a batch at every step."""
    batches = []
    for start in range(0, len(order), global_batch):
        size = max(min(global_batch, len(order) - start), world_size)
        batches.append([order[(start + offset) % len(order)] for offset in range(size)])
    return batches


def rank_share(items: list[T], *, world_size: int, rank: int) -> list[T]:
    """Rank `rank`'s consecutive share of `items`, split as evenly as it goes (the first ranks take one more)."""
    base, extra = divmod(len(items), world_size)
    first = rank * base + min(rank, extra)
    return items[first : first + base + (rank < extra)]


def shard_global_batches(order: list[int], *, global_batch: int, world_size: int, rank: int) -> list[list[int]]:
    """Rank `rank`'s micro-batches: its share of each of `global_batches(order, ...)`."""
    return [
        rank_share(batch, world_size=world_size, rank=rank)
        for batch in global_batches(order, global_batch=global_batch, world_size=world_size)
    ]


def _init_worker(worker_id: int, *, rank: int = 0, states: list[tuple | None] | None = None) -> None:
    """Ultralytics' per-worker seeding (offset per rank), or the saved state of the Ultralytics worker this one
    stands in for; stop signals are the training process's to handle, not the worker's."""
    from ultralytics.data.build import seed_worker

    ignore_stop_signals()
    if rank:
        torch.manual_seed((torch.initial_seed() + RANK_SEED_STRIDE * rank) % 2**63)
    seed_worker(worker_id)
    if states and states[worker_id] is not None:
        python_state, numpy_state, mosaic_buffer = states[worker_id]
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        _refill_mosaic_buffer(torch.utils.data.get_worker_info().dataset, mosaic_buffer)


def _collate_noting_worker_state(
    collate_fn, samples: list[dict[str, Any]], *, share: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The dataset's collate (of rank `share[1]`'s share of the samples, when given as (world_size, rank)); in a
    worker, the batch also carries the worker's random state and mosaic buffer."""
    if share is not None:
        samples = rank_share(samples, world_size=share[0], rank=share[1])
    batch = collate_fn(samples)
    worker = torch.utils.data.get_worker_info()
    if worker is not None:
        buffer = list(worker.dataset.buffer) if worker.dataset.cache != "ram" else []
        batch[WORKER_STATE_KEY] = (worker.id, (random.getstate(), np.random.get_state(), buffer))
    return batch


class _StopSafeDataLoader(DataLoader):
    """A DataLoader that forks its workers with stop signals held back (see preemption.signals_blocked)."""

    def _get_iterator(self):
        with signals_blocked():
            return super()._get_iterator()


def _refill_mosaic_buffer(dataset, indices: list[int]) -> None:
    """Make the mosaic buffer (recently loaded images, mosaic's partners) hold `indices` again, in order."""
    if dataset.cache == "ram":
        return
    for index in dataset.buffer:
        dataset.ims[index], dataset.im_hw0[index], dataset.im_hw[index] = None, None, None
    dataset.buffer.clear()
    for index in indices:
        dataset.load_image(index)  # reads the image and appends its index, as when it was first loaded


def build_train_data(
    hyp: SimpleNamespace,
    data: dict[str, Any],
    *,
    micro_batch: int,
    workers: int,
    seed: int,
    stride: int,
    pin_memory: bool,
    accelerators_per_node: int = 0,
    paired: bool = False,
) -> TrainData:
    """Ultralytics' YOLODataset for the train split, built once per rank (`accelerators_per_node`: GPUs, which
    share the node's cores among their loaders; `paired`: see TrainData)."""
    world_size = dist.get_world_size()
    # The dataset's batch size sets its mosaic buffer (8 batches of recent images, mosaic's partners): paired, it is
    # the 1-rank run's, whose loader each rank stands in for.
    batch = micro_batch * world_size if paired else micro_batch
    dataset = _build_dataset(hyp, data, split="train", batch=batch, stride=stride)
    return TrainData(
        dataset=dataset,
        micro_batch=micro_batch,
        workers=workers,
        seed=seed,
        pin_memory=pin_memory,
        world_size=world_size,
        rank=dist.get_rank(),
        accelerators_per_node=accelerators_per_node,
        paired=paired,
    )


def build_val_loader(
    hyp: SimpleNamespace, data: dict[str, Any], *, batch: int, workers: int, stride: int, device: torch.device
):
    """Ultralytics' validation loader: rectangular batches, a contiguous shard per rank, merged by its validator."""
    from ultralytics.data.build import build_dataloader

    dataset = _build_dataset(hyp, data, split="val", batch=batch, stride=stride)
    rank_flag = dist.get_local_rank() if dist.get_world_size() > 1 else -1  # Ultralytics shards when != -1
    # Its InfiniteDataLoader forks workers right here; with stop signals blocked they stay pending in them for good.
    with signals_blocked():
        return build_dataloader(dataset, batch=batch, workers=workers, shuffle=False, rank=rank_flag, device=device)


def preprocess_batch(
    batch: dict[str, Any],
    *,
    device: torch.device,
    input_dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, Any]:
    """Move a collated batch to the device and scale images to [0, 1], as Ultralytics' DetectionTrainer does."""
    non_blocking = device.type == "cuda"
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            batch[key] = value.to(device, non_blocking=non_blocking)
    # Images in the layout training_memory_format chose: NHWC only with channels_last=True, at ZeRO-0 on CUDA.
    batch["img"] = (batch["img"].float() / 255).to(input_dtype).contiguous(memory_format=memory_format)
    return batch
