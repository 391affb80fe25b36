"""Pre-activation ResNet-18 exactly as BackdoorBench ships it (He et al., ECCV 2016).

Mirrors ``models/preact_resnet.py`` of SCLBD/BackdoorBench (itself from the WaNet release), the
default architecture of BackdoorBench's CIFAR benchmarks, so its checkpoints load unchanged.
Its quirks, kept on purpose:

* conv1 3x3/1 with no BN or ReLU after it (the first block's ``bn1`` normalises it);
* ``PreActBlock``: ``bn1 -> relu -> conv1 -> bn2 -> relu -> conv2`` plus a shortcut; the
  projection shortcut is ``shortcut.0`` (a 1x1 conv, no BN) applied to the pre-activated input,
  and blocks without projection have no ``shortcut`` attribute at all;
* no final BN/ReLU before pooling (unlike the paper's design), ``avgpool`` adaptive,
  head named ``linear``.

State-dict keys: ``conv1.weight``, ``layer{1-4}.{0,1}.bn1/conv1/bn2/conv2``,
``layer{2-4}.0.shortcut.0.weight``, ``linear.weight/bias``. ``width`` scales every stage
(64 = standard; stages ``width * (1, 2, 4, 8)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["PreActBlock", "PreActResNet"]


class PreActBlock(nn.Module):
    """Pre-activation basic block (BN-ReLU-conv twice)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(x))
        # BackdoorBench projects the pre-activated input but adds the raw input otherwise.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """BackdoorBench's PreActResNet.

    Parameters
    ----------
    num_blocks : tuple of int
        Blocks per stage, ``(2, 2, 2, 2)`` for PreActResNet-18.
    num_classes, in_chans : int
        Logits and input channels.
    width : int
        Channels of the stem and stage 1 (64 = standard).
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(width * 2, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(width * 8, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(width * 8 * PreActBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)  # (N, C, 1, 1) -> (N, C)
        return self.linear(out)


@register_model(family="preact_resnet", input_size=32, default_width=64)
def preact_resnet18(num_classes: int = 10, in_chans: int = 3, width: int = 64) -> PreActResNet:
    """PreAct-ResNet-18 with BackdoorBench's names (``preactresnet18`` there; head ``linear``)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_chans, width)
