"""Procedural synthetic faces with exact 98-point (WFLW layout) landmarks; 68 / 5 points derived from them.

A face is built in a canonical frame (unit = half the face width, origin between the eyes and the
mouth, y down): contour, brows, eyes with pupils, nose, lips, with random shape and expression (eye
and mouth opening, smile, gaze). Each point has a depth; a yaw / pitch rotation of those 3-D points
squashes the face and slides the inner features sideways as a turning head does (yaw up to 75 degrees).
The shape keeps the proportions of real 68/98-point annotations (the landmarks' box about square for a
frontal face), and the face is placed as a real crop would show it: the landmarks' box fills about 80 % of
the image (a 25 % margin, as `crop.LANDMARK_SCALE`), turned in the image plane and shifted a little. The
face is drawn with OpenCV *from the transformed landmark points themselves*, so the markup matches the
drawing. Then: cluttered background
(drawn first), lighting gradient, blur, noise and occluding patches.

Every sample is a pure function of (seed, index): `SyntheticFaces(n, seed=s)[i]` is the same face in
every process and every run. Generation costs mostly fixed OpenCV call overhead, so it is nearly
independent of size (tests/app/test_synthetic.py bounds it); samples are cached (as uint8) after first access.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from . import transforms as T
from .markups import MARKUPS, derive_from_wflw98, get_markup

__all__ = ["SyntheticFaces", "generate_face", "collate_faces", "canonical_face", "ALL_MARKUPS"]

ALL_MARKUPS = ("wflw98", "300w68", "celeba5")
_PERM98 = np.array(MARKUPS["wflw98"].flip_permutation)
_SHIFT = 4  # fixed-point bits for sub-pixel OpenCV drawing
_ONE = 1 << _SHIFT


# ------------------------------------------------------------------------------------------------
# Canonical face
# ------------------------------------------------------------------------------------------------
def canonical_face(rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A random face shape in the canonical frame.

    Returns (points (98, 2), depth (98,), extras) where extras holds non-landmark outlines used for
    drawing (forehead arc, hair line, neck) as (N, 3) arrays of x, y, depth, and style numbers.
    With rng=None the mean-like face is returned (every random choice at its middle value).
    """
    u = (lambda lo, hi: rng.uniform(lo, hi)) if rng is not None else (lambda lo, hi: 0.5 * (lo + hi))
    p = np.zeros((98, 2), np.float64)
    d = np.zeros(98, np.float64)

    # Proportions follow real 68-point annotations (a frontal mean face): in units of half the jaw width,
    # the outer eye corners sit 0.5 above the origin and 0.63 to each side, the brows 0.3 higher, the nose
    # tip at -0.1, the mouth corners at 0.4 and the chin at 1.05, so the landmarks' box is about square.
    # contour 0..32: a super-ellipse from the image-left temple round the chin to the image-right temple
    a, top, b, q = u(0.92, 1.05), u(-0.47, -0.35), u(1.35, 1.6), u(0.7, 0.95)
    theta = np.pi * (1.0 - np.arange(33) / 32.0)
    cos, sin = np.cos(theta), np.sin(theta)
    p[:33, 0] = a * np.sign(cos) * np.abs(cos) ** q
    p[:33, 1] = top + b * np.abs(sin) ** q
    d[:33] = 0.25 * np.abs(sin)

    # left-side features (image left); the right side is mirrored through the flip permutation below
    eye_y, eye_dx, ew = u(-0.56, -0.44), u(0.41, 0.49), u(0.16, 0.2)
    eye_open = u(0.15, 1.0) if rng is None or rng.random() < 0.85 else u(0.02, 0.15)
    eh = ew * 0.5 * eye_open
    ex = -eye_dx
    tilt = u(-0.04, 0.06)  # outer corner lower / higher than the inner one
    p[60] = (ex - ew, eye_y + tilt)
    p[61:64, 0] = ex + ew * np.array([-0.5, 0.0, 0.5])
    p[61:64, 1] = eye_y + tilt * np.array([0.5, 0.0, -0.5]) - eh * np.array([0.85, 1.0, 0.85])
    p[64] = (ex + ew, eye_y - tilt)
    p[65:68, 0] = ex + ew * np.array([0.5, 0.0, -0.5])
    p[65:68, 1] = eye_y + tilt * np.array([-0.5, 0.0, 0.5]) + 0.8 * eh * np.array([0.85, 1.0, 0.85])
    gx, gy = u(-1, 1), u(-1, 1)
    p[96] = (ex + 0.35 * ew * gx, eye_y + 0.25 * eh * gy)
    d[60:68] = d[96] = 0.5

    brow_y, brow_t, arch = eye_y - u(0.2, 0.3), u(0.05, 0.09), u(0.02, 0.1)
    outer, inner = ex - ew - u(0.03, 0.1), ex + ew + u(-0.02, 0.04)
    s = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    p[33:38, 0] = outer + (inner - outer) * s
    p[33:38, 1] = brow_y - arch * np.sin(np.pi * s) + u(0.0, 0.05) * (1 - s)
    s_low = np.array([0.8, 0.6, 0.4, 0.2])
    p[38:42, 0] = outer + (inner - outer) * s_low
    p[38:42, 1] = (brow_y - arch * np.sin(np.pi * s_low) + u(0.0, 0.05) * (1 - s_low)
                   + brow_t * (0.6 + 0.4 * np.sin(np.pi * s_low)))
    d[33:42] = 0.55

    # mirror the left features to the right side: point perm[i] is the mirror of point i
    left = np.r_[33:42, 60:68, 96]
    p[_PERM98[left]] = p[left] * np.array([-1.0, 1.0])
    d[_PERM98[left]] = d[left]
    p[97, 0] = eye_dx + 0.35 * ew * gx  # both eyes look the same way
    # a little asymmetry
    if rng is not None:
        p[33:98] += rng.normal(0.0, 0.008, size=(65, 2))

    # nose: bridge 51..54 (top to tip), base 55..59 (left to right)
    tip_y, nw = u(-0.16, -0.04), u(0.17, 0.25)
    p[51:55, 0] = 0.0
    p[51:55, 1] = np.linspace(eye_y + 0.02, tip_y, 4)
    d[51:55] = np.linspace(0.7, 1.0, 4)
    p[55:60, 0] = nw * np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    p[55:60, 1] = tip_y + np.array([0.0, 0.06, 0.09, 0.06, 0.0]) + 0.02
    d[55:60] = [0.75, 0.85, 0.9, 0.85, 0.75]

    # mouth: a mid curve (smile lifts the corners) opened by `gap`, lips of random thickness
    my, mw, smile = u(0.34, 0.46), u(0.33, 0.45), u(-0.06, 0.1)
    gap = 0.0 if rng is not None and rng.random() < 0.45 else u(0.0, 0.22)
    up_t, low_t = u(0.08, 0.13), u(0.09, 0.15)

    def mid(x):
        return my - smile * (x / mw) ** 2

    def prof(x):
        return np.sqrt(np.clip(1.0 - (x / mw) ** 2, 0.0, 1.0))

    p[76] = (-mw, mid(-mw))
    p[82] = (mw, mid(mw))
    xu = mw * np.array([-0.6, -0.3, 0.0, 0.3, 0.6])
    cupid = np.array([1.0, 1.05, 0.8, 1.05, 1.0])  # the dip in the middle of the upper lip
    p[77:82, 0] = xu
    p[77:82, 1] = mid(xu) - gap / 2 * prof(xu) - up_t * cupid * (0.4 + 0.6 * prof(xu))
    xl = xu[::-1]
    p[83:88, 0] = xl
    p[83:88, 1] = mid(xl) + gap / 2 * prof(xl) + low_t * (0.4 + 0.6 * prof(xl))
    p[88] = (-0.85 * mw, mid(-0.85 * mw))
    p[92] = (0.85 * mw, mid(0.85 * mw))
    xi = mw * np.array([-0.4, 0.0, 0.4])
    p[89:92, 0] = xi
    p[89:92, 1] = mid(xi) - gap / 2 * prof(xi)
    p[93:96, 0] = xi[::-1]
    p[93:96, 1] = mid(xi[::-1]) + gap / 2 * prof(xi[::-1])
    d[76:96] = 0.65
    # inner features sit on a rounded surface: depth falls off towards the sides
    d[33:98] *= np.sqrt(np.clip(1.0 - 0.6 * p[33:98, 0] ** 2, 0.2, 1.0))

    # non-landmark outlines for drawing: forehead arc (temple to temple over the top), hair, neck
    t = np.linspace(0.0, np.pi, 17)
    head_h = u(0.9, 1.15)
    forehead = np.stack([a * np.cos(t), top - head_h * np.sin(t), np.zeros_like(t)], axis=1)
    hair_line = top - head_h * u(0.35, 0.8)
    neck_w = a * u(0.45, 0.6)
    neck = np.array([[-neck_w, 0.8, 0.0], [neck_w, 0.8, 0.0], [neck_w * 1.3, 3.0, 0.0], [-neck_w * 1.3, 3.0, 0.0]])
    extras = {
        "forehead": forehead,
        "hair_line": hair_line,
        "neck": neck,
        "hair": u(0, 1),
        "skin": u(0.45, 0.85),
        "lip": u(-0.25, 0.1),
        "brow": u(0.05, 0.35),
    }
    return p, d, extras


def _pose(points: np.ndarray, depth: np.ndarray, yaw: float, pitch: float) -> np.ndarray:
    """Rotate (x, y, depth) by yaw (about the vertical axis) and pitch, project orthographically."""
    x, y, z = points[:, 0], points[:, 1], depth
    x2 = x * np.cos(yaw) + z * np.sin(yaw)
    z2 = -x * np.sin(yaw) + z * np.cos(yaw)
    y2 = y * np.cos(pitch) - z2 * np.sin(pitch)
    return np.stack([x2, y2], axis=1)


def _fix(points: np.ndarray) -> np.ndarray:
    """Float pixel coordinates -> int32 fixed point for OpenCV drawing with shift=_SHIFT."""
    return np.round(points * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _poly(img: np.ndarray, pts: np.ndarray, value: float) -> None:
    cv2.fillPoly(img, [_fix(pts)], int(np.clip(value, 0, 1) * 255), lineType=cv2.LINE_AA, shift=_SHIFT)


def _line(img: np.ndarray, pts: np.ndarray, value: float, thickness: int, closed: bool = False) -> None:
    cv2.polylines(img, [_fix(pts)], closed, int(np.clip(value, 0, 1) * 255), max(1, thickness), cv2.LINE_AA, _SHIFT)


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Random lines, circles and boxes: a cluttered background."""
    h, w = img.shape
    for _ in range(int(rng.integers(2, 9))):
        v = int(rng.uniform(0, 255))
        kind = rng.integers(3)
        a = (int(rng.uniform(-0.2, 1.2) * w), int(rng.uniform(-0.2, 1.2) * h))
        if kind == 0:
            b = (int(rng.uniform(-0.2, 1.2) * w), int(rng.uniform(-0.2, 1.2) * h))
            cv2.line(img, a, b, v, max(1, int(rng.uniform(0.005, 0.04) * w)), cv2.LINE_AA)
        elif kind == 1:
            cv2.circle(img, a, max(1, int(rng.uniform(0.05, 0.3) * w)), v, -1 if rng.random() < 0.5 else 1, cv2.LINE_AA)
        else:
            b = (a[0] + int(rng.uniform(0.1, 0.5) * w), a[1] + int(rng.uniform(0.1, 0.5) * h))
            cv2.rectangle(img, a, b, v, -1 if rng.random() < 0.5 else max(1, w // 64))


def generate_face(size: int, rng: np.random.Generator, difficulty: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one random face.

    size: image side in pixels; difficulty in [0, 1] scales the pose range and the nuisances.
    Returns (image (size, size) uint8, points98 (98, 2) float32 pixel coordinates inside the image). The
    landmarks' box fills about 80 % of the image on its longer side, as in a 25 %-margin crop of 300W.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    pts, depth, ex = canonical_face(rng)
    # yaw up to profile (a broad spread, most faces within 30 degrees), pitch and in-plane roll
    yaw = float(np.deg2rad(np.clip(rng.normal(0, 25), -75, 75) * difficulty))
    pitch = float(np.deg2rad(rng.uniform(-12, 12) * difficulty))
    roll = float(np.deg2rad(np.clip(rng.normal(0, 12), -35, 35) * difficulty))
    squash = rng.uniform(0.92, 1.08)  # face aspect ratio
    # Placement as in a real crop: the landmarks' box fills `fill` of the image on its longer side (a 25 %
    # margin gives 0.8), centred up to `shift` off the middle, as a detector's box would leave it.
    fill = rng.uniform(0.74, 0.86) if difficulty > 0 else 0.8
    shift = rng.uniform(-0.04, 0.04, size=2) * size * difficulty

    def posed(xy: np.ndarray, dz: np.ndarray) -> np.ndarray:
        q = _pose(xy, dz, yaw, pitch)
        q[:, 1] *= squash
        c, si = np.cos(roll), np.sin(roll)
        return q @ np.array([[c, si], [-si, c]])

    unit = posed(pts, depth)
    lo, hi = unit.min(axis=0), unit.max(axis=0)
    scale = fill * size / float((hi - lo).max())
    origin = (lo + hi) / 2

    def place(xy: np.ndarray, dz: np.ndarray, s: float) -> np.ndarray:
        return (posed(xy, dz) - origin) * s + (size - 1) / 2 + shift

    landmarks = np.clip(place(pts, depth, scale), 0.0, size - 1.0)

    img = np.full((size, size), int(rng.uniform(0, 255)), np.uint8)
    _clutter(img, rng)
    skin = ex["skin"]
    # neck, head (contour + forehead arc), hair
    _poly(img, place(ex["neck"][:, :2], ex["neck"][:, 2], scale), skin * 0.8)
    forehead = place(ex["forehead"][:, :2], ex["forehead"][:, 2], scale)
    # the skin is the hull of the outline and every feature: on a head turned towards profile the far eye,
    # brow and nose lie beyond the jaw's outline, on the cheek and the silhouette that the hull follows
    head = cv2.convexHull(np.concatenate([landmarks, forehead]).astype(np.float32))[:, 0]
    _poly(img, head, skin)
    if ex["hair"] > 0.3:
        fh = ex["forehead"].copy()
        cut = fh[:, 1] < ex["hair_line"]
        if cut.sum() >= 3:
            hair = place(fh[cut, :2], fh[cut, 2], scale * 1.04)
            _poly(img, hair, ex["hair"] * 0.6 - 0.15)
    # a faint jaw shadow makes the contour visible against a similar background
    _line(img, landmarks[:33], skin * 0.7, max(1, size // 96))
    # brows
    brow = ex["brow"]
    _poly(img, landmarks[33:42], brow)
    _poly(img, landmarks[42:51], brow)
    # eyes: white, iris + pupil clipped to the lids, lash line
    for lids, pupil in ((landmarks[60:68], landmarks[96]), (landmarks[68:76], landmarks[97])):
        eye_w = np.linalg.norm(lids[0] - lids[4])
        mask = np.zeros_like(img)
        _poly(mask, lids, 1.0)
        layer = np.full_like(img, int(rng.uniform(0.75, 0.95) * 255))
        cv2.circle(layer, tuple(int(v) for v in np.round(pupil * _ONE)), max(_ONE, int(0.28 * eye_w * _ONE)),
                   int(rng.uniform(0.1, 0.45) * 255), -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(layer, tuple(int(v) for v in np.round(pupil * _ONE)), max(_ONE // 2, int(0.12 * eye_w * _ONE)),
                   10, -1, cv2.LINE_AA, _SHIFT)
        alpha = mask.astype(np.float32) / 255.0
        img[:] = np.round(img * (1 - alpha) + layer * alpha).astype(np.uint8)
        _line(img, lids, 0.08, max(1, size // 90), closed=True)
    # nose
    _line(img, landmarks[51:55], skin * 0.75, max(1, size // 128))
    _line(img, landmarks[55:60], skin * 0.55, max(1, size // 100))
    for k in (56, 58):
        cv2.circle(img, tuple(int(v) for v in np.round(landmarks[k] * _ONE)), max(_ONE // 2, size * _ONE // 90),
                   int(skin * 0.35 * 255), -1, cv2.LINE_AA, _SHIFT)
    # lips, mouth cavity, lip line
    _poly(img, landmarks[76:88], skin + ex["lip"] - 0.05)
    _poly(img, landmarks[88:96], 0.08)
    _line(img, np.concatenate([landmarks[76:77], landmarks[89:92], landmarks[82:83]]), 0.12, max(1, size // 128))

    # photometric nuisances
    f = img.astype(np.float32) / 255.0
    f = T.lighting_gradient(f, rng, strength=0.8 * difficulty)
    if rng.random() < 0.35 * difficulty:
        f = T.occlude(f, rng, count=int(rng.integers(1, 3)), max_fraction=0.3)
    if rng.random() < 0.6:
        f = T.gaussian_blur(f, rng.uniform(0.0, 1.0) * size / 64 * difficulty)
    f = T.gaussian_noise(f, rng, std=rng.uniform(0.0, 0.05) * difficulty)
    img = np.clip(np.round(f * 255), 0, 255).astype(np.uint8)
    return img, landmarks.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Dataset and collate
# ------------------------------------------------------------------------------------------------
class SyntheticFaces(Dataset):
    """`n` procedural faces of `size` x `size`, sample i a pure function of (seed, i).

    markups: the markups each sample carries (derived from its 98 points);
    annotate: the subset exposed as annotated (default: all of `markups`); the others are absent from
      "landmarks" and False in "mask", which is how a data set with a coarser markup looks.
    augment: random horizontal flips (with index permutation), drawn from a generator seeded by `seed`.
    Item: {"image": float32 (1, H, W) in [0, 1], "landmarks": {markup: float32 (L, 2)},
           "mask": {markup: bool}}.
    """

    def __init__(
        self,
        n: int,
        size: int = 128,
        seed: int = 0,
        markups: Sequence[str] = ALL_MARKUPS,
        annotate: Sequence[str] | str | None = None,
        augment: bool = False,
        difficulty: float = 1.0,
        cache: bool = True,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.markups = tuple(get_markup(m).name for m in markups)
        if isinstance(annotate, str):
            annotate = (annotate,)
        self.annotate = self.markups if annotate is None else tuple(annotate)
        for name in self.annotate:
            if name not in self.markups:
                raise ValueError(f"annotate names {name!r}, which is not among markups {self.markups}")
        self.n, self.size, self.seed = int(n), int(size), int(seed)
        self.augment, self.difficulty = bool(augment), float(difficulty)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None
        self._aug_rng = np.random.default_rng([self.seed, 0x5EED])

    def __len__(self) -> int:
        return self.n

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W), points98 (98, 2)) of face `index`, without augmentation."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} faces")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        face = generate_face(self.size, np.random.default_rng([self.seed, index]), self.difficulty)
        if self._cache is not None:
            self._cache[index] = face
        return face

    def __getitem__(self, index: int) -> dict:
        img, pts98 = self.raw(int(index))
        image = torch.from_numpy(img.astype(np.float32) / 255.0)[None]
        landmarks = {name: torch.from_numpy(derive_from_wflw98(pts98, name).astype(np.float32))
                     for name in self.annotate}
        if self.augment and self._aug_rng.random() < 0.5:
            image, landmarks = T.hflip(image, landmarks)
        return {"image": image, "landmarks": landmarks, "mask": {m: m in self.annotate for m in self.markups}}

    def mean_shape(self, markup: str = "wflw98", count: int = 500) -> np.ndarray:
        """Mean landmark positions (L, 2) over the first `count` faces: the trivial baseline."""
        count = min(count, self.n)
        pts = np.stack([derive_from_wflw98(self.raw(i)[1], markup) for i in range(count)])
        return pts.mean(axis=0)


def collate_faces(batch: Sequence[dict]) -> dict:
    """Batch samples that carry different markups.

    Returns {"image": (B, C, H, W), "landmarks": {markup: (B, L, 2)}, "valid": {markup: (B,) bool}} over
    the union of the samples' markups; a sample not annotated with a markup has zeros and valid False.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    images = torch.stack([s["image"] for s in batch])
    names: list[str] = []
    for s in batch:
        for name in list(s.get("mask", {})) + list(s["landmarks"]):
            if name not in names:
                names.append(name)
    landmarks, valid = {}, {}
    for name in names:
        n_points = get_markup(name).n_points
        pts = torch.zeros(len(batch), n_points, 2)
        ok = torch.zeros(len(batch), dtype=torch.bool)
        for i, s in enumerate(batch):
            if name in s["landmarks"] and s.get("mask", {}).get(name, True):
                pts[i] = torch.as_tensor(s["landmarks"][name], dtype=torch.float32)
                ok[i] = True
        landmarks[name], valid[name] = pts, ok
    out = {"image": images, "landmarks": landmarks, "valid": valid}
    return out
