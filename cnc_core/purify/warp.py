"""Warp trigger inversion: for each class, the smooth sub-pixel warp that sends images to it.

Neural Cleanse (Wang et al., S&P 2019) inverts a mask + pattern per class; a warping
trigger (WaNet, Nguyen & Tran, ICLR 2021) has neither. It moves every pixel by a fraction of
a pixel along one fixed smooth field (WaNet: a random 4 x 4 control grid upsampled
bicubically, displacements of about a quarter pixel), and the backdoored network has learned
to answer that exact field with the target. Here each candidate class ``t`` gets its own
control grid, bounded by ``max_shift`` pixels per control point (``tanh``), optimised so
that warped synthetic images are predicted ``t``; a natural class needs far more than a
sub-pixel warp to take images from every other class, the backdoor target does not. As in
Neural Cleanse, the classes are compared by a robust outlier score (MAD), here on the share
of non-``t`` images each class's warp sends to ``t`` (high side). Data-free: only the model
and synthetic images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_core.progress import ProgressFn
from cnc_core.purify.proxies import Norm, _Frozen, _num_outputs, _reporter, predict
from cnc_core.purify.synthesis import to_tensor_stats

#: Floor of the MAD in the anomaly index (a share of images): where every other class's warp
#: reaches no image, the index stays finite and comparable.
MAD_FLOOR = 0.01


@dataclass(frozen=True)
class WarpInversionConfig:
    """Settings of :func:`warp_inversion`."""

    grid: int = 4  # control points per side (WaNet's k)
    max_shift: float = 0.5  # pixels, the largest displacement of a control point
    steps: int = 60
    lr: float = 0.1
    images: int = 32  # per class and step, drawn among the images not predicted that class


@dataclass
class WarpInversionResult:
    """Per-class inverted warps and how far each reaches."""

    fields: Tensor  # (K, H, W, 2) displacement in grid_sample's normalised units
    success: list[float]  # share of images not predicted k that k's warp sends to k
    anomaly_index: float  # MAD outlier score of the best class's success (high side)
    suspected: int  # the class whose warp reaches furthest


def warp_field(control: Tensor, size: tuple[int, int], max_shift: float) -> Tensor:
    """Displacement fields (N, H, W, 2), normalised units, from unbounded control grids
    (N, 2, k, k): ``max_shift * tanh`` pixels per control point, upsampled bicubically."""
    h, w = size
    shift = max_shift * torch.tanh(control)  # pixels
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=control.device)
    up = F.interpolate(shift, size=(h, w), mode="bicubic", align_corners=True)
    return up.permute(0, 2, 3, 1) * scale


def _identity_grid(h: int, w: int, device: torch.device) -> Tensor:
    """grid_sample's identity grid (1, H, W, 2), (x, y) = (column, row) in [-1, 1]."""
    rows, cols = torch.meshgrid(
        torch.linspace(-1, 1, h, device=device),
        torch.linspace(-1, 1, w, device=device),
        indexing="ij",
    )
    return torch.stack((cols, rows), dim=2)[None]


def apply_warp(images: Tensor, field: Tensor, *, mean: Norm = 0.0, std: Norm = 1.0) -> Tensor:
    """``images`` (normalised) resampled along ``field`` ((H, W, 2) or one per image)."""
    c, h, w = images.shape[1:]
    m = to_tensor_stats(mean, c, images.device)
    s = to_tensor_stats(std, c, images.device)
    identity = _identity_grid(h, w, images.device)
    if field.dim() == 3:
        field = field[None].expand(images.shape[0], -1, -1, -1)
    grid = (identity + field).clamp(-1, 1)
    pix = F.grid_sample(images * s + m, grid, align_corners=True).clamp(0, 1)
    return (pix - m) / s


def warp_stamp(
    field: Tensor, *, mean: Norm = 0.0, std: Norm = 1.0
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """A ``stamp(images, rng)`` function (as :func:`.proxies.trigger_stamp`) resampling every
    image along ``field`` (H, W, 2); ``rng`` is unused (the warp is fixed)."""
    field = field.detach()

    def stamp(images: Tensor, rng: torch.Generator) -> Tensor:
        with torch.no_grad():
            return apply_warp(images, field.to(images.device), mean=mean, std=std)

    return stamp


def warp_inversion(
    model: nn.Module,
    images: Tensor,
    config: WarpInversionConfig,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    stage: str = "warp",
) -> WarpInversionResult:
    """Invert one warp per class from synthetic ``images`` (normalised) against ``model``;
    all classes are optimised together in one batch, as the Neural-Cleanse inversion is."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = images.device
    c, h, w = images.shape[1:]
    m = to_tensor_stats(mean, c, device)
    s = to_tensor_stats(std, c, device)
    clean = predict(model, images).cpu()
    k = _num_outputs(model, images)
    control = (0.1 * torch.randn(k, 2, config.grid, config.grid, generator=gen)).to(device)
    control.requires_grad_(True)
    opt = torch.optim.Adam([control], lr=config.lr)
    targets = torch.arange(k).repeat_interleave(config.images).to(device)
    others = [(clean != t).nonzero().flatten() for t in range(k)]
    report = _reporter(progress, stage)
    identity = _identity_grid(h, w, device)

    def draw() -> Tensor:
        """``config.images`` indices per class, among the images not predicted that class."""
        picks = []
        for members in others:
            pool = members if members.numel() else torch.arange(images.shape[0])
            picks.append(pool[torch.randint(0, pool.numel(), (config.images,), generator=gen)])
        return torch.cat(picks).to(device)

    with _Frozen(model):
        for step in range(config.steps):
            idx = draw()
            fields = warp_field(control, (h, w), config.max_shift)
            grid = (identity + fields.repeat_interleave(config.images, 0)).clamp(-1, 1)
            pix = F.grid_sample(images[idx] * s + m, grid, align_corners=True).clamp(0, 1)
            loss = F.cross_entropy(model((pix - m) / s), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report((step + 1) / max(config.steps, 1) * 0.9)
        with torch.no_grad():
            fields = warp_field(control, (h, w), config.max_shift).detach()
            success = []
            for t in range(k):
                x = images[others[t].to(device)]
                hit = predict(model, apply_warp(x, fields[t], mean=mean, std=std)) == t
                success.append(float(hit.float().mean()) if x.shape[0] else 0.0)
    report(1.0)
    rates = torch.tensor(success)
    median = rates.median()
    mad = (rates - median).abs().median() * 1.4826
    best = int(rates.argmax())
    anomaly = float((rates[best] - median) / mad.clamp_min(MAD_FLOOR))
    return WarpInversionResult(
        fields=fields.cpu(), success=success, anomaly_index=anomaly, suspected=best
    )
