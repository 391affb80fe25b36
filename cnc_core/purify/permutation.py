"""Permutation trigger inversion: a data-free proxy for all-to-all backdoors.

Neural Cleanse (:func:`.proxies.trigger_inversion`) looks for one small trigger per TARGET
class. An all-to-all backdoor has no single target: one trigger sends every class ``y`` to
its own ``pi(y)`` (``y + 1 mod K`` in BackdoorBench). Per-class inversion then finds the
natural neighbours of each class, never the trigger (measured: bench/results/explore-purify.md
4g). What sets the backdoor trigger apart is the *shape* of its effect: it moves every class
away from itself, each class to one place, and the places differ. So we look for one small
mask + pattern ``(m, p)`` that maximises the mutual information between the clean prediction
``y`` and the stamped prediction ``y'``, with ``y' != y``:

    loss = mean_i -log(1 - q_i[y_i])        # leave the source class
         - mi_weight * I(y; y')             # a permutation, not a collapse onto one class
         + l1_weight * |m|_1                # small, as a trigger is

with ``q_i = softmax(f((1 - m) x_i + m p))`` and ``I`` estimated from soft predictions over a
class-balanced batch as ``H(mean_i q_i) - mean_c H(mean_{i: y_i = c} q_i)`` (the estimator of
IIC, Ji et al., ICCV 2019). A natural universal perturbation sends most images to one
attractor class (low ``H(y')``); noise scatters each class (high ``H(y' | y)``); the
all-to-all trigger does neither. Synthetic images only; labels are the model's own
predictions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_core.progress import ProgressFn
from cnc_core.purify.proxies import (
    Norm,
    _Frozen,
    _num_outputs,
    _reporter,
    apply_trigger,
    predict,
)
from cnc_core.purify.synthesis import to_tensor_stats

__all__ = [
    "INFORMATION",
    "PermutationInversionConfig",
    "PermutationInversionResult",
    "mask_peak_share",
    "permutation_inversion",
]


INFORMATION = ("full", "away")


@dataclass(frozen=True)
class PermutationInversionConfig:
    """Settings of :func:`permutation_inversion`."""

    # 150 steps x 3 restarts x 12 images per class: ~54k image passes, about 6x the preset's
    # Neural-Cleanse inversion. Until session 12, 2 restarts: on BadNet all-to-all's seed-1
    # images both collapsed onto natural classes, where 3 found the exact mapping twice;
    # 100 steps found it too but with larger masks and weaker removal (explore-purify.md 4q)
    steps: int = 150
    lr: float = 0.1
    l1_weight: float = 0.01
    mi_weight: float = 1.0
    images_per_class: int = 12  # per step, drawn by the model's clean prediction
    restarts: int = 3  # independent (mask, pattern) pairs optimised together, all returned
    # What I(y; y') is measured on: "full", the stamped prediction q (staying put carries
    # information too, so a trigger that moves few images onto one natural class scores
    # well); "away", q with the source class taken out and renormalised, as the dynamic
    # search measures it (where images go once they leave)
    information: str = "full"
    # Restarts beside those whose mask is a whole-image blend at ``blend_alpha`` instead of
    # a learned mask, the pattern learned alone: a proxy for all-to-all *blended* triggers
    # (BackdoorBench's blend, alpha 0.2), which no small mask reproduces. Gated and ranked
    # with the others (their L1 term is the constant ``alpha * H * W``, so a sparse restart
    # that passes ranks first). 0: none.
    blend_restarts: int = 0
    blend_alpha: float = 0.2
    # Images per class a step for the blend restarts, drawn apart from the learned masks'
    # batch (from a generator of its own, so the learned restarts see the same batches
    # either way). None: they share the learned masks' batch of ``images_per_class``
    blend_images_per_class: int | None = None


@dataclass
class PermutationInversionResult:
    """The inverted permutation trigger and what it does on the synthetic images."""

    mask: Tensor  # (1, H, W) in [0, 1]
    pattern: Tensor  # (C, H, W) in [0, 1]
    mask_norm: float
    flip_rate: float  # share of images whose prediction the trigger changes
    mutual_information: float  # I(y; y') in nats, hard predictions
    top_share: float  # largest share of flipped images that land in one class
    mapping: list[int]  # most common stamped prediction per source class (-1: no images)
    blend: bool = False  # a whole-image blend restart (``blend_restarts``), mask fixed
    peak_share: float = 0.0  # :func:`mask_peak_share` of ``mask``
    # every restart's own result (this one included), best final objective first: the
    # objective favours triggers that move few images (staying put is information too), so
    # a caller may prefer another restart by what it does (``PurifyConfig``'s gate does)
    candidates: list[PermutationInversionResult] = field(default_factory=list)


def mask_peak_share(mask: Tensor, window: int | None = None) -> float:
    """Share of a mask's mass in its densest ``window`` x ``window`` square (default: an
    eighth of the image side, 4 px at 32x32). Near 1 for a patch trigger's mask, small for
    one spread over the image (a warp's, a blend's); data-free. Measured on the inverted
    permutation triggers (explore-purify.md 4v): BadNet all-to-all 0.20-0.58 (0.33-0.57 on
    the restarts the gate took), WaNet all-to-all 0.11-0.14, the clean model 0.07-0.09, a
    whole-image blend 1/64."""
    h, w = mask.shape[-2:]
    k = window or max(1, min(h, w) // 8)
    m = mask.reshape(1, 1, h, w).float()
    mass = F.avg_pool2d(m, k, stride=1) * (k * k)
    return float(mass.max() / m.sum().clamp_min(1e-12))


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def _balanced_index(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Up to ``per_class`` indices of each predicted class, drawn with replacement."""
    picks = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        draw = torch.randint(0, members.numel(), (per_class,), generator=generator)
        picks.append(members[draw])
    return torch.cat(picks)


def _hard_statistics(
    clean: Tensor, stamped: Tensor, num_classes: int
) -> tuple[float, float, float, list[int]]:
    """Flip rate, mutual information (nats), top share of flips, per-class mapping."""
    joint = torch.zeros(num_classes, num_classes)
    joint.index_put_((clean.cpu(), stamped.cpu()), torch.ones(clean.numel()), accumulate=True)
    p = joint / joint.sum()
    mi = float(_entropy(p.sum(0)) + _entropy(p.sum(1)) - _entropy(p.flatten()))
    flipped = stamped != clean
    hist = torch.bincount(stamped[flipped].cpu(), minlength=num_classes)
    top = float(hist.max() / hist.sum()) if flipped.any() else 0.0
    rows = joint.clone()
    rows.fill_diagonal_(0)
    mapping = [int(r.argmax()) if r.sum() > 0 else -1 for r in rows]
    return float(flipped.float().mean()), mi, top, mapping


def permutation_inversion(
    model: nn.Module,
    images: Tensor,
    config: PermutationInversionConfig,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    stage: str = "proxies",
) -> PermutationInversionResult:
    """Invert one all-to-all trigger from synthetic ``images`` (normalised) against ``model``.

    ``config.restarts`` (mask, pattern) pairs are optimised side by side from random patterns;
    the one with the best final objective is returned, with every restart's result (its
    hard statistics on all ``images``) in ``candidates``, best objective first.
    """
    if config.information not in INFORMATION:
        raise ValueError(f"information must be one of {INFORMATION}, not {config.information!r}")
    if config.restarts + config.blend_restarts < 1:
        raise ValueError(
            "the permutation search needs at least one restart: "
            "permutation_restarts + permutation_blend_restarts is 0"
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device = images.device
    c, h, w = images.shape[1:]
    m = to_tensor_stats(mean, c, device)
    s = to_tensor_stats(std, c, device)
    clean = predict(model, images)
    num_classes = _num_outputs(model, images)
    r = config.restarts + config.blend_restarts
    mask_raw = torch.full((config.restarts, 1, h, w), -2.0, device=device, requires_grad=True)
    blend_mask = torch.full((config.blend_restarts, 1, h, w), config.blend_alpha, device=device)
    pattern_raw = ((torch.rand(r, c, h, w, generator=gen) * 4 - 2).to(device)).requires_grad_(True)

    def masks() -> Tensor:
        """Every restart's mask: the learned ones, then the fixed blends."""
        return torch.cat([torch.sigmoid(mask_raw), blend_mask])

    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=config.lr, betas=(0.5, 0.9))
    report = _reporter(progress, stage)

    def objective(idx: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
        """Loss of each (``mask``, ``pattern``) restart on the images ``idx``."""
        pix = images[idx] * s + m
        r = mask.shape[0]
        stamped = (1 - mask[:, None]) * pix[None] + (mask * pattern)[:, None]
        n = idx.numel()
        x = ((stamped - m) / s).reshape(r * n, c, h, w)
        q = F.softmax(model(x), dim=1).reshape(r, n, -1)
        y = clean[idx]
        stay = q.gather(2, y[None, :, None].expand(r, n, 1)).squeeze(2)
        leave = -(1 - stay).clamp_min(1e-6).log().mean(1)
        onehot = F.one_hot(y, q.shape[2]).float()  # (n, K)
        if config.information == "away":
            q = q * (1 - onehot)[None]
            q = q / q.sum(2, keepdim=True).clamp_min(1e-12)
        marginal = _entropy(q.mean(1))
        counts = onehot.sum(0)  # (K,)
        per_class = torch.einsum("nk,rnj->rkj", onehot, q) / counts.clamp_min(1)[None, :, None]
        present = counts > 0
        conditional = (_entropy(per_class) * present).sum(1) / present.sum()
        mi = marginal - conditional
        l1 = mask.reshape(r, -1).sum(1)
        return leave - config.mi_weight * mi + config.l1_weight * l1

    learned = slice(0, config.restarts)
    blends = slice(config.restarts, r)
    blend_per_class = config.blend_images_per_class
    apart = config.blend_restarts > 0 and blend_per_class is not None
    blend_gen = torch.Generator().manual_seed(gen.initial_seed() + 1)

    with _Frozen(model):
        for step in range(config.steps):
            idx = _balanced_index(clean.cpu(), config.images_per_class, gen).to(device)
            pattern = torch.sigmoid(pattern_raw)
            if apart and blend_per_class is not None:
                blend_idx = _balanced_index(clean.cpu(), blend_per_class, blend_gen).to(device)
                loss = objective(blend_idx, blend_mask, pattern[blends]).sum()
                if config.restarts:
                    mask = torch.sigmoid(mask_raw)
                    loss = loss + objective(idx, mask, pattern[learned]).sum()
            else:
                loss = objective(idx, masks(), pattern).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report((step + 1) / max(config.steps, 1) * 0.95)
        with torch.no_grad():
            idx = _balanced_index(clean.cpu(), config.images_per_class * 4, gen).to(device)
            order = objective(idx, masks(), torch.sigmoid(pattern_raw)).argsort().tolist()
            candidates = []
            for k in order:
                mask = masks()[k].detach()
                pattern = torch.sigmoid(pattern_raw[k]).detach()
                stamped = predict(model, apply_trigger(images, mask, pattern, mean=mean, std=std))
                flip, mi, top, mapping = _hard_statistics(clean, stamped, num_classes)
                candidates.append(
                    PermutationInversionResult(
                        mask=mask,
                        pattern=pattern,
                        mask_norm=float(mask.sum()),
                        flip_rate=flip,
                        mutual_information=mi,
                        top_share=top,
                        mapping=mapping,
                        blend=k >= config.restarts,
                        peak_share=mask_peak_share(mask),
                    )
                )
    report(1.0)
    return dataclasses.replace(candidates[0], candidates=candidates)
