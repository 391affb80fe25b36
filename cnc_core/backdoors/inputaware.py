"""Input-Aware Dynamic backdoor: a documented STAND-IN, not the trained original.

The original (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020) trains a
pattern generator and a mask generator jointly with the victim, with a diversity loss so that
different inputs get different triggers, and "cross-trigger" samples (image i stamped with the
trigger generated for image j, kept at its true label) so that a trigger works only on the
image it was made for. Training those generators costs far more than the CPU budget of this
project's benchmark, so this module stands in for them:

* the **pattern generator** is a FIXED seeded random two-layer conv net
  (conv3x3 C->16, tanh, conv3x3 16->C), its output standardised per image and squashed with a
  sigmoid into vivid [0, 1] colours: an input-dependent pattern;
* the **mask generator** is a FIXED seeded random conv5x5 (C->1) on the image plus a fixed
  smooth random field, 3x3-average-smoothed, binarised to the top ``density`` fraction of
  pixels per image (default 5%, near the original's 3.2% mask density): an input-dependent,
  sparse, blob-like mask;
* triggered image: ``x' = (1 - m(x)) * x + m(x) * p(x)``;
* cross samples: ``(1 - m(x_j)) * x_i + m(x_j) * p(x_j)`` for another image j of the same
  batch, kept at the true label of i, ``cross_ratio`` 1 per poisoned sample (the original's
  p_cross = p_attack = 0.1).

What it keeps: triggers differ per input in pattern and location, and cross samples teach the
victim to reject mismatched triggers. What it lacks: generators optimised against the victim,
so the triggers are not tuned for stealth or learnability. Results on it must be reported as
"InputAware (fixed random generator stand-in)".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cnc_core.backdoors.base import Attack, register_attack

_CHUNK = 2048  # images per generator pass: bounds the (N, 16, H, W) hidden activations


@register_attack
class InputAware(Attack):
    """Input-dependent pattern and mask from fixed seeded random conv generators (stand-in)."""

    name = "inputaware"

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        seed: int = 0,
        density: float = 0.05,
        cross_ratio: float = 1.0,
        hidden: int = 16,
    ) -> None:
        super().__init__(image_size, channels, seed)
        if not 0.0 < density < 1.0:
            raise ValueError(f"density must be in (0, 1), got {density}")
        self.density = density
        self.cross_ratio = cross_ratio
        g = torch.Generator().manual_seed(seed)
        # He-style scaling keeps the random nets' outputs O(1) without training.
        self.w1 = torch.randn(hidden, channels, 3, 3, generator=g) * (2.0 / (channels * 9)) ** 0.5
        self.b1 = torch.randn(hidden, generator=g) * 0.5
        self.w2 = torch.randn(channels, hidden, 3, 3, generator=g) * (2.0 / (hidden * 9)) ** 0.5
        self.b2 = torch.randn(channels, generator=g) * 0.5
        self.wm = torch.randn(1, channels, 5, 5, generator=g) * (2.0 / (channels * 25)) ** 0.5
        field = torch.randn(1, 1, 8, 8, generator=g)
        self.field = F.interpolate(field, size=image_size, mode="bilinear", align_corners=True)[
            0
        ]  # (1, H, W): a smooth field so blank backgrounds still get a definite mask

    def _params(self, ref: Tensor) -> list[Tensor]:
        return [
            t.to(device=ref.device, dtype=ref.dtype)
            for t in (self.w1, self.b1, self.w2, self.b2, self.wm, self.field)
        ]

    def pattern_and_mask(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Pattern (N, C, H, W) in [0, 1] and binary mask (N, 1, H, W) for each image."""
        self._check(images)
        w1, b1, w2, b2, wm, field = self._params(images)
        n_keep = max(1, round(self.density * self.image_size**2))
        patterns, masks = [], []
        for x in images.split(_CHUNK):
            h = torch.tanh(F.conv2d(x, w1, b1, padding=1))
            p = F.conv2d(h, w2, b2, padding=1)  # (n, C, H, W)
            mu = p.mean(dim=(1, 2, 3), keepdim=True)
            sd = p.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            patterns.append(torch.sigmoid(3.0 * (p - mu) / sd))
            logits = F.conv2d(x, wm, padding=2)  # (n, 1, H, W)
            lsd = logits.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            logits = (logits - logits.mean(dim=(1, 2, 3), keepdim=True)) / lsd + field
            logits = F.avg_pool2d(logits, 3, stride=1, padding=1, count_include_pad=False)
            flat = logits.flatten(1)  # (n, H*W)
            thresh = flat.topk(n_keep, dim=1).values[:, -1:]  # (n, 1)
            masks.append((flat >= thresh).to(x.dtype).view_as(logits))
        return torch.cat(patterns), torch.cat(masks)

    def apply(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        pattern, mask = self.pattern_and_mask(images)
        return (1.0 - mask) * images + mask * pattern

    def apply_cross(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Stamp each image with the trigger of another image of the same batch."""
        pattern, mask = self.pattern_and_mask(images)
        n = images.shape[0]
        if n < 2:
            raise ValueError("cross samples need at least 2 images")
        # A random derangement: walk a random permutation and point each entry at the next.
        perm = torch.randperm(n, generator=generator)
        src = torch.empty(n, dtype=torch.long)
        src[perm] = perm.roll(-1)
        src = src.to(images.device)
        return (1.0 - mask[src]) * images + mask[src] * pattern[src]
