"""A prediction job's work as a fixed list of batches, the unit that ranks share, resume skips and timing counts.

The batches are those `YOLO(weights).predict(source, batch=B)` forms on one process: the source's images in
Ultralytics' sorted order, B at a time, then each video's frames, B at a time, no batch spanning two videos.
yolods.inference.shard gives each rank a contiguous run of them.

Examples:
    >>> batches = plan_batches(images=["a.jpg", "b.jpg", "c.jpg"], videos=[("v.mp4", 5)], batch_size=2)
    >>> [batch.keys() for batch in batches]
    [['a.jpg', 'b.jpg'], ['c.jpg'], ['v.mp4#1', 'v.mp4#2'], ['v.mp4#3', 'v.mp4#4'], ['v.mp4#5']]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkBatch:
    """Image files, or consecutive frames of one video (numbered from 1, as Ultralytics counts them)."""

    paths: tuple[str, ...]  # the image files; for video frames, the video alone
    first_frame: int = 0  # video frames only
    num_frames: int = 0

    @property
    def is_video(self) -> bool:
        return self.num_frames > 0

    @property
    def frames(self) -> range:
        return range(self.first_frame, self.first_frame + self.num_frames)

    def __len__(self) -> int:
        return self.num_frames if self.is_video else len(self.paths)

    def keys(self) -> list[str]:
        """One key per image or frame: the path, or `video#frame`; records and resume go by them."""
        if self.is_video:
            return [item_key(self.paths[0], frame) for frame in self.frames]
        return list(self.paths)


def item_key(path: str, frame: int | None = None) -> str:
    return f"{path}#{frame}" if frame else path


def plan_batches(*, images: Sequence[str], videos: Sequence[tuple[str, int]], batch_size: int) -> tuple[WorkBatch, ...]:
    """Images `batch_size` at a time, then each video's frames `batch_size` at a time (see the module docstring)."""
    batches = [
        WorkBatch(paths=tuple(images[start : start + batch_size])) for start in range(0, len(images), batch_size)
    ]
    for video, num_frames in videos:
        for first in range(1, num_frames + 1, batch_size):
            batches.append(
                WorkBatch(paths=(video,), first_frame=first, num_frames=min(batch_size, num_frames - first + 1))
            )
    return tuple(batches)
