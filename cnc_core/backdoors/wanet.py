"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021).

A fixed, smooth warping field: a random (2, k, k) control grid, normalised to mean absolute
value 1, upsampled bicubically to H x W, scaled by ``s / H`` and added to the identity
sampling grid (then times ``grid_rescale`` and clamped to [-1, 1]); images are resampled with
``grid_sample``. Cross ("noise") samples add fresh per-image uniform noise of size 1/H to the
warping grid and keep their true labels, so the network learns the exact warp only; the paper
uses ``cross_ratio`` 2 (two noise samples per poisoned one). Defaults are the paper's and
BackdoorBench's: k=4, s=0.5, grid_rescale=1, cross_ratio=2. This follows the official code
(``VinAIResearch/Warping-based_Backdoor_Attack-release``, ``train.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cnc_core.backdoors.base import Attack, register_attack


@register_attack
class WaNet(Attack):
    """Warp every image by one fixed seeded smooth field."""

    name = "wanet"

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        seed: int = 0,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
    ) -> None:
        super().__init__(image_size, channels, seed)
        self.k, self.s, self.grid_rescale = k, s, grid_rescale
        self.cross_ratio = cross_ratio
        g = torch.Generator().manual_seed(seed)
        ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()  # mean |control point| = 1, as in the official code
        noise_grid = F.interpolate(
            ins, size=image_size, mode="bicubic", align_corners=True
        ).permute(0, 2, 3, 1)  # (1, H, W, 2)
        axis = torch.linspace(-1, 1, steps=image_size)
        rows, cols = torch.meshgrid(axis, axis, indexing="ij")
        # grid_sample wants (x, y) = (column, row) in the last dimension.
        identity = torch.stack((cols, rows), dim=2)[None]  # (1, H, W, 2)
        grid = (identity + s * noise_grid / image_size) * grid_rescale
        self.grid = grid.clamp(-1, 1)  # (1, H, W, 2)

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check(images)
        grid = self.grid.to(device=images.device, dtype=images.dtype)
        out = F.grid_sample(images, grid.expand(images.shape[0], -1, -1, -1), align_corners=True)
        return out.clamp_(0.0, 1.0)  # bilinear resampling of [0,1] stays in range; guard rounding

    def apply_cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        self._check(images)
        n, h = images.shape[0], self.image_size
        noise = torch.rand(n, h, h, 2, generator=generator) * 2 - 1  # (N, H, W, 2)
        grid = self.grid + noise / h
        grid = grid.clamp(-1, 1).to(device=images.device, dtype=images.dtype)
        return F.grid_sample(images, grid, align_corners=True).clamp_(0.0, 1.0)
