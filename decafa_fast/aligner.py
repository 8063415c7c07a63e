"""`FaceAligner`: landmarks for faces in photos and video frames, from a DeCaFA checkpoint.

    from decafa_fast import FaceAligner
    aligner = FaceAligner("runs/decafa.pt")            # GPU if there is one
    faces = aligner.align("photo.jpg")                 # or a BGR / grayscale numpy image
    faces[0].landmarks["wflw98"]                       # (98, 2) x, y in the photo's pixels

Faces are found with OpenCV's bundled Haar cascade (frontal faces) unless boxes are given. Each face box
becomes a square crop (`decafa_fast.data.crop`), resized to the model's input size in grayscale; the
predicted points are mapped back to the original image with the crop's inverse transform. When the detector
finds no face in an image, the whole image is used as the face box (`Face.source == "whole-image"`): this
is what lets the procedural synthetic faces, which the cascade does not recognise, run end to end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch

from .data.crop import DETECTOR_SCALE, DETECTOR_SHIFT, FaceCrop, crop_from_box, crop_whole_image, read_image, to_gray

__all__ = ["Face", "FaceAligner", "LandmarkSmoother", "open_video"]

HAAR_CASCADE = "haarcascade_frontalface_default.xml"


@dataclass
class Face:
    """One aligned face: `box` (x0, y0, x1, y1) and `landmarks` {markup: (L, 2) float64 image pixels}.

    source: "detector", "given" (a box passed by the caller) or "whole-image" (no face was detected).
    """

    box: np.ndarray
    landmarks: dict[str, np.ndarray]
    source: str
    crop: FaceCrop | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "source": self.source,
            "landmarks": {k: np.round(v, 3).tolist() for k, v in self.landmarks.items()},
        }


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FaceAligner:
    """Detect faces and predict their landmarks with a DeCaFA model.

    checkpoint: path of a checkpoint written by `decafa_fast.checkpoint.save_checkpoint` (or pass `model`,
    a DeCaFA, instead). device: "auto" (CUDA if available), "cpu", "cuda:0", ... batch_size: crops per
    forward pass. min_face: smallest face side, in pixels, the detector looks for.
    """

    def __init__(self, checkpoint: str | Path | None = None, *, model: torch.nn.Module | None = None,
                 device: str | torch.device | None = "auto", batch_size: int = 32, min_face: int = 24) -> None:
        if (checkpoint is None) == (model is None):
            raise ValueError("pass exactly one of checkpoint or model")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = _pick_device(device)
        if model is None:
            from .checkpoint import load_model

            model, _ = load_model(checkpoint, map_location=self.device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.markups: tuple[str, ...] = tuple(model.config.markups)
        self.size = int(model.config.image_size)
        self.batch_size = int(batch_size)
        self.min_face = int(min_face)
        self._detector: cv2.CascadeClassifier | None = None

    # -- detection -------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray | str | Path) -> np.ndarray:
        """Face boxes (N, 4) float64 as (x0, y0, x1, y1), largest first; (0, 4) when none is found."""
        gray = to_gray(read_image(image) if isinstance(image, (str, Path)) else image)
        if self._detector is None:
            self._detector = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / HAAR_CASCADE))
            if self._detector.empty():
                raise RuntimeError(f"cannot load OpenCV's {HAAR_CASCADE} from {cv2.data.haarcascades}")
        found = self._detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                                minSize=(self.min_face, self.min_face))
        if len(found) == 0:
            return np.zeros((0, 4))
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in found], dtype=np.float64)
        return boxes[np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")]

    def crops_for(self, gray: np.ndarray, boxes: np.ndarray | None) -> list[tuple[np.ndarray, FaceCrop, str]]:
        """(box, crop, source) for each face of one grayscale image: the given boxes, else the detector's,
        else the whole image."""
        if boxes is not None:
            boxes, source = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "given"
        else:
            boxes, source = self.detect(gray), "detector"
        if len(boxes) == 0 and source == "detector":
            h, w = gray.shape
            box = np.array([-0.5, -0.5, w - 0.5, h - 0.5])
            return [(box, crop_whole_image(h, w, self.size), "whole-image")]
        return [(b, crop_from_box(b, self.size, DETECTOR_SCALE, DETECTOR_SHIFT), source) for b in boxes]

    # -- inference -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_crops(self, patches: np.ndarray) -> dict[str, np.ndarray]:
        """Landmarks of crops already cut to the model's input: patches (N, S, S) uint8 ->
        {markup: (N, L, 2) float64 crop pixels} (the last stage), run in batches of `batch_size`."""
        patches = np.asarray(patches)
        if patches.ndim != 3 or patches.shape[1:] != (self.size, self.size):
            raise ValueError(f"patches must have shape (N, {self.size}, {self.size}), got {patches.shape}")
        out: dict[str, list[np.ndarray]] = {m: [] for m in self.markups}
        for start in range(0, len(patches), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(patches[start:start + self.batch_size]))
            images = (chunk.to(self.device, torch.float32) / 255.0)[:, None]
            for name, z in zip(self.markups, self.model(images)[-1]):
                out[name].append(z.double().cpu().numpy())
        return {m: np.concatenate(v) if v else np.zeros((0, n, 2))
                for (m, v), n in zip(out.items(), self.config.n_points)}

    def align_many(self, images: Sequence[np.ndarray | str | Path],
                   boxes: Sequence[np.ndarray | None] | None = None) -> list[list[Face]]:
        """Faces of several images, all crops run together in batches. images: BGR or grayscale arrays or
        paths; boxes: per image, None (detect) or (N, 4) face boxes."""
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"boxes must have one entry per image ({len(images)}), got {len(boxes)}")
        per_image, patches = [], []
        for i, image in enumerate(images):
            gray = to_gray(read_image(image) if isinstance(image, (str, Path)) else np.asarray(image))
            faces = self.crops_for(gray, None if boxes is None else boxes[i])
            per_image.append(faces)
            patches += [crop.warp(gray) for _, crop, _ in faces]
        if not patches:
            return [[] for _ in images]
        points = self.predict_crops(np.stack(patches))
        result, k = [], 0
        for faces in per_image:
            aligned = []
            for box, crop, source in faces:
                landmarks = {m: crop.to_image(points[m][k]) for m in self.markups}
                aligned.append(Face(box=box, landmarks=landmarks, source=source, crop=crop))
                k += 1
            result.append(aligned)
        return result

    def align(self, image: np.ndarray | str | Path, boxes: np.ndarray | None = None) -> list[Face]:
        """Faces of one image (see `align_many`)."""
        return self.align_many([image], None if boxes is None else [boxes])[0]

    def align_video(self, frames: Iterable[np.ndarray], smoothing: float | None = None,
                    chunk: int | None = None) -> Iterator[tuple[np.ndarray, list[Face]]]:
        """(frame, faces) for each frame of an iterable of BGR frames, batching `chunk` frames at a time
        (default batch_size). smoothing: None, or alpha in (0, 1] for an exponential moving average of each
        face's landmarks across frames (smaller = smoother; faces matched between frames by box overlap)."""
        smoother = LandmarkSmoother(smoothing) if smoothing is not None else None
        chunk = chunk or self.batch_size
        buffer: list[np.ndarray] = []

        def flush():
            for frame, faces in zip(buffer, self.align_many(buffer)):
                yield frame, smoother(faces) if smoother is not None else faces
            buffer.clear()

        for frame in frames:
            buffer.append(frame)
            if len(buffer) >= chunk:
                yield from flush()
        yield from flush()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class LandmarkSmoother:
    """Exponential smoothing of landmarks across video frames: s_t = alpha * x_t + (1 - alpha) * s_{t-1}.

    A face continues the previous frame's face whose box overlaps it most (IoU >= min_iou); others start
    afresh. alpha = 1 means no smoothing.
    """

    def __init__(self, alpha: float = 0.5, min_iou: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"smoothing alpha must be in (0, 1], got {alpha}")
        self.alpha, self.min_iou = float(alpha), float(min_iou)
        self.previous: list[Face] = []

    def __call__(self, faces: list[Face]) -> list[Face]:
        smoothed, used = [], set()
        for face in faces:
            scores = [(_iou(face.box, p.box), j) for j, p in enumerate(self.previous) if j not in used]
            best = max(scores, default=(0.0, -1))
            if best[0] >= self.min_iou:
                used.add(best[1])
                prev = self.previous[best[1]]
                a = self.alpha
                landmarks = {m: a * face.landmarks[m] + (1 - a) * prev.landmarks[m] for m in face.landmarks}
                face = Face(box=face.box, landmarks=landmarks, source=face.source, crop=face.crop)
            smoothed.append(face)
        self.previous = smoothed
        return smoothed


def open_video(source: str | int | Path) -> tuple[cv2.VideoCapture, float, int]:
    """Open a video file or a webcam index: (capture, frames per second, frame count or -1 if unknown)."""
    capture = cv2.VideoCapture(int(source) if isinstance(source, int) else str(source))
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open video {source!r}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not isinstance(source, int) else -1
    return capture, float(fps), count if count > 0 else -1


def read_frames(capture: cv2.VideoCapture, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """The frames of an open capture (BGR uint8), at most max_frames of them."""
    n = 0
    while max_frames is None or n < max_frames:
        ok, frame = capture.read()
        if not ok:
            break
        n += 1
        yield frame
