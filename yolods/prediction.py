"""Adapter for Ultralytics' predictor side, for yolods.predict: what `YOLO(weights).predict(source)` does, a batch
at a time, on any batch a rank is given.

Wraps `ultralytics.data.loaders.LoadImagesAndVideos` (which files a source names, in which order, and reading
them), `ultralytics.models.yolo.detect.DetectionPredictor` (letterbox, inference, NMS, boxes scaled back: the
model's own predictor, set up as YOLO.predict sets it up) and `ultralytics.engine.results.Results` (label files,
annotated images). Output names follow `BasePredictor.write_results`: labels/{stem}.txt, a repeated stem getting
-2, -3, ...; video frames labels/{stem}_{frame}.txt with frames counted from 1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from yolods.batches import WorkBatch
from yolods.errors import ConfigError
from yolods.fonts import local_fonts
from yolods.model import TrainedDetector

STREAM_PREFIXES = ("rtsp://", "rtmp://", "tcp://", "http://", "https://")


@dataclass(frozen=True)
class SourceListing:
    """The files a source names, in Ultralytics' order: images (sorted), then videos with their frame counts."""

    images: tuple[str, ...]
    videos: tuple[tuple[str, int], ...]


def list_source(source: str) -> SourceListing:
    """An image directory, a glob, a .txt (or .csv) list of paths, or a video file, listed as Ultralytics lists it.

    Raises:
        ConfigError: a stream or URL, a missing path, or nothing Ultralytics can read in it.
    """
    from ultralytics.data.loaders import LoadImagesAndVideos

    if source.lower().startswith(STREAM_PREFIXES) or source.isnumeric():
        raise ConfigError(f"--source {source}: streams, webcams and URLs cannot be sharded; pass files on disk")
    if "*" not in source and not Path(source).exists():
        raise ConfigError(f"--source {source}: no such file or directory")
    try:
        with _broken_videos_listed():
            loader = LoadImagesAndVideos(source, batch=1)
    except FileNotFoundError as error:  # a listed file that is missing, or no image/video suffix in it at all
        first_sentence = str(error).splitlines()[0].split(". ")[0]  # drop Ultralytics' list of every suffix
        if Path(source).suffix in (".txt", ".csv"):  # Ultralytics reads these as lists of paths, one per line
            first_sentence = f"read as a list of image and video paths, one per line, and {first_sentence}"
        raise ConfigError(f"--source {source}: {first_sentence}") from None
    loader.close()
    # A .txt list may name a file twice: it is predicted once, under its own name (dict keeps the first place)
    images, video_paths = (
        tuple(dict.fromkeys(part)) for part in (loader.files[: loader.ni], loader.files[loader.ni :])
    )
    videos = tuple((path, _frame_count(path)) for path in video_paths)
    if not images and not any(num_frames for _, num_frames in videos):
        broken = ", ".join(path for path, _ in videos[:3]) + (f" and {len(videos) - 3} more" if len(videos) > 3 else "")
        raise ConfigError(f"--source {source}: OpenCV cannot open {broken}, and there is nothing else to predict")
    return SourceListing(images=images, videos=videos)


@contextlib.contextmanager
def _broken_videos_listed():
    """Ultralytics' LoadImagesAndVideos opens the first video of a source while listing it and raises if OpenCV
    cannot: a broken video then failed the whole source when it sorted first among the videos, and was skipped
    otherwise. Inside this block the listing keeps it with no frames, so it is skipped and listed wherever it sorts
    (its frames are counted by `_frame_count`, not by the loader)."""
    from ultralytics.data.loaders import LoadImagesAndVideos

    open_video = LoadImagesAndVideos._new_video

    def open_or_keep_unopened(loader, path: str) -> None:
        try:
            open_video(loader, path)
        except FileNotFoundError:
            loader.cap.release()
            loader.cap, loader.frames = None, 0

    LoadImagesAndVideos._new_video = open_or_keep_unopened
    try:
        yield
    finally:
        LoadImagesAndVideos._new_video = open_video


def _frame_count(video: str) -> int:
    """Frames as LoadImagesAndVideos counts them (the container's count; 0 if OpenCV cannot open it)."""
    capture = cv2.VideoCapture(video)
    try:
        return int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()


def output_bases(listing: SourceListing) -> dict[str, str]:
    """Each file's output name: its stem, or stem-2, stem-3, ... where that would collide (images, then videos).

    An image is written as NAME, a video's frames as NAME_1 ... NAME_N (Ultralytics' names), and a numeric name is
    the COCO image_id 7 whether it reads 7 or 007; a stem is suffixed when any of those is taken already, so no
    label file is written twice and no two images share an image_id in predictions.json.
    """
    bases: dict[str, str] = {}
    taken: set[int | str] = set()
    for path, num_frames in (*((image, 0) for image in listing.images), *listing.videos):
        stem = Path(path).stem
        base, copy = stem, 1
        while (ids := {coco_image_id(name) for name in output_names(base, num_frames)}) & taken:
            copy += 1
            base = f"{stem}-{copy}"
        taken |= ids
        bases[path] = base
    return bases


def output_names(base: str, num_frames: int) -> list[str]:
    """The names an image (num_frames 0) or a video's frames are written under."""
    return [output_name(base, frame) for frame in range(1, num_frames + 1)] if num_frames else [base]


def output_name(base: str, frame: int) -> str:
    """An image's output name (frame 0), or frame `frame` of a video's (counted from 1, as Ultralytics does)."""
    return f"{base}_{frame}" if frame else base


def coco_image_id(name: str) -> int | str:
    """The image_id of predictions.json: the number a numeric name stands for, as Ultralytics writes it, else the
    name."""
    return int(name) if name.isascii() and name.isdigit() else name


class BatchPredictor:
    """The model's DetectionPredictor, set up as `YOLO(weights).predict(source, **settings)` sets it up, run one
    batch of decoded images at a time.

    `bf16` runs the forward under bfloat16 autocast (Ultralytics has no bf16 mode; `settings['quantize'] = 16`
    is its fp16). Boxes come back as Ultralytics' Results, in original-image pixels.

    Examples:
        >>> predictor = BatchPredictor(detector, settings={"imgsz": 640, "conf": 0.25, "device": "cpu"}, source="images/")
        >>> results = predictor(["images/a.jpg"], [cv2.imread("images/a.jpg")])
    """

    def __init__(self, detector: TrainedDetector, *, settings: dict[str, Any], source: str, bf16: bool = False):
        from ultralytics.models.yolo.detect import DetectionPredictor

        # YOLO.predict's composition: checkpoint defaults < predict defaults < the caller's settings.
        defaults = {"conf": 0.25, "batch": 1, "save": False, "mode": "predict", "rect": True, "embed": None}
        overrides = {**detector.defaults, **defaults, **settings, "verbose": False, "save_txt": False}
        self.predictor = DetectionPredictor(overrides=overrides)
        self.predictor.setup_model(model=detector.module, verbose=False)
        with _broken_videos_listed():
            self.predictor.setup_source(source)  # the image size and source type predict(source) would use
        self.predictor.dataset.close()
        self.bf16 = bf16

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @torch.inference_mode()
    def __call__(self, paths: list[str], images: list[np.ndarray]) -> list:
        """Results for `images` (BGR, as decoded) of files `paths`, one forward over all of them."""
        predictor = self.predictor
        predictor.batch = (paths, images, [""] * len(paths))  # postprocess takes the paths from here
        batch = predictor.preprocess(images)  # letterbox (rect when the batch shares one shape), to the device
        if not predictor.done_warmup:
            predictor.model.warmup(im=batch)
            predictor.done_warmup = True
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            outputs = predictor.inference(batch)
        if self.bf16:
            outputs = _to_float32(outputs)  # NMS and box scaling in fp32, as for fp16 outputs
        return predictor.postprocess(outputs, batch, images)


def _to_float32(outputs):
    """The head's outputs (tensors in tuples, lists and dicts) with every floating tensor in fp32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: _to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(output) for output in outputs)
    return outputs


def read_images(paths: list[str], *, channels: int = 3) -> tuple[list[str], list[np.ndarray]]:
    """The images of `paths` that decode, with their paths, read as LoadImagesAndVideos reads them (grayscale for a
    1-channel model); Ultralytics warns about each one that does not."""
    from ultralytics.data.loaders import LoadImagesAndVideos

    present = [path for path in paths if Path(path).is_file()]
    if not present:
        return [], []
    try:
        decoded_paths, images, _ = next(iter(LoadImagesAndVideos(present, batch=len(present), channels=channels)))
    except StopIteration:  # none of them decodes
        return [], []
    return decoded_paths, images


class VideoFrames:
    """Frames of one video, read forward from any frame number (1-based, as Ultralytics counts).

    LoadImagesAndVideos can only start a video at its first frame, and a rank's shard may start mid-video; the
    frames are read with the two OpenCV calls it uses (grab, retrieve), so they are the same arrays. Frames
    before the first wanted one are grabbed (decoded, not converted): exact for every codec, unlike seeking.
    """

    def __init__(self, path: str, *, channels: int = 3):
        self.path = path
        self.channels = channels
        self._open()

    def _open(self) -> None:
        self.capture = cv2.VideoCapture(self.path)
        self.next_frame = 1

    def read(self, first_frame: int, num_frames: int) -> list[np.ndarray]:
        """Frames first_frame .. first_frame + num_frames - 1; fewer if the video ends (or breaks) before."""
        if first_frame < self.next_frame:  # not for one rank's batches, which go forward; kept correct anyway
            self.close()
            self._open()
        while self.next_frame < first_frame and self.capture.grab():
            self.next_frame += 1
        frames: list[np.ndarray] = []
        if self.next_frame != first_frame:
            return frames  # the video ended before
        while len(frames) < num_frames and self.capture.grab():
            self.next_frame += 1
            ok, frame = self.capture.retrieve()
            if not ok or frame is None:
                break
            if self.channels == 1:  # as LoadImagesAndVideos converts frames for a grayscale model
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[..., None]
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.capture.release()


@dataclass(frozen=True)
class DecodedBatch:
    """A batch's images as decoded: `keys[i]` names `images[i]` (of file `paths[i]`); `missing` did not decode."""

    keys: list[str]
    paths: list[str]
    images: list[np.ndarray]
    missing: list[str]


class BatchReader:
    """Decodes one WorkBatch after another: image files as LoadImagesAndVideos reads them, video frames with
    VideoFrames (the current video stays open between its batches). `channels`: the model's (1: grayscale)."""

    def __init__(self, *, channels: int = 3) -> None:
        self.channels = channels
        self.video: VideoFrames | None = None

    def read(self, batch: WorkBatch) -> DecodedBatch:
        keys = batch.keys()
        if not batch.is_video:
            paths, images = read_images(list(batch.paths), channels=self.channels)
            decoded = set(paths)
            return DecodedBatch(keys=paths, paths=paths, images=images, missing=[k for k in keys if k not in decoded])
        path = batch.paths[0]
        if self.video is None or self.video.path != path:
            self.close()
            self.video = VideoFrames(path, channels=self.channels)
        frames = self.video.read(batch.first_frame, batch.num_frames)
        count = len(frames)
        return DecodedBatch(keys=keys[:count], paths=[path] * count, images=frames, missing=keys[count:])

    def close(self) -> None:
        if self.video is not None:
            self.video.close()
            self.video = None


def write_label(result, path: Path) -> None:
    """Ultralytics' label file for `result` (class, normalised xywh, confidence), replacing an earlier one."""
    path.unlink(missing_ok=True)  # Results.save_txt appends; a redone batch must not double its lines
    result.save_txt(path, save_conf=True)  # writes nothing when there are no boxes, as Ultralytics does


def annotate(result, *, line_width: int | None, show_labels: bool, show_conf: bool) -> np.ndarray:
    """The image with its boxes drawn as `yolo predict save=True` draws them (BGR)."""
    with local_fonts():  # ASCII labels use OpenCV's font; non-ASCII ones PIL, which would fetch Arial.Unicode.ttf
        return result.plot(line_width=line_width, labels=show_labels, conf=show_conf)


def coco_detections(result, *, image_id: int | str) -> list[dict[str, Any]]:
    """COCO results entries for `result`: bbox as [left, top, width, height] in pixels, as Ultralytics' val JSON.

    category_id is the model's class index (as in the label files), not COCO's 1-based ids.
    """
    boxes = result.boxes
    if boxes is None or not len(boxes):
        return []
    xyxy = boxes.xyxy.float().cpu().numpy()
    ltwh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    return [
        {
            "image_id": image_id,
            "category_id": int(cls),
            "bbox": [round(float(value), 3) for value in box],
            "score": round(float(conf), 5),
        }
        for box, cls, conf in zip(ltwh, boxes.cls.tolist(), boxes.conf.tolist())
    ]


def save_image(image: np.ndarray, path: Path) -> None:
    """Write a BGR image (JPEG by the suffix, as Ultralytics saves predictions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
