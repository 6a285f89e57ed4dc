"""Shared fixtures: one cached instance of each backbone the tests use."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def random_resnet18():
    """A small real backbone (random weights, explicitly): fast, and exercises the torchvision path."""
    from anomaly.backbones import load_extractor

    return load_extractor("resnet18", weights="random")


@pytest.fixture(scope="session")
def efficientnet():
    from anomaly.backbones import load_extractor

    return load_extractor("efficientnet_lite0")
