"""Read the MVTec AD folder layout from disk or from in-memory items (zip uploads).

    <category>/train/good/*                              normal images to fit on
    <category>/test/good/*, <category>/test/<defect>/*   labelled test images
    <category>/ground_truth/<defect>/<stem>_mask.png     optional pixel masks (nonzero = defect)

Defective test images without a mask get `mask=None`: such a category can only be evaluated
at image level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from PIL import Image

from .imageio import load_image, printable
from .sources import InputItem, collect_inputs

GOOD = "good"
_LAYOUT = "expected the MVTec AD layout train/good/*, test/<good|defect>/*, ground_truth/<defect>/<stem>_mask.png"
_SECTIONS = ("train", "test", "ground_truth")


@dataclass(frozen=True)
class LabelledItem:
    item: InputItem
    label: int  # 0 normal, 1 anomalous
    defect: str  # test sub-folder name: "good" or the defect type
    mask: InputItem | None  # ground-truth mask; None for good images and defects without one


@dataclass
class MVTecCategory:
    name: str
    train: list[InputItem]
    test: list[LabelledItem]


def load_mvtec_category(root: str | Path) -> MVTecCategory:
    """A category folder on disk; ValueError naming the folder when it does not follow the layout."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{printable(root)}: not a folder")
    return _parse(collect_inputs([root]).items, root.resolve().name, str(root))


def mvtec_from_items(items: list[InputItem], name: str, require_train: bool = True) -> MVTecCategory:
    """The same layout from items' relpaths, directly or under one top-level folder (a zipped category).

    ``require_train=False`` accepts a test set alone (test/ and ground_truth/), for scoring.
    """
    return _parse(items, name, name, require_train)


def labels_from_relpaths(items: Sequence[InputItem]) -> list[int | None]:
    """0 for images in a folder named "good", 1 for any other folder, None for loose files."""
    labels: list[int | None] = []
    for item in items:
        parts = PurePosixPath(item.relpath).parts
        labels.append(None if len(parts) < 2 else int(not _is_good(parts[-2])))
    return labels


def load_mask(item: InputItem | None, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask: pixels above half intensity (> 127 in 8-bit) in any channel.

    A mask of another size is resized with nearest neighbour to `shape`; no mask means no
    defect pixels. Unreadable masks raise ImageLoadError (one line, naming the file).
    """
    height, width = shape
    if item is None:
        return np.zeros((height, width), dtype=bool)
    mask = load_image(item.read_bytes(), item.path).max(axis=2) > 0.5
    if mask.shape != (height, width):
        resized = Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST)
        mask = np.asarray(resized, dtype=bool)
    return mask


def _parse(items: Sequence[InputItem], name: str, where: str, require_train: bool = True) -> MVTecCategory:
    parts_of = _layout_parts(items, where)
    train: list[InputItem] = []
    tests: list[tuple[InputItem, str]] = []
    masks: dict[tuple[str, str], InputItem] = {}
    for item in items:
        parts = parts_of.get(item.relpath)
        if parts is None or len(parts) != 3:
            continue
        section, folder, filename = parts
        if section == "train" and _is_good(folder):
            train.append(item)
        elif section == "test":
            tests.append((item, folder))
        elif section == "ground_truth" and (stem := PurePosixPath(filename).stem).endswith("_mask"):
            masks.setdefault((folder, stem.removesuffix("_mask")), item)
    if not train and require_train:
        raise ValueError(f"{printable(where)}: no training images in train/good ({_LAYOUT})")
    if not tests:
        raise ValueError(f"{printable(where)}: no test images in test/<good|defect> ({_LAYOUT})")
    test = [
        LabelledItem(
            item=item,
            label=int(not _is_good(defect)),
            defect=defect,
            mask=None if _is_good(defect) else masks.get((defect, PurePosixPath(item.relpath).stem)),
        )
        for item, defect in tests
    ]
    return MVTecCategory(name, sorted(train, key=lambda i: i.relpath), sorted(test, key=lambda t: t.item.relpath))


def _layout_parts(items: Sequence[InputItem], where: str) -> dict[str, tuple[str, ...]]:
    """relpath -> parts below the category folder, which is the root or one shared top-level folder."""
    all_parts = {item.relpath: PurePosixPath(item.relpath).parts for item in items}
    if any(parts and parts[0] in _SECTIONS for parts in all_parts.values()):
        return all_parts
    tops = {parts[0] for parts in all_parts.values() if len(parts) > 1}
    if len(tops) == 1:
        return {rel: parts[1:] for rel, parts in all_parts.items()}
    if len(tops) > 1:
        raise ValueError(
            f"{printable(where)}: several top-level folders ({', '.join(sorted(map(printable, tops))[:5])}) "
            f"and no train/test folder; {_LAYOUT}"
        )
    raise ValueError(f"{printable(where)}: no train/ or test/ folder ({_LAYOUT})")


def _is_good(folder: str) -> bool:
    return folder.lower() == GOOD
