"""Synthetic faces, markups, flips and collation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from decafa_fast.app.data import MARKUPS, SyntheticFaces, collate_faces, derive_from_wflw98, generate_face
from decafa_fast.app.data.transforms import hflip, hflip_batch, hflip_points


def test_deterministic_by_seed_and_index():
    a, b = SyntheticFaces(3, size=40, seed=5), SyntheticFaces(3, size=40, seed=5, cache=False)
    for i in (2, 0, 1):  # order of access does not matter
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"])
        for name in sa["landmarks"]:
            assert torch.equal(sa["landmarks"][name], sb["landmarks"][name])
    c = SyntheticFaces(3, size=40, seed=6)
    assert not torch.equal(a[0]["image"], c[0]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])


@pytest.mark.parametrize("size", [24, 64, 97])
def test_landmarks_inside_image_and_format(size):
    ds = SyntheticFaces(12, size=size, seed=1)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (1, size, size) and s["image"].dtype == torch.float32
        assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
        for name, n in (("wflw98", 98), ("300w68", 68), ("celeba5", 5)):
            pts = s["landmarks"][name]
            assert pts.shape == (n, 2) and pts.dtype == torch.float32
            assert float(pts.min()) >= 0.0 and float(pts.max()) <= size - 1
        assert s["mask"] == {"wflw98": True, "300w68": True, "celeba5": True}


def test_drawing_matches_landmarks():
    """Pupils are dark, cheeks/nose bridge are skin: sample the image at the landmark positions."""
    hits = 0
    for i in range(20):
        img, pts = generate_face(128, np.random.default_rng([7, i]), difficulty=0.0)
        value = lambda k: int(img[int(round(pts[k, 1])), int(round(pts[k, 0]))])  # noqa: E731
        hits += value(96) < 90 and value(97) < 90 and value(52) > value(96) + 40
    assert hits >= 18


def test_face_geometry_is_face_like():
    for i in range(10):
        _, p = generate_face(64, np.random.default_rng([3, i]), difficulty=0.3)
        # image-left eye left of the image-right eye; brows above eyes; mouth below the nose tip
        assert p[60:68, 0].mean() < p[68:76, 0].mean()
        assert p[33:42, 1].mean() < p[60:68, 1].mean()
        assert p[76:96, 1].mean() > p[54, 1]
        assert p[16, 1] > p[79, 1]  # chin below the upper lip


def test_derived_markups():
    pts98 = np.random.default_rng(0).normal(size=(98, 2))
    p68 = derive_from_wflw98(pts98, "300w68")
    np.testing.assert_array_equal(p68, pts98[list(MARKUPS["300w68"].from_wflw98)])
    np.testing.assert_array_equal(p68[0], pts98[0])
    np.testing.assert_array_equal(p68[36], pts98[60])
    np.testing.assert_array_equal(p68[45], pts98[72])
    p5 = derive_from_wflw98(torch.tensor(pts98), "celeba5")
    torch.testing.assert_close(p5[0], torch.tensor(pts98[60:68].mean(0)))
    torch.testing.assert_close(p5[2], torch.tensor(pts98[54]))
    with pytest.raises(ValueError):
        derive_from_wflw98(np.zeros((68, 2)), "celeba5")


def test_flip_permutations_are_consistent():
    for m in MARKUPS.values():
        perm = m.flip_permutation
        assert sorted(perm) == list(range(m.n_points)) and all(perm[perm[i]] == i for i in range(m.n_points))
    # 300W's flip is the WFLW flip seen through the index map
    m98, m68 = MARKUPS["wflw98"], MARKUPS["300w68"]
    inverse = {w: i for i, w in enumerate(m68.from_wflw98)}
    assert all(inverse[m98.flip_permutation[w]] == m68.flip_permutation[i] for i, w in enumerate(m68.from_wflw98))
    assert m98.flip_permutation[60] == 72 and m68.flip_permutation[36] == 45 and m98.flip_permutation[96] == 97


def test_flip_keeps_semantics():
    ds = SyntheticFaces(4, size=48, seed=2)
    for i in range(4):
        s = ds[i]
        image, lm = hflip(s["image"], s["landmarks"])
        assert torch.equal(image, s["image"].flip(-1))
        for name, pts in lm.items():
            a, b = MARKUPS[name].normalisation
            assert pts[a, 0] < pts[b, 0]  # the image-left eye stays on the left after mirroring
            back = hflip_points(pts, 48, name)
            torch.testing.assert_close(back, s["landmarks"][name])
        # flipping the points equals re-deriving from flipped 98 points
        torch.testing.assert_close(lm["300w68"], derive_from_wflw98(lm["wflw98"], "300w68"))
        torch.testing.assert_close(lm["celeba5"], derive_from_wflw98(lm["wflw98"], "celeba5"))


def test_collate_mixed_markups_and_batch_flip():
    a = SyntheticFaces(2, size=32, seed=0, annotate="wflw98")
    b = SyntheticFaces(2, size=32, seed=1, annotate=("celeba5",))
    batch = collate_faces([a[0], b[0], a[1]])
    assert batch["image"].shape == (3, 1, 32, 32)
    assert batch["landmarks"]["wflw98"].shape == (3, 98, 2)
    assert batch["valid"]["wflw98"].tolist() == [True, False, True]
    assert batch["valid"]["celeba5"].tolist() == [False, True, False]
    assert batch["valid"]["300w68"].tolist() == [False, False, False]
    assert torch.all(batch["landmarks"]["wflw98"][1] == 0)
    flags = torch.tensor([True, False, False])
    images, lm = hflip_batch(batch["image"], batch["landmarks"], flags)
    assert torch.equal(images[0], batch["image"][0].flip(-1)) and torch.equal(images[1], batch["image"][1])
    torch.testing.assert_close(lm["wflw98"][0], hflip_points(batch["landmarks"]["wflw98"][0], 32, "wflw98"))
    with pytest.raises(ValueError):
        collate_faces([])


def test_bad_arguments():
    with pytest.raises(ValueError):
        SyntheticFaces(2, annotate="300w68", markups=("wflw98",))
    with pytest.raises(ValueError):
        SyntheticFaces(2, markups=("nope",))
    with pytest.raises(IndexError):
        SyntheticFaces(2, size=32)[5]
    with pytest.raises(ValueError):
        generate_face(4, np.random.default_rng(0))


# Proportions of a real frontal face, from the 68-point mean shape that OpenFace and dlib-based head-pose
# code use (its x, y projected frontally), as fractions of the landmarks' box (width W, height H):
REAL_68 = {
    "aspect": 0.966,  # H / W: about square
    "eye_corners": 0.630,  # distance of the outer eye corners (36, 45) / W
    "eyes_y": 0.179,  # height of the outer eye corners below the box top / H
    "nose_tip_y": 0.389,  # point 30
    "mouth_y": 0.652,  # mouth corners 48, 54
    "mouth_width": 0.399,  # / W
    "brows_y": 0.035,  # mean of the brow points 17-26
}


def proportions(p: np.ndarray) -> dict[str, float]:
    lo, hi = p.min(0), p.max(0)
    w, h = hi - lo
    rel_y = (p[:, 1] - lo[1]) / h
    return {"aspect": h / w, "eye_corners": np.linalg.norm(p[36] - p[45]) / w,
            "eyes_y": (rel_y[36] + rel_y[45]) / 2, "nose_tip_y": rel_y[30], "mouth_y": (rel_y[48] + rel_y[54]) / 2,
            "mouth_width": np.linalg.norm(p[48] - p[54]) / w, "brows_y": rel_y[17:27].mean()}


def test_frontal_faces_have_real_proportions():
    """Upright faces (difficulty 0): every proportion's median within 0.05 of the real mean face's
    (0.08 for the aspect), where the old generator's faces were flat (aspect 0.77) with the nose and
    mouth too low (0.56 and 0.84)."""
    shapes = [derive_from_wflw98(generate_face(64, np.random.default_rng([11, i]), 0.0)[1].astype(np.float64),
                                 "300w68") for i in range(100)]
    measured = {k: float(np.median([proportions(p)[k] for p in shapes])) for k in REAL_68}
    for key, real in REAL_68.items():
        assert abs(measured[key] - real) <= (0.08 if key == "aspect" else 0.05), (key, measured[key], real)


def test_faces_fill_the_image_like_a_25_percent_margin_crop_and_turn_up_to_profile():
    sides, aspects = [], []
    for i in range(200):
        _, p98 = generate_face(32, np.random.default_rng([12, i]))
        p = derive_from_wflw98(p98.astype(np.float64), "300w68")
        extent = p.max(0) - p.min(0)
        sides.append(extent.max() / 32)
        aspects.append(extent[1] / extent[0])
    sides = np.array(sides)
    assert abs(np.median(sides) - 0.8) < 0.03 and sides.min() > 0.7 and sides.max() < 0.9
    # a face turned towards profile is narrow: a few are 1.3 times taller than wide or more, most near square
    aspects = np.array(aspects)
    assert 0.01 < np.mean(aspects > 1.3) < 0.15 and 0.9 < np.median(aspects) < 1.15 and aspects.max() > 1.4


def test_generation_is_fast():
    import time

    rng = np.random.default_rng(0)
    start = time.process_time()  # CPU time: what other jobs on a shared machine take does not count
    for _ in range(50):
        generate_face(64, rng)
    assert (time.process_time() - start) / 50 < 0.02  # seconds of CPU per face (about 1 ms measured)
