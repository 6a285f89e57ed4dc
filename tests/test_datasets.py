"""MVTec AD layout parsing on small generated folders, in-memory items and (if present) real data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly.datasets import labels_from_relpaths, load_mask, load_mvtec_category, mvtec_from_items
from anomaly.sources import InputItem

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_array(h: int = 8, w: int = 10) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[2:5, 3:7] = 255
    return mask


LAYOUT = {
    "train/good/000.png": np.full((8, 10, 3), 100, np.uint8),
    "train/good/001.png": np.full((8, 10, 3), 110, np.uint8),
    "test/good/000.png": np.full((8, 10, 3), 105, np.uint8),
    "test/crack/000.png": np.full((8, 10, 3), 20, np.uint8),
    "test/crack/001.png": np.full((8, 10, 3), 30, np.uint8),
    "test/spot/000.png": np.full((8, 10, 3), 200, np.uint8),
    "ground_truth/crack/000_mask.png": mask_array(),
    "ground_truth/spot/000_mask.png": mask_array(),
}


def write_layout(root: Path, files: dict[str, np.ndarray]) -> Path:
    for rel, array in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(array))
    return root


def memory_items(files: dict[str, np.ndarray], prefix: str = "") -> list[InputItem]:
    return [
        InputItem(path=f"upload.zip/{prefix}{rel}", relpath=f"{prefix}{rel}", source=None, data=png_bytes(a))
        for rel, a in files.items()
    ]


def test_folder_layout(tmp_path):
    category = load_mvtec_category(write_layout(tmp_path / "widget", LAYOUT))
    assert category.name == "widget"
    assert [i.relpath for i in category.train] == ["train/good/000.png", "train/good/001.png"]
    assert [(t.item.relpath, t.label, t.defect) for t in category.test] == [
        ("test/crack/000.png", 1, "crack"),
        ("test/crack/001.png", 1, "crack"),
        ("test/good/000.png", 0, "good"),
        ("test/spot/000.png", 1, "spot"),
    ]
    masks = {t.item.relpath: t.mask and t.mask.relpath for t in category.test}
    assert masks == {
        "test/crack/000.png": "ground_truth/crack/000_mask.png",
        "test/crack/001.png": None,  # missing mask: image-level evaluation only
        "test/good/000.png": None,
        "test/spot/000.png": "ground_truth/spot/000_mask.png",
    }
    assert all(i.source is not None and Path(i.source).is_file() for i in category.train)


@pytest.mark.parametrize("prefix", ["", "widget/"])
def test_items_layout_with_or_without_top_folder(prefix):
    items = memory_items(LAYOUT, prefix)
    stray = f"{prefix}notes/x.png"  # outside the layout: ignored
    items.append(InputItem(path=f"upload.zip/{stray}", relpath=stray, source=None, data=b""))
    category = mvtec_from_items(items, "upload.zip")
    assert category.name == "upload.zip"
    assert len(category.train) == 2
    assert [(t.defect, t.label, t.mask is not None) for t in category.test] == [
        ("crack", 1, True), ("crack", 1, False), ("good", 0, False), ("spot", 1, True)
    ]
    crack = category.test[0]
    assert crack.mask.relpath == f"{prefix}ground_truth/crack/000_mask.png"
    assert load_mask(crack.mask, (8, 10)).sum() == 12


def test_layout_errors_name_the_folder(tmp_path):
    loose = write_layout(tmp_path / "loose", {"a.png": np.zeros((4, 4), np.uint8)})
    with pytest.raises(ValueError, match=r"loose: no train/ or test/ folder \(expected the MVTec AD layout"):
        load_mvtec_category(loose)
    no_test = write_layout(tmp_path / "no_test", {"train/good/a.png": np.zeros((4, 4), np.uint8)})
    with pytest.raises(ValueError, match="no_test: no test images in test/<good|defect>"):
        load_mvtec_category(no_test)
    no_train = write_layout(tmp_path / "no_train", {"test/good/a.png": np.zeros((4, 4), np.uint8)})
    with pytest.raises(ValueError, match="no_train: no training images in train/good"):
        load_mvtec_category(no_train)
    with pytest.raises(ValueError, match="missing: not a folder"):
        load_mvtec_category(tmp_path / "missing")
    two_tops = memory_items({"a/x.png": np.zeros((4, 4), np.uint8), "b/y.png": np.zeros((4, 4), np.uint8)})
    with pytest.raises(ValueError, match=r"up.zip: several top-level folders \(a, b\)"):
        mvtec_from_items(two_tops, "up.zip")


def test_labels_from_relpaths():
    items = [InputItem(path=r, relpath=r, source=None) for r in
             ["test/good/a.png", "x/GOOD/b.png", "test/crack/c.png", "defect/d.png", "loose.png"]]
    assert labels_from_relpaths(items) == [0, 0, 1, 1, None]


def test_load_mask_threshold_resize_and_missing():
    values = np.array([[0, 127, 128, 255]], np.uint8)
    item = InputItem(path="m.png", relpath="m.png", source=None, data=png_bytes(values))
    assert load_mask(item, (1, 4)).tolist() == [[False, False, True, True]]
    assert load_mask(None, (3, 5)).shape == (3, 5) and not load_mask(None, (3, 5)).any()

    small = np.zeros((4, 4), np.uint8)
    small[:2, 2:] = 255  # top-right quadrant
    resized = load_mask(InputItem("s.png", "s.png", None, png_bytes(small)), (8, 12))
    expected = np.zeros((8, 12), bool)
    expected[:4, 6:] = True
    assert resized.dtype == bool and np.array_equal(resized, expected)

    sixteen = Image.fromarray(np.array([[0, 30000, 40000]], np.uint16))
    buffer = io.BytesIO()
    sixteen.save(buffer, format="PNG")
    assert load_mask(InputItem("w.png", "w.png", None, buffer.getvalue()), (1, 3)).tolist() == [[False, False, True]]


def test_load_mask_unreadable_names_the_file():
    item = InputItem(path="gt/bad_mask.png", relpath="bad_mask.png", source=None, data=b"not a png")
    with pytest.raises(ValueError, match="^gt/bad_mask.png: "):
        load_mask(item, (2, 2))


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared datasets not available")
def test_real_magnetic_tile_and_bottle():
    tile = load_mvtec_category(SHARED / "magnetic_tile")
    assert (tile.name, len(tile.train), len(tile.test)) == ("magnetic_tile", 761, 583)
    defects = [t for t in tile.test if t.label == 1]
    assert len(defects) == 392 and all(t.mask is not None for t in defects)
    assert {t.defect for t in defects} == {"blowhole", "break", "crack", "fray", "uneven"}
    sample = defects[0]
    image = np.asarray(Image.open(sample.item.source))
    assert load_mask(sample.mask, image.shape[:2]).any()

    bottle = load_mvtec_category(SHARED / "mvtec_bottle_448")
    assert len(bottle.train) == 209 and len(bottle.test) == 83
    assert sum(t.label for t in bottle.test) == 63 and all(t.mask is None for t in bottle.test)


def test_test_set_alone_keeps_its_masks():
    from anomaly.datasets import mvtec_from_items
    from anomaly.sources import InputItem

    def item(rel):
        return InputItem(path=rel, relpath=rel, source=None, data=b"x")

    items = [item("cat/test/good/0.png"), item("cat/test/crack/1.png"), item("cat/ground_truth/crack/1_mask.png")]
    with pytest.raises(ValueError, match="no training images"):
        mvtec_from_items(items, "upload.zip")
    category = mvtec_from_items(items, "upload.zip", require_train=False)
    assert category.train == [] and [t.label for t in category.test] == [1, 0]
    assert category.test[0].mask.relpath == "cat/ground_truth/crack/1_mask.png"
