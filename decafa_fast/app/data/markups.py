"""Landmark markups: the 98-point WFLW, 68-point 300W and 5-point CelebA layouts.

Every markup is described relative to image coordinates: "left" means the left side of the *image*
(the subject's right side). Index conventions:

WFLW (98): 0-32 contour from the image-left temple round the chin to the image-right temple;
  33-41 image-left brow (33 outer corner, 34-36 upper edge, 37 inner corner, 38-41 lower edge back to
  the outer end); 42-50 image-right brow (42 inner, 43-45 upper, 46 outer, 47-50 lower edge back to the
  inner end); 51-54 nose bridge, top to tip; 55-59 nose base, left to right; 60-67 image-left eye
  (60 outer corner, 61-63 upper lid, 64 inner corner, 65-67 lower lid back to the outer corner); 68-75
  image-right eye (68 inner corner, 69-71 upper lid, 72 outer corner, 73-75 lower lid back); 76-87 outer
  lip (76 left corner, 77-81 upper, 82 right corner, 83-87 lower, right to left); 88-95 inner lip (88
  left corner, 89-91 upper, 92 right corner, 93-95 lower, right to left); 96, 97 the pupils (left, right).

300W (68): 0-16 jaw, 17-21 / 22-26 brows, 27-30 nose bridge, 31-35 nose base, 36-41 image-left eye
  (36 outer corner), 42-47 image-right eye (45 outer corner), 48-59 outer lip, 60-67 inner lip.
  Derived from WFLW by the usual index map: every other contour point, the upper edge of each brow, the
  same nose points, 6 of the 8 points of each eye (corners and the two lid points next to them) and all
  20 lip points.

CelebA (5): image-left eye centre, image-right eye centre, nose tip, left mouth corner, right mouth
  corner. Derived from WFLW as the mean of the 8 lid points of each eye (60-67, 68-75), point 54 (nose
  tip) and points 76 / 82 (outer lip corners). `from_wflw98` gives the single-index approximation
  (the pupils 96 / 97 for the eyes); `derive_from_wflw98` computes the exact derivation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Markup", "MARKUPS", "derive_from_wflw98", "get_markup", "eye_centres"]


@dataclass(frozen=True)
class Markup:
    """One landmark layout.

    flip_permutation: point i of the horizontally mirrored face is point perm[i] of the original.
    normalisation: indices of the two points whose distance normalises the NME ("inter-ocular":
      the outer eye corners; for CelebA the eye centres).
    pupil_groups: two index groups whose means are the pupils / eye centres ("inter-pupil" NME).
    from_wflw98: for each point of this markup, the WFLW-98 index it comes from (None for WFLW itself).
    wflw98_groups: for each point, the WFLW-98 indices averaged to derive it (exact derivation).
    """

    name: str
    n_points: int
    flip_permutation: tuple[int, ...]
    normalisation: tuple[int, int]
    pupil_groups: tuple[tuple[int, ...], tuple[int, ...]]
    from_wflw98: tuple[int, ...] | None = None
    wflw98_groups: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        perm = self.flip_permutation
        if sorted(perm) != list(range(self.n_points)):
            raise ValueError(f"{self.name}: flip_permutation must be a permutation of 0..{self.n_points - 1}")
        if any(perm[perm[i]] != i for i in range(self.n_points)):
            raise ValueError(f"{self.name}: flip_permutation must be an involution")


def _mirror(pairs: list[tuple[int, int]], n: int) -> tuple[int, ...]:
    """A flip permutation from mirror pairs; points not listed map to themselves."""
    perm = list(range(n))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


def _wflw98_flip() -> tuple[int, ...]:
    pairs = [(i, 32 - i) for i in range(16)]  # contour
    pairs += list(zip(range(33, 38), range(46, 41, -1)))  # brow upper edges: 33<->46 ... 37<->42
    pairs += list(zip(range(38, 42), range(50, 46, -1)))  # brow lower edges: 38<->50 ... 41<->47
    pairs += [(55, 59), (56, 58)]  # nose base
    pairs += list(zip(range(60, 65), range(72, 67, -1)))  # eye corners + upper lids: 60<->72 ... 64<->68
    pairs += list(zip(range(65, 68), range(75, 72, -1)))  # lower lids: 65<->75, 66<->74, 67<->73
    pairs += [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86)]  # outer lip
    pairs += [(88, 92), (89, 91), (93, 95)]  # inner lip
    pairs += [(96, 97)]  # pupils
    return _mirror(pairs, 98)


def _w300_flip() -> tuple[int, ...]:
    pairs = [(i, 16 - i) for i in range(8)]  # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]  # brows
    pairs += [(31, 35), (32, 34)]  # nose base
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lip
    pairs += [(60, 64), (61, 63), (65, 67)]  # inner lip
    return _mirror(pairs, 68)


# 300W index i comes from WFLW index _W300_FROM_WFLW[i]
_W300_FROM_WFLW: tuple[int, ...] = (
    tuple(range(0, 33, 2))  # jaw: every other contour point (17)
    + tuple(range(33, 38))  # image-left brow, upper edge (5)
    + tuple(range(42, 47))  # image-right brow, upper edge (5)
    + tuple(range(51, 60))  # nose (9)
    + (60, 61, 63, 64, 65, 67)  # image-left eye (6)
    + (68, 69, 71, 72, 73, 75)  # image-right eye (6)
    + tuple(range(76, 96))  # lips (20)
)

_CELEBA_GROUPS: tuple[tuple[int, ...], ...] = (
    tuple(range(60, 68)),  # image-left eye centre: mean of its 8 lid points
    tuple(range(68, 76)),  # image-right eye centre
    (54,),  # nose tip
    (76,),  # left mouth corner
    (82,),  # right mouth corner
)

MARKUPS: dict[str, Markup] = {
    "wflw98": Markup(
        name="wflw98",
        n_points=98,
        flip_permutation=_wflw98_flip(),
        normalisation=(60, 72),
        pupil_groups=((96,), (97,)),
    ),
    "300w68": Markup(
        name="300w68",
        n_points=68,
        flip_permutation=_w300_flip(),
        normalisation=(36, 45),
        pupil_groups=(tuple(range(36, 42)), tuple(range(42, 48))),
        from_wflw98=_W300_FROM_WFLW,
        wflw98_groups=tuple((i,) for i in _W300_FROM_WFLW),
    ),
    "celeba5": Markup(
        name="celeba5",
        n_points=5,
        flip_permutation=(1, 0, 2, 4, 3),
        normalisation=(0, 1),
        pupil_groups=((0,), (1,)),
        from_wflw98=(96, 97, 54, 76, 82),
        wflw98_groups=_CELEBA_GROUPS,
    ),
}


def get_markup(name: str | Markup) -> Markup:
    """The Markup called `name` (a Markup is returned as is); ValueError for an unknown name."""
    if isinstance(name, Markup):
        return name
    if name not in MARKUPS:
        raise ValueError(f"unknown markup {name!r}; expected one of {sorted(MARKUPS)}")
    return MARKUPS[name]


def derive_from_wflw98(points98, markup: str | Markup):
    """Points of `markup` derived from WFLW-98 points.

    points98: (..., 98, 2) numpy array or tensor -> (..., L, 2) of the same type; each derived point is
    the mean of its `wflw98_groups` entry (the identity for "wflw98").
    """
    m = get_markup(markup)
    if points98.shape[-2:] != (98, 2):
        raise ValueError(f"points98 must have shape (..., 98, 2), got {tuple(points98.shape)}")
    if m.wflw98_groups is None:
        return points98.copy() if isinstance(points98, np.ndarray) else points98.clone()
    parts = [points98[..., list(group), :].mean(axis=-2) for group in m.wflw98_groups]
    if isinstance(points98, np.ndarray):
        return np.stack(parts, axis=-2)
    return torch.stack(parts, dim=-2)


def eye_centres(points, markup: str | Markup):
    """The two pupil / eye-centre points of `markup`: (..., L, 2) -> two arrays (..., 2)."""
    m = get_markup(markup)
    return tuple(points[..., list(group), :].mean(axis=-2) if isinstance(points, np.ndarray)
                 else points[..., list(group), :].mean(dim=-2) for group in m.pupil_groups)
