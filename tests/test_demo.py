"""The synthetic demo dataset: deterministic bytes, MVTec layout, visible defects, varied normals."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anomaly.datasets import load_mask, load_mvtec_category
from anomaly.demo import DEFECTS, make_demo_dataset

SMALL = dict(n_train=3, n_test_good=2, n_test_defect=4, size=64)


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "default")


def test_same_bytes_for_same_seed(tmp_path):
    first = digests(make_demo_dataset(tmp_path / "a", **SMALL))
    assert first == digests(make_demo_dataset(tmp_path / "b", **SMALL))
    other = digests(make_demo_dataset(tmp_path / "c", **SMALL, seed=1))
    assert first.keys() == other.keys() and first["train/good/000.png"] != other["train/good/000.png"]


def test_layout_counts_and_masks(default_set):
    category = load_mvtec_category(default_set)
    assert len(category.train) == 40 and len(category.test) == 24
    defective = [t for t in category.test if t.label == 1]
    assert sorted({t.defect for t in defective}) == sorted(DEFECTS)
    assert [sum(t.defect == d for t in defective) for d in DEFECTS] == [6, 5, 5]
    for entry in defective:
        mask = load_mask(entry.mask, (256, 256))
        assert 10 < mask.sum() < 0.05 * mask.size, entry.item.relpath


def test_defects_are_visible_but_not_saturated(default_set):
    for defect in DEFECTS:
        for image_path in sorted((default_set / "test" / defect).glob("*.png")):
            image = gray(image_path)
            mask = gray(default_set / "ground_truth" / defect / f"{image_path.stem}_mask.png") > 127
            ring = ndimage.binary_dilation(mask, iterations=5) & ~ndimage.binary_dilation(mask, iterations=2)
            contrast = abs(image[mask].mean() - image[ring].mean())
            assert contrast > 3 * image[ring].std(), image_path  # stands out of its surroundings
            assert np.mean((image == 0) | (image == 255)) < 1e-3, image_path


def test_normals_vary(default_set):
    normals = [gray(p) for p in sorted((default_set / "train" / "good").glob("*.png"))[:10]]
    differences = [np.abs(a - b).mean() for i, a in enumerate(normals) for b in normals[i + 1:]]
    assert min(differences) > 5  # grey levels out of 255: no near-duplicates
    assert np.std([n.mean() for n in normals]) > 1  # lighting changes from image to image


def test_default_root_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = make_demo_dataset(**SMALL, seed=5)
    assert root.parent == tmp_path and "seed5" in root.name
    stamp = (root / "train" / "good" / "000.png").stat().st_mtime_ns
    assert make_demo_dataset(**SMALL, seed=5) == root
    assert (root / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no staging folder left behind


def test_refuses_foreign_folders_and_bad_sizes(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="mine: exists and is not this demo dataset"):
        make_demo_dataset(tmp_path / "mine", **SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_demo_dataset(empty, **SMALL) == empty and (empty / "train" / "good").is_dir()
    with pytest.raises(ValueError, match="size >= 64"):
        make_demo_dataset(tmp_path / "tiny", size=16)
