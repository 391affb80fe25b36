"""BadNets (Gu, Dolan-Gavitt & Garg, 2017): a fixed white patch in a corner.

BackdoorBench's default for 32x32 inputs: a 3x3 white square at the bottom-right corner.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cnc_core.backdoors.base import Attack, register_attack


@register_attack
class BadNet(Attack):
    """Paste a ``patch_size`` x ``patch_size`` square of ``value`` at the bottom-right corner."""

    name = "badnet"

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        seed: int = 0,
        patch_size: int = 3,
        value: float = 1.0,
    ) -> None:
        super().__init__(image_size, channels, seed)
        if not 0 < patch_size <= image_size:
            raise ValueError(f"patch_size must be in 1..{image_size}, got {patch_size}")
        self.patch_size = patch_size
        self.value = value

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check(images)
        out = images.clone()
        p = self.patch_size
        out[..., -p:, -p:] = self.value
        return out
