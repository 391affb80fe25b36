"""MobileNet-V2 with torchvision's module tree (Sandler et al., CVPR 2018).

* ``mobilenet_v2_imagenet``: exactly torchvision's ``mobilenet_v2`` (3,504,872 parameters with
  1000 classes). BackdoorBench's ``mobilenet_v2`` is this model run on 32x32 inputs, so its
  checkpoints belong here (use ``input_size=32``).
* ``mobilenet_v2``: the CIFAR variant (kuangliu/pytorch-cifar): the stem conv has stride 1
  instead of 2 and the first stride-2 stage (24 channels) has stride 1, so a 32x32 input
  reaches the last stage at 4x4 instead of 1x1. Strides carry no parameters: the state dict is
  the same as torchvision's and torchvision checkpoints load unchanged (the function differs).

Keys: ``features.0.0`` / ``features.0.1`` (stem conv / BN), ``features.{1-17}.conv.M``
(inverted residuals: ``conv.0`` expand 1x1 ConvBNReLU6 when t != 1, then the depthwise 3x3
ConvBNReLU6, the linear 1x1 conv and its BN), ``features.18.0/1`` (1x1 conv to 1280),
``classifier.1`` (Linear after Dropout). Activations are ReLU6 as in torchvision (weights
trained with ReLU6 need it), each call site its own module.

``width`` is the stem's channel count at multiplier 1, i.e. torchvision's
``width_mult = width / 32`` (32 = standard; 16 = x0.5). Channel counts follow torchvision's
rounding to multiples of ``round_nearest`` (8), never below it, and the last conv keeps 1280
channels for multipliers below 1 (``1280 * max(1, width_mult)``), as torchvision does, so that
``width_mult`` checkpoints of torchvision load too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "make_divisible"]

# t (expansion), c (channels at width_mult 1), n (blocks), s (first block's stride)
IMAGENET_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# kuangliu's CIFAR change: the 24-channel stage keeps the resolution (stem stride is separate).
CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    IMAGENET_SETTING[:1] + ((6, 24, 2, 1),) + IMAGENET_SETTING[2:]
)


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, not below ``min_value`` (default
    ``divisor``) and not more than 10% below ``v`` (torchvision's ``_make_divisible``)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias, "same" padding) -> BatchNorm2d -> ReLU6; keys ``0`` (conv), ``1`` (BN)."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=False),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (if t != 1) -> depthwise 3x3 -> linear 1x1; residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 with a configurable stem stride and stage strides.

    Parameters
    ----------
    num_classes, in_chans : int
        Logits and input channels.
    width_mult : float
        torchvision's width multiplier.
    setting : tuple of (t, c, n, s)
        Inverted-residual stages.
    stem_stride : int
        2 (ImageNet) or 1 (CIFAR).
    round_nearest : int
        Channel counts are multiples of this (1 turns rounding off).
    dropout : float
        Dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        setting: tuple[tuple[int, int, int, int], ...] = IMAGENET_SETTING,
        stem_stride: int = 2,
        round_nearest: int = 8,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU6(in_chans, input_channel, stride=stem_stride)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(
                    InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t)
                )
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)  # (N, 1280, 1, 1) -> (N, 1280)
        return self.classifier(x)


@register_model(family="mobilenet_v2", input_size=32, default_width=32)
def mobilenet_v2(
    num_classes: int = 10,
    in_chans: int = 3,
    width: int = 32,
    *,
    round_nearest: int = 8,
    dropout: float = 0.2,
) -> MobileNetV2:
    """MobileNet-V2, CIFAR strides (stem and 24-ch stage stride 1), torchvision names;
    width/32 = width_mult."""
    return MobileNetV2(
        num_classes,
        in_chans,
        width / 32,
        CIFAR_SETTING,
        stem_stride=1,
        round_nearest=round_nearest,
        dropout=dropout,
    )


@register_model(family="mobilenet_v2", input_size=224, default_width=32)
def mobilenet_v2_imagenet(
    num_classes: int = 1000,
    in_chans: int = 3,
    width: int = 32,
    *,
    round_nearest: int = 8,
    dropout: float = 0.2,
) -> MobileNetV2:
    """torchvision mobilenet_v2 (also BackdoorBench's mobilenet_v2); width/32 = width_mult."""
    return MobileNetV2(
        num_classes,
        in_chans,
        width / 32,
        IMAGENET_SETTING,
        stem_stride=2,
        round_nearest=round_nearest,
        dropout=dropout,
    )
