"""Shared fixtures: one cached instance of each backbone the tests use, and a CPU without native bfloat16."""

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


@pytest.fixture
def no_native_bf16(monkeypatch):
    """This CPU as one without native bfloat16, with the once-per-process warning about it not yet given."""
    from anomaly import search

    monkeypatch.setattr(search, "bf16_supported", lambda: False)
    search._warn_emulated_bf16.cache_clear()
    yield
    search._warn_emulated_bf16.cache_clear()
