"""Blended (Chen et al., 2017, "Targeted backdoor attacks ... using data poisoning").

``x' = (1 - alpha) * x + alpha * pattern`` with alpha 0.2 (BackdoorBench's default).
BackdoorBench blends the "Hello Kitty" photo; this project ships no third-party image, so the
pattern is a fixed seeded random image (uniform [0, 1] per pixel and channel, drawn with a
``torch.Generator`` seeded by ``seed``). Like Hello Kitty, it covers the whole image; being
colour noise it is, if anything, easier to learn than a photo.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cnc_core.backdoors.base import Attack, register_attack


@register_attack
class Blended(Attack):
    """Alpha-blend a fixed seeded random pattern over the whole image."""

    name = "blended"

    def __init__(
        self, image_size: int = 32, channels: int = 3, seed: int = 0, alpha: float = 0.2
    ) -> None:
        super().__init__(image_size, channels, seed)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        g = torch.Generator().manual_seed(seed)
        self.pattern = torch.rand(channels, image_size, image_size, generator=g)  # (C, H, W)

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check(images)
        pattern = self.pattern.to(device=images.device, dtype=images.dtype)
        return (1.0 - self.alpha) * images + self.alpha * pattern
