"""A node's decoded images in one file, written once and memory-mapped read-only by every process that reads them.

The file: a header (magic, format version, where the pixels and the index lie), each image's pixels from
PIXELS_OFFSET on, back to back, and a JSON index at the end (the cache key, each image's byte offset, shape, dtype
and original size). The header is written last, so a file without it is one still being written, or abandoned.

Lifetime. The writer holds an exclusive `flock` on the file for as long as the file has a name, and removes it once
every reader has mapped it: from then on the pages live exactly as long as some process (a rank, a loader worker)
still maps them, and the kernel frees them when the last one exits, however it exits. A writer killed before it
removed the file leaves a name with nobody's lock on it; `remove_stale_stores` deletes such files.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

STORE_PREFIX = "yolods-images-"
STORE_SUFFIX = ".bin"
MAGIC = b"YOLODSIM"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIQQQQ")  # magic, version, pixels offset, pixels bytes, index offset, index bytes
PIXELS_OFFSET = mmap.PAGESIZE  # pixels page-aligned after the header
# A file younger than this is never swept, whatever its lock says: its writer may be between creating and locking it.
STALE_AFTER_S = 10.0


class StoreError(RuntimeError):
    """The store cannot be written or read (no room, a file another job or a different dataset wrote)."""


def store_path(directory: Path, *, job_token: str, key: str) -> Path:
    """The file of one dataset's images in one job: unique per job, so two jobs never share or race on a file."""
    return directory / f"{STORE_PREFIX}{job_token}-{key[:16]}{STORE_SUFFIX}"


class StoreWriter:
    """The writer's handle on a new store file: created, locked, filled, then removed once the readers mapped it."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def write(self, images: Iterable[tuple[np.ndarray, tuple[int, int]]], *, key: str) -> int:
        """Write (image, original (h, w)) pairs in dataset order; returns the pixel bytes written.

        Writes go through write(2), never through a mapping: a full /dev/shm then raises OSError (ENOSPC) here
        instead of killing the process with SIGBUS.
        """
        assert self._fd is not None, "store already removed"
        offsets, shapes, dtypes, original_hw = [0], [], [], []
        with os.fdopen(os.dup(self._fd), "wb") as file:
            file.seek(PIXELS_OFFSET)
            for image, hw0 in images:
                image = np.ascontiguousarray(image)
                file.write(memoryview(image).cast("B"))
                offsets.append(offsets[-1] + image.nbytes)
                shapes.append(list(image.shape))
                dtypes.append(image.dtype.str)
                original_hw.append([int(hw0[0]), int(hw0[1])])
            index = json.dumps(
                {"key": key, "offsets": offsets, "shapes": shapes, "dtypes": dtypes, "original_hw": original_hw}
            ).encode()
            index_offset = PIXELS_OFFSET + offsets[-1]
            file.write(index)
            file.flush()
            file.seek(0)
            file.write(HEADER.pack(MAGIC, FORMAT_VERSION, PIXELS_OFFSET, offsets[-1], index_offset, len(index)))
        return offsets[-1]

    def remove(self) -> None:
        """Unlink the file and drop the lock; mappings made before stay valid."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None


class SharedImages:
    """A read-only, indexable view of a store: what Ultralytics' `dataset.ims` holds with cache='ram'.

    `images[i]` is a NumPy view into the mapping (no copy); writing to it raises, so no process can alter what the
    node's other processes read. Loader workers forked from this process share the mapping as it is; a worker
    started by spawn reopens it through this process's descriptor (/proc/PID/fd), which outlives the file's name.
    """

    def __init__(self, path: str | Path, *, key: str):
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._map(key)
        except Exception:
            os.close(self._fd)
            raise

    def _map(self, key: str) -> None:
        header = os.pread(self._fd, HEADER.size, 0)
        if len(header) < HEADER.size or HEADER.unpack(header)[0] != MAGIC:
            raise StoreError("the image store is incomplete (its writer did not finish)")
        _, version, pixels_offset, pixels_bytes, index_offset, index_bytes = HEADER.unpack(header)
        if version != FORMAT_VERSION:
            raise StoreError(f"the image store has format {version}, this yolods reads {FORMAT_VERSION}")
        index = json.loads(os.pread(self._fd, index_bytes, index_offset))
        if index["key"] != key:
            raise StoreError("the image store holds other images than this rank's dataset (another file list or imgsz)")
        self._mapping = mmap.mmap(self._fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.pixels = np.frombuffer(self._mapping, dtype=np.uint8, count=pixels_bytes, offset=pixels_offset)
        self.offsets = np.asarray(index["offsets"], dtype=np.int64)
        self.shapes = [tuple(shape) for shape in index["shapes"]]
        self.dtypes = [np.dtype(dtype) for dtype in index["dtypes"]]
        self.original_hw = [tuple(hw) for hw in index["original_hw"]]
        self.key = key

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        i = range(len(self.shapes))[i]
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.pixels[start:end].view(self.dtypes[i]).reshape(self.shapes[i])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": f"/proc/{os.getpid()}/fd/{self._fd}", "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], key=state["key"])


def remove_stale_stores(directory: Path) -> list[Path]:
    """Delete store files whose writer died before removing them (nobody holds their lock); returns them."""
    removed = []
    for path in directory.glob(f"{STORE_PREFIX}*{STORE_SUFFIX}"):
        try:
            if time.time() - path.stat().st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live writer holds it
            path.unlink(missing_ok=True)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
