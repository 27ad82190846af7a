"""`python -m yolods.predict`: Ultralytics' prediction over a large source, sharded over every rank, resumable.

    python -m yolods.predict --model runs/train/exp --source images/          # a yolods run directory: weights/best.pt
    python -m yolods.predict --model best.pt --source 'data/**/*.jpg' --batch 32 --conf 0.25 --save
    torchrun --nproc_per_node 8 -m yolods.predict --model best.pt --source list.txt --batch 64 --half
    deepspeed --num_gpus 8 --module yolods.predict --model best.pt --source video.mp4
    srun --ntasks-per-node 8 python -m yolods.predict ...                    # SLURM: export MASTER_ADDR=<first node>
    python -m yolods.predict ... --name exp --exist_ok                       # again: continues where it stopped

--source is an image directory, a glob, a .txt list of paths, a video file, or a mix of images and videos.
Sharding: the source's images in Ultralytics' sorted order, --batch at a time, then each video's frames, --batch
at a time, make a list of batches; rank r of W takes a contiguous run of them, the first (batches % W) ranks
one batch more (yolods.batches, yolods.inference.shard). Every image and frame is predicted exactly once, in
the batch it would be in on one process, so boxes are those of `YOLO(weights).predict(source, batch=--batch)`.

Each rank writes as it goes into the output directory (default runs/predict/exp): labels/NAME.txt (Ultralytics'
save_txt with save_conf: class, normalised xywh, confidence; frames as NAME_FRAME.txt), with --save NAME.jpg
(frames: NAME_frames/NAME_FRAME.jpg), and predictions_rankN.jsonl (yolods.records). At the end rank 0 merges
them into predictions.json (COCO results) and writes summary.json (images, unreadable files, img/s per rank).

Exit codes: 0 done; 2 a user mistake (one line, before any process group), or a source of which not one file
could be read (after writing summary.json); 143 or 130 stopped by a signal at a
batch boundary (rerun with --exist_ok to continue); 1 an error on some rank, which ended every rank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from yolods import dist, heap, inference
from yolods.batches import WorkBatch
from yolods.errors import ConfigError
from yolods.flags import FlagParser
from yolods.model import TrainedDetector, load_trained_detector

DEFAULT_BATCH = 16  # per rank; YOLO.predict's default is 1, which leaves a GPU idle
OPENCV_MAX_THICKNESS = 32767  # cv2.rectangle's limit on a line's thickness
SETTINGS_FILE = "predict_args.json"  # what a rerun with --exist_ok must match to continue


@dataclass(frozen=True)
class Annotation:
    """How --save draws boxes (Ultralytics' names and defaults)."""

    line_width: int | None = None
    show_labels: bool = True
    show_conf: bool = True


@dataclass(frozen=True)
class PredictPlan:
    """A prediction job, checked: weights, the batches of the whole source, settings, outputs."""

    detector: TrainedDetector
    source: str
    batches: tuple[WorkBatch, ...]
    bases: dict[str, str]  # file -> output name (Ultralytics' naming)
    broken_videos: tuple[str, ...]
    settings: dict[str, Any]  # Ultralytics predict settings
    bf16: bool
    save: bool
    annotation: Annotation
    device: str
    project: str
    name: str
    exist_ok: bool

    def stamp(self) -> dict[str, Any]:
        """What decides the outputs: a rerun into the same directory continues only with the same.

        The batch size is part of it: a batch of images of different shapes is letterboxed to one square, so it
        decides boxes too. The number of ranks is not (batches are the same on any number of ranks).
        """
        settings = {key: value for key, value in self.settings.items() if key != "device"}
        outputs = {"bf16": self.bf16, "save": self.save, **asdict(self.annotation)}
        return {"model": str(self.detector.weights), "source": self.source, **settings, **outputs}


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="python -m yolods.predict",
        description="Predict with trained YOLO weights over images or videos, sharded over every rank (any launcher).",
    )
    inference.add_common_flags(parser, default_project="runs/predict")
    parser.add_argument("--source", required=True, help="image directory, glob, .txt list of paths, or video file")
    parser.add_argument("--classes", type=int, nargs="+", help="keep only these class indices")
    parser.add_argument("--agnostic_nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA; on CPU it runs, slowly)")
    parser.add_argument("--save", action="store_true", help="also write annotated images")
    parser.add_argument("--line_width", type=int, help="box line width of --save images (default: by image size)")
    parser.add_argument("--show_labels", action=argparse.BooleanOptionalAction, default=True, help="--save: names")
    parser.add_argument("--show_conf", action=argparse.BooleanOptionalAction, default=True, help="--save: scores")
    return parser


def plan_prediction(argv: list[str] | None) -> PredictPlan:
    """Flags -> PredictPlan on every rank before any process group; every user mistake raises ConfigError."""
    from yolods.batches import plan_batches
    from yolods.prediction import list_source, output_bases

    args = build_parser().parse_args(argv)
    settings = inference.common_settings(args)
    if args.half and args.bf16:
        raise ConfigError("--half and --bf16 both given: choose one precision")
    # a negative width crashes OpenCV's drawing (SIGSEGV, no message); above its MAX_THICKNESS it asserts
    if args.line_width is not None and not 1 <= args.line_width <= OPENCV_MAX_THICKNESS:
        raise ConfigError(f"--line_width {args.line_width}: use a width in pixels from 1 to {OPENCV_MAX_THICKNESS}")
    if args.classes is not None:
        settings["classes"] = args.classes
    if args.agnostic_nms:
        settings["agnostic_nms"] = True
    settings.setdefault("batch", DEFAULT_BATCH)
    detector = load_trained_detector(args.model)
    unknown = sorted(set(args.classes or ()) - set(detector.names))
    if unknown:
        raise ConfigError(f"--classes {unknown}: the model has classes 0-{len(detector.names) - 1}")
    listing = list_source(args.source)
    device = inference.device_type(args)
    settings["device"] = inference.ultralytics_device(device)
    return PredictPlan(
        detector=detector,
        source=args.source,
        batches=plan_batches(images=listing.images, videos=listing.videos, batch_size=settings["batch"]),
        bases=output_bases(listing),
        broken_videos=tuple(video for video, num_frames in listing.videos if num_frames == 0),
        settings=settings,
        bf16=args.bf16,
        save=args.save,
        annotation=Annotation(line_width=args.line_width, show_labels=args.show_labels, show_conf=args.show_conf),
        device=device,
        project=args.project,
        name=args.name,
        exist_ok=args.exist_ok,
    )


def run(plan: PredictPlan, job: inference.Job) -> int:
    """Predict this rank's shard, skipping what an earlier run into the directory finished; rank 0 merges."""
    from yolods.checkpoint import make_run_dir
    from yolods.records import read_records

    run_dir = job.run_dir = make_run_dir(project=plan.project, name=plan.name, exist_ok=plan.exist_ok, subdir="labels")
    _check_same_source_on_every_rank(plan)
    _check_continuable(run_dir, plan.stamp())
    done = read_records(run_dir)
    dist.barrier()  # every rank has read the records before any rank appends to them
    mine = inference.shard(plan.batches, rank=dist.get_rank(), world_size=dist.get_world_size())
    todo = [batch for batch in mine if not all(key in done for key in batch.keys())]
    report = _predict(plan, todo, run_dir=run_dir, job=job)
    report["skipped_done"] = sum(len(batch) for batch in mine) - sum(len(batch) for batch in todo)
    reports = dist.gather_objects(report)
    exit_code = _finish(plan, run_dir, reports) if dist.is_main_process() else None
    return dist.broadcast_object(exit_code)  # every rank exits as rank 0 does


def _check_same_source_on_every_rank(plan: PredictPlan) -> None:
    """Each rank listed the source itself; files appearing meanwhile would make the shards overlap or miss some."""
    digest = hashlib.sha256("\n".join(key for batch in plan.batches for key in batch.keys()).encode()).hexdigest()
    if dist.any_rank(digest != dist.broadcast_object(digest)):
        raise ConfigError(f"--source {plan.source}: its files changed while the ranks listed them; run again")


def _check_continuable(run_dir: Path, stamp: dict[str, Any]) -> None:
    """Record the settings in a new directory; in one with earlier predictions, require the same ones. A collective."""
    from yolods.config import write_json

    error = None
    if dist.is_main_process():
        path = run_dir / SETTINGS_FILE
        if not path.exists():
            write_json(path, stamp)
        else:
            error = _settings_mismatch(path, stamp)
    error = dist.broadcast_object(error)
    if error:
        raise ConfigError(error)


def _settings_mismatch(path: Path, stamp: dict[str, Any]) -> str | None:
    """Why the predictions beside settings file `path` cannot be continued with `stamp`, or None if they can."""
    run_dir = path.parent
    try:
        earlier = json.loads(path.read_text())
        if not isinstance(earlier, dict):
            raise ValueError(f"a {type(earlier).__name__}, not settings")
    except ValueError as caught:  # JSONDecodeError too
        return f"{path} is damaged ({caught}), so {run_dir} cannot be continued: use another --name, or delete it"
    changed = sorted(key for key in {*stamp, *earlier} if earlier.get(key) != stamp.get(key))
    if not changed:
        return None
    was = ", ".join(f"{key}={earlier.get(key, 'default')}" for key in changed)
    now = ", ".join(f"{key}={stamp.get(key, 'default')}" for key in changed)
    return (
        f"{run_dir} holds predictions made with other settings ({was}; now {now}): "
        "rerun with those to continue, or use another --name"
    )


def _predict(plan: PredictPlan, todo: list[WorkBatch], *, run_dir: Path, job: inference.Job) -> dict[str, Any]:
    """Predict `todo`, writing every output as it goes; returns this rank's counts and time."""
    from yolods.metrics import progress_bar
    from yolods.prediction import BatchPredictor, BatchReader
    from yolods.records import RecordWriter

    predictor = BatchPredictor(plan.detector, settings=plan.settings, source=plan.source, bf16=plan.bf16)
    reader = BatchReader(channels=plan.detector.channels)
    bar = progress_bar(total=sum(len(batch) for batch in todo), desc="predict", unit="img")
    num_images, unreadable = 0, []
    started_s = time.perf_counter()
    with RecordWriter(run_dir, rank=dist.get_rank()) as writer:
        # On CUDA the next batch is decoded while this one runs, as Ultralytics' predictor does.
        for batch, decoded in _read_ahead(reader, todo, enabled=predictor.device.type == "cuda"):
            job.check_stop()
            results = predictor(decoded.paths, decoded.images) if decoded.images else []
            records = [
                _write_outputs(plan, run_dir, result, key=key, frame=batch.first_frame + index if batch.is_video else 0)
                for index, (key, result) in enumerate(zip(decoded.keys, results))
            ]
            for key in decoded.missing:
                print(f"yolods: rank {dist.get_rank()}: WARNING: cannot read {key}, skipped", file=sys.stderr)
                records.append({"key": key, "unreadable": True})
            writer.write(records)
            num_images += len(decoded.images)
            unreadable += decoded.missing
            bar.update(len(batch))
    elapsed_s = time.perf_counter() - started_s
    bar.close()
    reader.close()
    return {"rank": dist.get_rank(), "images": num_images, "seconds": elapsed_s, "unreadable": unreadable}


def _read_ahead(reader, batches: list[WorkBatch], *, enabled: bool):
    """(batch, decoded) pairs; with `enabled`, each batch is decoded on a thread while the previous one is used."""
    if not enabled:
        for batch in batches:
            yield batch, reader.read(batch)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(reader.read, batch)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def _write_outputs(plan: PredictPlan, run_dir: Path, result, *, key: str, frame: int) -> dict[str, Any]:
    """The label file and (--save) annotated image of one image or frame; returns its record."""
    from yolods.prediction import annotate, coco_detections, coco_image_id, output_name, save_image, write_label

    base = plan.bases[result.path]
    name = output_name(base, frame)
    write_label(result, run_dir / "labels" / f"{name}.txt")
    if plan.save:
        image_path = run_dir / f"{base}_frames" / f"{name}.jpg" if frame else run_dir / f"{name}.jpg"
        save_image(annotate(result, **asdict(plan.annotation)), image_path)
    return {"key": key, "name": name, "detections": coco_detections(result, image_id=coco_image_id(name))}


def _finish(plan: PredictPlan, run_dir: Path, reports: list[dict[str, Any]]) -> int:
    """Rank 0: predictions.json, summary.json, and the closing lines (throughput per rank and in total).

    Returns the exit code: 2 when not one file of the source could be read (a wrong folder, or files OpenCV
    cannot decode), which a pipeline must not take for an empty result.
    """
    from yolods.config import write_json
    from yolods.records import merge_records

    keys = [key for batch in plan.batches for key in batch.keys()]
    results, unreadable = merge_records(run_dir, order=keys)
    unreadable += list(plan.broken_videos)
    slowest_s = max(report["seconds"] for report in reports)
    predicted = sum(report["images"] for report in reports)
    per_rank = [
        {**report, "imgs_per_s": report["images"] / report["seconds"] if report["seconds"] else 0.0}
        for report in reports
    ]
    summary = {
        "model": str(plan.detector.weights),
        "source": plan.source,
        "world_size": len(reports),
        "images_in_source": len(keys),
        "predicted_now": predicted,
        "skipped_done": sum(report["skipped_done"] for report in reports),
        "detections": len(results),
        "unreadable": unreadable,
        "imgs_per_s": predicted / slowest_s if slowest_s else 0.0,
        "per_rank": [{k: v for k, v in report.items() if k != "unreadable"} for report in per_rank],
        "settings": {k: v for k, v in plan.settings.items() if k != "device"},
        "names": plan.detector.names,
    }
    write_json(run_dir / "summary.json", summary)
    for report in per_rank:
        dist.print_main(
            f"yolods: rank {report['rank']}: {report['images']} images in {report['seconds']:.1f} s, "
            f"{report['imgs_per_s']:.1f} img/s"
        )
    dist.print_main(
        f"yolods: {predicted} images on {dist.ranks_phrase(len(reports))} in {slowest_s:.1f} s: {summary['imgs_per_s']:.1f} img/s"
        + (f"; {summary['skipped_done']} done by an earlier run, skipped" if summary["skipped_done"] else "")
    )
    if unreadable:
        shown = ", ".join(unreadable[:10]) + (f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
        dist.print_main(f"yolods: WARNING: {len(unreadable)} unreadable, skipped: {shown}")
    dist.print_main(
        f"yolods: {len(results)} detections in {run_dir / 'predictions.json'}, labels in {run_dir / 'labels'}"
    )
    if unreadable and set(keys) <= set(unreadable):
        dist.print_main(
            f"yolods: error: --source {plan.source}: none of its {len(set(unreadable))} files could be read "
            f"(first: {unreadable[0]}); pass images or videos OpenCV can decode"
        )
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Predict; returns the process exit code (see the module docstring)."""
    return inference.run_job(argv, plan=plan_prediction, run=run)


if __name__ == "__main__":
    heap.finish_process(main())
