"""SPADE anomaly detection and localisation from normal images only.

Typical use::

    from anomaly import SPADE, collect_inputs

    model = SPADE(k=50).fit(collect_inputs(["train/good"]).items)
    model.bank.save("bank.safetensors")
    for result in model.score(collect_inputs(["test"]).items, maps=True):
        print(result.path, result.score, result.anomalous(model.suggested_tau()))
"""

from .allocator import configure_allocator
from .openmp import configure_spinning

configure_allocator()  # before torch allocates anything, so that all its blocks follow the settings
configure_spinning()  # before torch loads libgomp, which reads its spin count then

from .backbones import BACKBONES, BackboneIdentity, FeatureExtractor, WeightsUnavailable, load_extractor
from .bank import BankError, NormalBank
from .imageio import ImageLoadError, load_image
from .sources import Collection, InputItem, ZipLimits, collect_inputs, items_from_upload
from .spade import SPADE, ImageResult

__all__ = [
    "BACKBONES", "BackboneIdentity", "BankError", "Collection", "FeatureExtractor", "ImageLoadError",
    "ImageResult", "InputItem", "NormalBank", "SPADE", "WeightsUnavailable", "ZipLimits", "collect_inputs",
    "items_from_upload", "load_extractor", "load_image",
]
