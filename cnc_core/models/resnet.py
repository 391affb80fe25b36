"""ResNets with torchvision's parameter names (He et al., CVPR 2016).

Two stems share one class:

* ``cifar`` (``resnet18``, ``resnet34``): conv1 3x3 stride 1 padding 1, no max-pool, the
  common CIFAR ResNet (kuangliu/pytorch-cifar; 11,173,962 parameters for ResNet-18 with 10
  classes, the "11.17M" of the C&C paper).
* ``imagenet`` (``resnet18_imagenet``, ``resnet34_imagenet``, ``resnet50_imagenet``): exactly
  torchvision's ``resnet18/34/50`` (conv1 7x7 stride 2 + 3x3 max-pool). BackdoorBench's
  ``resnet18``/``resnet34``/``resnet50`` are these torchvision models run on 32x32 inputs, so
  their checkpoints load into the ``*_imagenet`` entries (use ``input_size=32``).

State-dict keys are torchvision's: ``conv1``, ``bn1``, ``layer{1-4}.{i}.conv1/bn1/conv2/bn2``
(``conv3/bn3`` in Bottleneck), ``layer{2-4}.0.downsample.0/1``, ``fc``. ``width`` is the
channel count of the stem and of layer1 (64 = standard); stages use ``width * (1, 2, 4, 8)``.

Each ReLU call site has its own ``nn.ReLU`` module (torchvision reuses one per block) so a
forward hook fires once per activation; ReLUs hold no state, so state dicts are unaffected.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ._registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]

Stem = Literal["cifar", "imagenet"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 conv + BN ``downsample``) shortcut."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=False)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """ResNet with a CIFAR or ImageNet stem and torchvision's module names.

    Parameters
    ----------
    block : type[BasicBlock] | type[Bottleneck]
        Residual block.
    layers : sequence of int
        Blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    num_classes, in_chans : int
        Logits and input channels.
    width : int
        Channels of the stem and stage 1 (64 = standard); stage i has ``width * 2**i`` planes.
    stem : {"cifar", "imagenet"}
        3x3/1 conv without max-pool, or torchvision's 7x7/2 conv + 3x3/2 max-pool.
    zero_init_residual : bool
        Zero the last BN gamma of each block (torchvision's option).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_chans: int = 3,
        width: int = 64,
        stem: Stem = "imagenet",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = width
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block then starts as the identity (Goyal et al., 2017), as in torchvision.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)  # (N, C, 1, 1) -> (N, C)
        return self.fc(x)


@register_model(family="resnet", input_size=32, default_width=64)
def resnet18(
    num_classes: int = 10, in_chans: int = 3, width: int = 64, *, zero_init_residual: bool = False
) -> ResNet:
    """ResNet-18, CIFAR stem (3x3/1 conv1, no max-pool), torchvision parameter names."""
    return ResNet(
        BasicBlock, (2, 2, 2, 2), num_classes, in_chans, width, "cifar", zero_init_residual
    )


@register_model(family="resnet", input_size=32, default_width=64)
def resnet34(
    num_classes: int = 10, in_chans: int = 3, width: int = 64, *, zero_init_residual: bool = False
) -> ResNet:
    """ResNet-34, CIFAR stem (3x3/1 conv1, no max-pool), torchvision parameter names."""
    return ResNet(
        BasicBlock, (3, 4, 6, 3), num_classes, in_chans, width, "cifar", zero_init_residual
    )


@register_model(family="resnet", input_size=224, default_width=64)
def resnet18_imagenet(
    num_classes: int = 1000,
    in_chans: int = 3,
    width: int = 64,
    *,
    zero_init_residual: bool = False,
) -> ResNet:
    """torchvision resnet18 (7x7/2 conv1 + max-pool); also BackdoorBench's resnet18."""
    return ResNet(
        BasicBlock, (2, 2, 2, 2), num_classes, in_chans, width, "imagenet", zero_init_residual
    )


@register_model(family="resnet", input_size=224, default_width=64)
def resnet34_imagenet(
    num_classes: int = 1000,
    in_chans: int = 3,
    width: int = 64,
    *,
    zero_init_residual: bool = False,
) -> ResNet:
    """torchvision resnet34 (7x7/2 conv1 + max-pool); also BackdoorBench's resnet34."""
    return ResNet(
        BasicBlock, (3, 4, 6, 3), num_classes, in_chans, width, "imagenet", zero_init_residual
    )


@register_model(family="resnet", input_size=224, default_width=64)
def resnet50_imagenet(
    num_classes: int = 1000,
    in_chans: int = 3,
    width: int = 64,
    *,
    zero_init_residual: bool = False,
) -> ResNet:
    """torchvision resnet50 (Bottleneck v1.5, 7x7/2 conv1 + max-pool); BackdoorBench's resnet50."""
    return ResNet(
        Bottleneck, (3, 4, 6, 3), num_classes, in_chans, width, "imagenet", zero_init_residual
    )
