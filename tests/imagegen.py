"""Small generated images and dataset locations shared by the tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def requires_dataset(name: str):
    """Skip cleanly when ../shared/datasets/<name> is absent (a user's clone does not have it)."""
    return pytest.mark.skipif(not (DATASETS / name).is_dir(), reason=f"{DATASETS / name} is not available")


def texture(seed: int, size: int = 64, defect: bool = False) -> np.ndarray:
    """A smooth random RGB texture (uint8), optionally with a bright square defect."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.2 * np.sin(2 * np.pi * (4 * x + rng.uniform())) * np.cos(2 * np.pi * (3 * y + rng.uniform()))
    image = np.stack([base * c for c in (1.0, 0.9, 0.8)], axis=-1) + rng.normal(0, 0.03, (size, size, 3))
    if defect:
        image[size // 3 : size // 2, size // 3 : size // 2] = 1.0
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, seeds, defect: bool = False, size: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"img_{seed:03d}.png"
        path.write_bytes(png_bytes(texture(seed, size, defect)))
        paths.append(path)
    return paths
