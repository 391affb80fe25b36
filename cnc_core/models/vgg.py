"""VGG-19 with batch norm (Simonyan & Zisserman, ICLR 2015), two heads.

* ``vgg19_bn``: torchvision's ``vgg19_bn`` layout, which is what BackdoorBench (v2) trains
  on CIFAR/GTSRB (``models.vgg19_bn(num_classes=...)`` run on 32x32 inputs):
  ``features`` -> ``AdaptiveAvgPool2d((7, 7))`` -> ``classifier`` = Linear(512*7*7, 4096),
  ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Linear(4096, num_classes). On a 32x32
  input the features end at 1x1 and the adaptive pool replicates that value 49 times, exactly
  as torchvision does. 143,678,248 parameters with 1000 classes.
* ``vgg19_bn_cifar``: the compact CIFAR VGG (kuangliu/pytorch-cifar, BackdoorBench v1's
  ``models/vgg.py``, used by CLP): same ``features`` then ``classifier`` = Linear(512,
  num_classes). 20,040,522 parameters with 10 classes. Pooling is adaptive to 1x1, which is
  the identity at 32x32 and lets other input sizes work.

``features.N`` indices are torchvision's (conv, BN, ReLU per layer; MaxPool after each stage),
so e.g. ``features.0`` is the first conv, ``features.1`` its BN, ``features.49`` the last conv.
``width`` scales every channel count by ``width / 64`` (64 = standard), including the 4096-wide
hidden layers of ``vgg19_bn``; counts are floored and kept >= 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["VGG", "VGG19_CFG"]

# Configuration "E" of the VGG paper: conv widths, "M" = 2x2 max-pool.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


def _scale(channels: int, width: int) -> int:
    return max(1, channels * width // 64)


def _make_features(cfg: tuple[int | str, ...], in_chans: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            c_out = _scale(int(v), width)
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=False),
            ]
            c_in = c_out
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with BN and either torchvision's three-layer head or a single Linear (CIFAR).

    Parameters
    ----------
    cfg : tuple
        Conv widths at width 64 and ``"M"`` for max-pools.
    num_classes, in_chans : int
        Logits and input channels.
    width : int
        64 = standard; all channels scale by ``width / 64``.
    head : {"torchvision", "cifar"}
        ``"torchvision"``: 7x7 adaptive pool + Linear-ReLU-Dropout x2 + Linear.
        ``"cifar"``: 1x1 adaptive pool + Linear.
    dropout : float
        Dropout of the torchvision head (unused by the CIFAR head).
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...] = VGG19_CFG,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 64,
        head: str = "torchvision",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = _make_features(cfg, in_chans, width)
        c_last = _scale(int([v for v in cfg if v != "M"][-1]), width)
        if head == "torchvision":
            hidden = _scale(4096, width)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(c_last * 7 * 7, hidden),
                nn.ReLU(inplace=False),
                nn.Dropout(p=dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=False),
                nn.Dropout(p=dropout),
                nn.Linear(hidden, num_classes),
            )
        elif head == "cifar":
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.classifier = nn.Linear(c_last, num_classes)  # key "classifier.weight"
        else:
            raise ValueError(f"head must be 'torchvision' or 'cifar', got {head!r}")

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
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
        x = torch.flatten(x, 1)  # (N, C, s, s) -> (N, C*s*s), s = 7 or 1
        return self.classifier(x)


@register_model(family="vgg", input_size=32, default_width=64)
def vgg19_bn(
    num_classes: int = 10, in_chans: int = 3, width: int = 64, *, dropout: float = 0.5
) -> VGG:
    """VGG-19-BN, torchvision layout (7x7 pool, 4096-wide head); BackdoorBench's vgg19_bn."""
    return VGG(VGG19_CFG, num_classes, in_chans, width, head="torchvision", dropout=dropout)


@register_model(family="vgg", input_size=32, default_width=64)
def vgg19_bn_cifar(num_classes: int = 10, in_chans: int = 3, width: int = 64) -> VGG:
    """VGG-19-BN, CIFAR head (Linear(512, num_classes)); kuangliu / BackdoorBench v1 / CLP."""
    return VGG(VGG19_CFG, num_classes, in_chans, width, head="cifar")
