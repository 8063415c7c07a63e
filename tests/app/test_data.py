"""Real-data readers (300W, WFLW, CelebA, folder), face crops and the KIND:PATH spec, on fixtures written here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from decafa_fast.app.data import MARKUPS, SyntheticFaces, celeba, collate_faces, crop, folder, real, w300, wflw

IMAGE_SIZE = (96, 80)  # (H, W) of the fixture images


def face_points(n: int, seed: int, h: int = IMAGE_SIZE[0], w: int = IMAGE_SIZE[1]) -> np.ndarray:
    """n points spread over the middle of an h x w image, 0-based."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0.25 * w, 0.75 * w, n), rng.uniform(0.25 * h, 0.8 * h, n)], axis=1)


def write_image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8))
    return path


# A real-style 300W file: two spaces after "n_points:", CRLF line ends, 3-decimal coordinates, 1-based.
def real_style_pts(points0: np.ndarray) -> str:
    body = "".join(f"{x + 1:.3f} {y + 1:.3f}\r\n" for x, y in points0)
    return "version: 1\r\nn_points:  68\r\n{\r\n" + body + "}\r\n"


def make_300w(root: Path) -> dict[str, np.ndarray]:
    """One face in each of the six 300W folders; returns folder -> 0-based points."""
    truth = {}
    for i, sub in enumerate(["lfpw/trainset", "lfpw/testset", "helen/trainset", "helen/testset", "AFW", "ibug"]):
        d = root / sub
        write_image(d / f"img{i}.jpg" if i % 2 else d / f"img{i}.png", seed=i)
        points = face_points(68, i)
        (d / f"img{i}.pts").write_text(real_style_pts(points), newline="")
        truth[sub.lower()] = points
    return truth


# ------------------------------------------------------------------------------------------------------
# 300W
# ------------------------------------------------------------------------------------------------------
def test_parse_real_style_pts(tmp_path):
    points = face_points(68, 0)
    path = tmp_path / "a.pts"
    path.write_text(real_style_pts(points), newline="")
    np.testing.assert_allclose(w300.parse_pts(path), np.round(points + 1, 3), atol=1e-9)


def test_300w_splits_and_zero_based(tmp_path):
    truth = make_300w(tmp_path)
    sizes = {s: len(w300.read_300w(tmp_path, s)) for s in ("train", "common", "challenging", "full", "test")}
    assert sizes == {"train": 3, "common": 2, "challenging": 1, "full": 3, "test": 3}
    (ibug,) = w300.read_300w(tmp_path, "challenging")
    assert ibug.markup == "300w68" and ibug.image.name == "img5.jpg"
    np.testing.assert_allclose(ibug.landmarks, truth["ibug"], atol=1e-3)  # 1-based file -> 0-based
    assert set(w300.read_300w_subsets(tmp_path)) == {"common", "challenging", "full"}


@pytest.mark.parametrize(
    "text, line",
    [
        ("version: 1\nn_points: 68\n{\n1 2\n", 4),  # file ends after the first point
        ("version: 1\nnpoints: 68\n{\n", 2),  # bad header key
        ("version: 1\nn_points: 3\n{\n1 2\n3 x\n5 6\n}\n", 5),  # not a number
        ("version: 1\nn_points: 3\n{\n1 2\n3 4 5\n5 6\n}\n", 5),  # three fields
        ("version: 1\nn_points: 3\n{\n1 2\n}\n", 5),  # too few points
        ("version: 1\nn_points: 2\n1 2\n3 4\n", 3),  # no "{"
        ("version: 1\nn_points: 2\n{\n1 2\n3 4\n5 6\n}\n", 6),  # too many points
    ],
)
def test_malformed_pts_names_file_and_line(tmp_path, text, line):
    path = tmp_path / "bad.pts"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}:")):
        w300.parse_pts(path)


def test_300w_missing_image_and_folder_are_reported(tmp_path):
    make_300w(tmp_path)
    (tmp_path / "ibug" / "img5.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="img5"):
        w300.read_300w(tmp_path, "challenging")
    with pytest.raises(FileNotFoundError, match="lfpw/testset"):
        w300.read_300w(tmp_path / "lfpw", "common")


# ------------------------------------------------------------------------------------------------------
# WFLW
# ------------------------------------------------------------------------------------------------------
def make_wflw(root: Path) -> list[np.ndarray]:
    attrs = [(), ("pose", "blur"), ("occlusion",)]
    lines, truth = [], []
    for i, a in enumerate(attrs):
        rel = f"0--Parade/img_{i}.jpg"
        write_image(root / "WFLW_images" / rel, seed=i)
        p = face_points(98, 10 + i)
        truth.append(p)
        box = [p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()]
        lines.append(wflw.format_wflw_line(p, box, a, rel))
    ann = root / "WFLW_annotations" / "list_98pt_rect_attr_train_test"
    ann.mkdir(parents=True)
    (ann / "list_98pt_rect_attr_test.txt").write_text("\n".join(lines) + "\n")
    (ann / "list_98pt_rect_attr_train.txt").write_text(lines[0] + "\n")
    return truth


def test_wflw_reader_and_subsets(tmp_path):
    truth = make_wflw(tmp_path)
    test = wflw.read_wflw(tmp_path, "test")
    assert len(test) == 3 and len(wflw.read_wflw(tmp_path, "train")) == 1
    np.testing.assert_allclose(test[1].landmarks, truth[1], atol=1e-5)
    assert test[1].attributes == ("pose", "blur") and test[1].box.shape == (4,)
    subsets = wflw.read_wflw_subsets(tmp_path)
    assert {k: len(v) for k, v in subsets.items()} == {
        "test": 3, "pose": 1, "expression": 0, "illumination": 0, "make-up": 0, "occlusion": 1, "blur": 1}


def test_wflw_malformed_line_and_missing_image(tmp_path):
    make_wflw(tmp_path)
    path = next(tmp_path.rglob("list_98pt_rect_attr_test.txt"))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace(" 0--Parade", " 2 0--Parade", 1).split(" ", 1)[1]]))
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:")):
        wflw.read_wflw(tmp_path, "test")
    bad_flag = lines[2].split()
    bad_flag[-2] = "7"
    path.write_text("\n".join([lines[0], " ".join(bad_flag)]))
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:") + ".*flags"):
        wflw.read_wflw(tmp_path, "test")
    path.write_text(lines[0])
    (tmp_path / "WFLW_images" / "0--Parade" / "img_0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="img_0.jpg"):
        wflw.read_wflw(tmp_path, "test")


# ------------------------------------------------------------------------------------------------------
# CelebA
# ------------------------------------------------------------------------------------------------------
def make_celeba(root: Path) -> dict[str, np.ndarray]:
    (root / "Anno").mkdir(parents=True)
    points = {f"{i:06d}.jpg": np.round(face_points(5, 20 + i)) for i in range(1, 6)}
    for i, name in enumerate(points):
        write_image(root / "Img" / "img_align_celeba" / name, seed=i)
    celeba.write_celeba_files(root / "Anno", points, {n: [0, 0, 1, 2, 2][i] for i, n in enumerate(points)})
    return points


def test_celeba_reader_splits(tmp_path):
    truth = make_celeba(tmp_path)
    sizes = {s: len(celeba.read_celeba(tmp_path, s)) for s in ("train", "val", "test", "all")}
    assert sizes == {"train": 2, "val": 1, "test": 2, "all": 5}
    first = celeba.read_celeba(tmp_path, "test")[0]
    assert first.markup == "celeba5" and first.image.name == "000004.jpg"
    np.testing.assert_allclose(first.landmarks, truth["000004.jpg"])


def test_celeba_malformed(tmp_path):
    make_celeba(tmp_path)
    path = tmp_path / "Anno" / "list_landmarks_align_celeba.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0]  # one number short
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=re.escape(f"{path}:5:")):
        celeba.read_celeba(tmp_path, "train")
    path.write_text("\n".join(["9"] + path.read_text().splitlines()[1:4]))
    with pytest.raises(ValueError, match=re.escape(f"{path}:1:") + ".*9 images"):
        celeba.read_celeba(tmp_path, "all")


# ------------------------------------------------------------------------------------------------------
# Folder
# ------------------------------------------------------------------------------------------------------
def test_folder_reader_pts_and_json(tmp_path):
    p68, p5 = face_points(68, 30), face_points(5, 31)
    write_image(tmp_path / "a.png")
    (tmp_path / "a.pts").write_text(real_style_pts(p68), newline="")
    write_image(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"landmarks": p5.tolist(), "box": [1, 2, 30, 40]}))
    write_image(tmp_path / "c.jpg")  # an image without annotation is fine (not a face record)
    records = folder.read_annotated_folder(tmp_path)
    assert [(r.image.name, r.markup) for r in records] == [("a.png", "300w68"), ("b.jpg", "celeba5")]
    np.testing.assert_allclose(records[0].landmarks, p68, atol=1e-3)
    np.testing.assert_allclose(records[1].landmarks, p5)
    assert [p.name for p in folder.list_images(tmp_path)] == ["a.png", "c.jpg", "b.jpg"]


def test_folder_reader_errors(tmp_path):
    (tmp_path / "x.json").write_text('{"landmarks": [[1, 2],\n  [3, ]]}')
    write_image(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'x.json'}:2:")):
        folder.read_annotated_folder(tmp_path)
    (tmp_path / "x.json").write_text(json.dumps([[1, 2]] * 7))
    with pytest.raises(ValueError, match="7 points match no markup"):
        folder.read_annotated_folder(tmp_path)
    (tmp_path / "x.json").write_text(json.dumps([[1, 2]] * 5))
    (tmp_path / "x.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="x"):
        folder.read_annotated_folder(tmp_path)


# ------------------------------------------------------------------------------------------------------
# Crops
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [128, 64])
def test_crop_round_trip(size):
    points = face_points(68, 40) * 7.3 + 100.0  # a large image
    c = crop.crop_from_landmarks(points, "300w68", size)
    inside = c.to_crop(points)
    assert inside.min() >= 0 and inside.max() <= size - 1  # the margin keeps every point in the crop
    np.testing.assert_allclose(c.to_image(inside), points, atol=1e-4)
    # the landmarks' box centre is the crop centre, and the box fills 1/1.25 of the crop
    box = crop.landmarks_box(points)
    np.testing.assert_allclose(c.to_crop((box[:2] + box[2:]) / 2), [(size - 1) / 2] * 2, atol=1e-9)
    np.testing.assert_allclose(c.matrix[0, 0] * max(box[2] - box[0], box[3] - box[1]), size / 1.25)


def test_crop_warp_moves_pixels_with_the_points():
    image = np.zeros((200, 300), np.uint8)
    image[120, 210] = 255  # a dot at x = 210, y = 120
    c = crop.crop_from_box((150, 60, 250, 180), size=64, scale=1.0)
    patch = c.warp(cv2.GaussianBlur(image, (0, 0), 3).astype(np.float32))
    peak = np.unravel_index(np.argmax(patch), patch.shape)[::-1]  # (x, y)
    np.testing.assert_allclose(peak, c.to_crop(np.array([210.0, 120.0])), atol=0.6)


def test_crop_whole_image_and_bad_boxes():
    c = crop.crop_whole_image(50, 100, size=32)
    np.testing.assert_allclose(c.to_crop(np.array([[-0.5, 24.5], [99.5, 24.5]])), [[-0.5, 15.5], [31.5, 15.5]])
    with pytest.raises(ValueError, match="x1 > x0"):
        crop.crop_from_box((10, 10, 5, 20))
    with pytest.raises(ValueError, match="4 finite"):
        crop.crop_from_box((1, 2, 3))


def test_face_dataset_item_maps_back_to_the_image(tmp_path):
    truth = make_300w(tmp_path)
    ds = real.FaceDataset(w300.read_300w(tmp_path, "challenging"), size=64)
    item = ds[0]
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert set(item["landmarks"]) == {"300w68"} and item["landmarks"]["300w68"].shape == (68, 2)
    back = crop.apply_affine(cv2.invertAffineTransform(item["crop"].numpy()),
                             item["landmarks"]["300w68"].double().numpy())
    np.testing.assert_allclose(back, truth["ibug"], atol=1e-3)
    # a mixed data set marks the other markups unannotated, and batches with synthetic faces
    mixed = real.FaceDataset(ds.records, size=64, markups=("wflw98", "300w68", "celeba5"))[0]
    assert mixed["mask"] == {"wflw98": False, "300w68": True, "celeba5": False}
    batch = collate_faces([mixed, SyntheticFaces(1, size=64)[0]])
    assert batch["valid"]["300w68"].tolist() == [True, True] and batch["valid"]["wflw98"].tolist() == [False, True]


def test_augmented_items_stay_consistent(tmp_path):
    """Jittered (and maybe flipped) crops: the crop matrix still maps the landmarks onto the item's points."""
    truth = make_300w(tmp_path)
    ds = real.FaceDataset(w300.read_300w(tmp_path, "challenging"), size=64, augment=True, seed=3)
    for _ in range(4):
        item = ds[0]
        points = item["landmarks"]["300w68"].double().numpy()
        expected = crop.apply_affine(item["crop"].numpy(), truth["ibug"])
        flipped = np.stack([63 - expected[:, 0], expected[:, 1]], 1)[list(MARKUPS["300w68"].flip_permutation)]
        assert np.allclose(points, expected, atol=1e-3) or np.allclose(points, flipped, atol=1e-3)


def test_data_specs(tmp_path):
    make_300w(tmp_path)
    assert real.parse_data_spec("300W:/x/y") == ("300w", "/x/y")
    assert len(real.read_records(f"300w:{tmp_path}", "train")) == 3
    assert set(real.read_eval_subsets(f"300w:{tmp_path}")) == {"common", "challenging", "full"}
    for bad in ["300w", "nope:/x", "synthetic:many", "synthetic:0", "wflw:"]:
        with pytest.raises(ValueError, match="spec"):
            real.parse_data_spec(bad)
