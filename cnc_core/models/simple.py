"""A small plain CNN for tests and demos.

Four conv3x3-BN-ReLU blocks with channels ``(w, w, 2w, 2w)`` and strides ``(1, 2, 1, 2)``,
global average pooling, one Linear. At ``width=8`` with 3 input channels and 10 classes it has
4,514 parameters, small enough for seconds-long CPU tests of the whole pipeline while still
having BN layers (for ZeroQ-style synthesis) and 3x3 convs (for Tucker-2).

Keys: ``features.{0-3}.0`` (conv), ``features.{0-3}.1`` (BN), ``fc``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["SimpleCNN"]


class _ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=False),
        )


class SimpleCNN(nn.Module):
    """Plain 4-block CNN; ``width`` is the first block's channel count."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 16) -> None:
        super().__init__()
        chans = (width, width, 2 * width, 2 * width)
        strides = (1, 2, 1, 2)
        blocks: list[nn.Module] = []
        c_in = in_chans
        for c_out, stride in zip(chans, strides, strict=True):
            blocks.append(_ConvBNReLU(c_in, c_out, stride))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)  # (N, 2w, 1, 1) -> (N, 2w)
        return self.fc(x)


@register_model(family="simple", input_size=32, default_width=16)
def simple_cnn(num_classes: int = 10, in_chans: int = 3, width: int = 16) -> SimpleCNN:
    """Small plain CNN (4 conv3x3-BN-ReLU blocks, two stride-2, GAP, Linear) for tests/demos."""
    return SimpleCNN(num_classes, in_chans, width)
