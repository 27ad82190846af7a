"""Per-rank prediction records: what a yolods.predict run has finished, kept as it goes, merged at the end.

Each rank appends one JSON line per image or frame to RUN_DIR/predictions_rank{N}.jsonl once that image's label
file (and annotated image) is on disk, and flushes after every batch:

    {"key": "/data/a.jpg", "name": "a", "detections": [{"image_id": "a", "category_id": 0, "bbox": [...], "score": 0.9}]}
    {"key": "/data/b.jpg", "name": "b", "unreadable": true}

A line is therefore the proof that its image is done: a rerun into the same directory skips every batch whose
images all have one, whatever the number of ranks or the batch size before. A line cut off by a kill is ignored
(its image is redone), and the rank that owns the file drops it before appending. At the end rank 0 merges
every rank file, in the source's order, into predictions.json: a COCO results list.

Examples:
    >>> done = read_records(run_dir)  # key -> record, every rank file
    >>> with RecordWriter(run_dir, rank=0) as writer:
    ...     writer.write([{"key": key, "name": name, "detections": detections}])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORDS_GLOB = "predictions_rank*.jsonl"


def records_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"predictions_rank{rank}.jsonl"


def read_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every complete record of every rank file in `run_dir`, by key (a later line wins)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(run_dir.glob(RECORDS_GLOB)):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a rank killed mid-write
            if not isinstance(record, dict) or "key" not in record:
                continue  # not a record yolods wrote: its input is predicted again
            records[record["key"]] = record
    return records


class RecordWriter:
    """Appends this rank's records; a line is complete (flushed, newline-terminated) before the next batch starts."""

    def __init__(self, run_dir: Path, *, rank: int):
        path = records_path(run_dir, rank)
        _drop_partial_line(path)
        self.file = path.open("a", encoding="utf-8")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        self.file.write("".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records))
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a line a kill left unfinished, so the next record starts on a line of its own."""
    if not path.exists():
        return
    content = path.read_bytes()
    if content and not content.endswith(b"\n"):
        with path.open("r+b") as file:
            file.truncate(content.rfind(b"\n") + 1)


def merge_records(run_dir: Path, *, order: Iterable[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """predictions.json (COCO results, the source's order) from every rank file; returns (results, unreadable keys).

    Records of files no longer in the source (`order`) are left out.
    """
    records = read_records(run_dir)
    results: list[dict[str, Any]] = []
    unreadable: list[str] = []
    for key in order:
        record = records.get(key)
        if record is None:
            continue
        if record.get("unreadable"):
            unreadable.append(key)
        else:
            results.extend(record["detections"])
    tmp = run_dir / "predictions.json.tmp"
    tmp.write_text(json.dumps(results))
    os.replace(tmp, run_dir / "predictions.json")
    return results, unreadable
