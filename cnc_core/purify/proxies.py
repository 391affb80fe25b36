"""Adversarial proxies for triggered inputs, built on synthetic images only.

Three kinds, in the string-keyed registry :data:`PROXY_KINDS`:

``"pgd"``
    Per-sample untargeted L-inf PGD (Madry et al., ICLR 2018). C&C (Phan et al., ECCV 2024,
    Fig. 4) observes that on a backdoored model most adversarial synthetic images land in the
    backdoor target class, so they stand in for triggered data.
``"universal"``
    One input-agnostic L-inf perturbation shared by all images (in the spirit of universal
    adversarial perturbations, Moosavi-Dezfooli et al., CVPR 2017): real triggers are
    input-agnostic too.
``"trigger_inversion"``
    Neural Cleanse (Wang et al., "Neural Cleanse", S&P 2019): per candidate class, optimise a
    mask + pattern that flips the images to that class with the smallest mask; the backdoor
    target needs an anomalously small mask (anomaly index by median absolute deviation). The
    proxies are the synthetic images stamped with the inverted trigger(s).

Every proxy image is labelled with the model's prediction on its CLEAN source image, never
with the adversarial prediction (which is the backdoor target when the attack worked).

Images are in the model's normalised input space (see :mod:`.synthesis`); ``eps`` and masks
are in [0, 1] pixel units and converted through ``std`` per channel; every proxy is clamped
to the valid pixel range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_core.progress import ProgressFn
from cnc_core.purify.synthesis import normalisation_bounds, to_tensor_stats

__all__ = [
    "INVERSION_USES",
    "PGDConfig",
    "PROXY_KINDS",
    "ProxyConfig",
    "ProxySet",
    "TriggerInversionConfig",
    "TriggerInversionResult",
    "UniversalConfig",
    "adversarial_histogram",
    "apply_trigger",
    "chosen_triggers",
    "class_histogram",
    "make_proxies",
    "pgd_attack",
    "perturbation_stamp",
    "predict",
    "proxies_from_inversion",
    "trigger_inversion",
    "trigger_stamp",
    "universal_perturbation",
]

Norm = float | tuple[float, ...]


#: ``TriggerInversionConfig.use``: which inverted triggers become proxies.
INVERSION_USES = ("suspected", "anomalous", "all")


@dataclass(frozen=True)
class PGDConfig:
    """Untargeted L-inf PGD; ``eps`` and ``alpha`` in [0, 1] pixel units."""

    eps: float = 8 / 255
    alpha: float | None = None  # step size; default eps / 4
    steps: int = 10
    random_start: bool = True
    batch_size: int = 256


@dataclass(frozen=True)
class UniversalConfig:
    """One L-inf perturbation for all images, optimised by signed gradient ascent."""

    eps: float = 0.1
    steps: int = 100
    alpha: float | None = None  # default eps / 10
    batch_size: int = 256


@dataclass(frozen=True)
class TriggerInversionConfig:
    """Neural-Cleanse trigger inversion on synthetic images.

    All candidate classes are optimised together in one batch (``images_per_class`` images
    each), which is what makes this affordable on CPU.
    """

    steps: int = 100
    lr: float = 0.1
    l1_weight: float = 0.01  # weight of the mask's L1 norm (sum over pixels)
    images_per_class: int = 32
    classes: tuple[int, ...] | None = None  # None: every class
    anomaly_threshold: float = 2.0  # NC flags an anomaly index above 2
    # Which inverted triggers make proxies: "suspected" (only the most anomalous class, also
    # when below threshold), "anomalous" (classes above threshold; falls back to suspected),
    # "all" (every class's trigger, each image stamped with one at random).
    use: str = "suspected"


@dataclass(frozen=True)
class ProxyConfig:
    """Which proxy kind to build and its settings."""

    kind: str = "trigger_inversion"
    pgd: PGDConfig = field(default_factory=PGDConfig)
    universal: UniversalConfig = field(default_factory=UniversalConfig)
    inversion: TriggerInversionConfig = field(default_factory=TriggerInversionConfig)
    seed: int = 0


@dataclass
class TriggerInversionResult:
    """Per-class inverted triggers and the Neural-Cleanse outlier statistics."""

    classes: list[int]
    masks: Tensor  # (K, 1, H, W) in [0, 1]
    patterns: Tensor  # (K, C, H, W) pixel values in [0, 1]
    mask_norms: list[float]  # L1 norm of each mask
    success: list[float]  # share of images flipped to the class by its trigger
    anomaly_indices: list[float]  # (median - norm) / (1.4826 * MAD), per class
    anomaly_index: float  # of the suspected class
    suspected_target: int


@dataclass
class ProxySet:
    """Proxy images with the labels to train on, and the detection signal."""

    kind: str
    images: Tensor  # normalised space
    labels: Tensor  # model's prediction on each CLEAN source image
    adv_pred: Tensor  # model's prediction on each proxy image
    histogram: list[int]  # class histogram of adv_pred over flipped proxies
    suspected_target: int
    share: float  # share of flipped proxies predicted as suspected_target
    flip_rate: float  # share of proxies whose prediction differs from the clean one
    inversion: TriggerInversionResult | None = None
    universal: Tensor | None = None  # the perturbation, normalised space, (1, C, H, W)
    # Triggers stamped beside the inverted ones ((K, 1, H, W) masks, (K, C, H, W) patterns),
    # e.g. the permutation trigger of :mod:`.permutation`, and what found them
    extra_triggers: tuple[Tensor, Tensor] | None = None
    permutation_record: dict[str, Any] | None = None
    # An input-dependent trigger generator (:mod:`.dynamic`) stamped beside them, and its record
    dynamic_generator: nn.Module | None = None
    dynamic_record: dict[str, Any] | None = None
    # A warp trigger (:mod:`.warp`, a (H, W, 2) field) stamped beside them, and its record
    warp_field: Tensor | None = None
    warp_record: dict[str, Any] | None = None
    # A warp that drives the teacher cleaning in place of the inverted trigger
    # (``PurifyConfig.warp_use``); its class is ``warp_record["suspected_target"]``
    cleaning_warp: Tensor | None = None
    # Neural Cleanse's inverted trigger is left out of the stamps: a warp past its gate named
    # another class (``PurifyConfig.misnamed_inverted``)
    inverted_dropped: bool = False


def _reporter(progress: ProgressFn | None, stage: str) -> Callable[[float], None]:
    if progress is None:
        return lambda f: None
    return lambda f: progress(stage, f)


class _Frozen:
    """Context: eval mode and no parameter gradients, restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.training)
        for p, f in zip(self.model.parameters(), self.flags, strict=True):
            p.requires_grad_(f)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Arg-max predictions of ``model`` (put in eval mode, restored) on ``images``."""
    was = model.training
    model.eval()
    try:
        out = [
            model(images[i : i + batch_size]).argmax(1)
            for i in range(0, images.shape[0], batch_size)
        ]
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=images.device)


def class_histogram(preds: Tensor, num_classes: int) -> list[int]:
    """Counts of each class among ``preds``."""
    return torch.bincount(preds.flatten().cpu(), minlength=num_classes).tolist()


def pgd_attack(
    model: nn.Module,
    images: Tensor,
    config: PGDConfig,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    stage: str = "proxies",
) -> Tensor:
    """Untargeted L-inf PGD away from ``labels`` (default: the model's clean prediction).

    ``eps``/``alpha`` are pixel units, converted to normalised units through ``std``;
    results are clamped to the valid pixel range. Progress is reported once per step.
    """
    device = images.device
    c = images.shape[1]
    s = to_tensor_stats(std, c, device)
    lo, hi = normalisation_bounds(mean, std, c, device)
    eps = config.eps / s
    alpha = (config.alpha if config.alpha is not None else config.eps / 4) / s
    if labels is None:
        labels = predict(model, images)
    report = _reporter(progress, stage)
    n_batches = -(-images.shape[0] // config.batch_size)
    total = max(n_batches * config.steps, 1)
    done = 0
    out = []
    with _Frozen(model):
        for start in range(0, images.shape[0], config.batch_size):
            x0 = images[start : start + config.batch_size]
            y = labels[start : start + config.batch_size]
            if config.random_start:
                noise = torch.rand(x0.shape, generator=generator).to(device) * 2 - 1
                x = x0 + noise * eps
            else:
                x = x0.clone()
            x = torch.max(torch.min(x, hi), lo)
            for _ in range(config.steps):
                x.requires_grad_(True)
                loss = F.cross_entropy(model(x), y)
                (grad,) = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    x = x + alpha * grad.sign()
                    x = torch.max(torch.min(x, x0 + eps), x0 - eps)
                    x = torch.max(torch.min(x, hi), lo)
                done += 1
                report(done / total)
            out.append(x.detach())
    report(1.0)
    return torch.cat(out)


def universal_perturbation(
    model: nn.Module,
    images: Tensor,
    config: UniversalConfig,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    stage: str = "proxies",
) -> Tensor:
    """One L-inf perturbation (normalised units, ``(1, C, H, W)``) that flips most images.

    Signed-gradient ascent on the mean cross-entropy w.r.t. ``labels`` (default: clean
    predictions), one minibatch per step, cycling through ``images`` in a seeded order.
    """
    device = images.device
    c, h, w = images.shape[1:]
    s = to_tensor_stats(std, c, device)
    lo, hi = normalisation_bounds(mean, std, c, device)
    eps = config.eps / s
    alpha = (config.alpha if config.alpha is not None else config.eps / 10) / s
    if labels is None:
        labels = predict(model, images)
    report = _reporter(progress, stage)
    delta = torch.zeros(1, c, h, w, device=device)
    order = torch.randperm(images.shape[0], generator=generator).to(device)
    n = images.shape[0]
    with _Frozen(model):
        for step in range(config.steps):
            start = (step * config.batch_size) % n
            idx = order[start : start + config.batch_size]
            delta.requires_grad_(True)
            x = torch.max(torch.min(images[idx] + delta, hi), lo)
            loss = F.cross_entropy(model(x), labels[idx])
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = torch.max(torch.min(delta + alpha * grad.sign(), eps), -eps)
            report((step + 1) / max(config.steps, 1))
    report(1.0)
    return delta.detach()


def apply_trigger(
    images: Tensor, mask: Tensor, pattern: Tensor, *, mean: Norm = 0.0, std: Norm = 1.0
) -> Tensor:
    """Stamp a pixel-space trigger on normalised images: ``x' = (1 - m) x + m p``.

    ``mask`` is ``(1, H, W)`` or ``(N, 1, H, W)`` in [0, 1]; ``pattern`` ``(C, H, W)`` or
    ``(N, C, H, W)`` in [0, 1]. Returns normalised images.
    """
    c = images.shape[1]
    m = to_tensor_stats(mean, c, images.device)
    s = to_tensor_stats(std, c, images.device)
    pix = images * s + m
    stamped = (1 - mask) * pix + mask * pattern
    return (stamped.clamp(0, 1) - m) / s


def _mad_anomaly(norms: Tensor) -> Tensor:
    """Neural Cleanse's anomaly index, positive for masks smaller than the median."""
    med = norms.median()
    mad = (norms - med).abs().median() * 1.4826
    return (med - norms) / mad.clamp_min(1e-12)


def trigger_inversion(
    model: nn.Module,
    images: Tensor,
    config: TriggerInversionConfig,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    stage: str = "proxies",
) -> TriggerInversionResult:
    """Neural Cleanse (Wang et al., S&P 2019) on synthetic images, all classes in one batch.

    For each candidate class k, optimise ``mask_k`` (sigmoid-parametrised, ``(1, H, W)``) and
    ``pattern_k`` (``(C, H, W)``, pixel units) with Adam to minimise
    ``CE(f((1 - m) x + m p), k) + l1_weight * |m|_1``. The class whose mask is anomalously
    small (largest MAD anomaly index) is the suspected backdoor target.
    """
    device = images.device
    c, h, w = images.shape[1:]
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(images[:1]).shape[1])
    classes = list(config.classes) if config.classes is not None else list(range(num_classes))
    k = len(classes)
    per = min(config.images_per_class, images.shape[0])
    m = to_tensor_stats(mean, c, device)
    s = to_tensor_stats(std, c, device)
    # Initialise as NC does: a mid-size mask and a random pattern
    mask_raw = torch.zeros(k, 1, h, w, device=device)
    pattern_raw = (torch.rand(k, c, h, w, generator=generator) * 2 - 1).to(device)
    mask_raw.requires_grad_(True)
    pattern_raw.requires_grad_(True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=config.lr, betas=(0.5, 0.9))
    target = torch.tensor(classes, device=device).repeat_interleave(per)
    report = _reporter(progress, stage)
    n = images.shape[0]
    with _Frozen(model):
        for step in range(config.steps):
            idx = torch.randint(0, n, (per,), generator=generator).to(device)
            pix = images[idx] * s + m  # (per, C, H, W)
            mask = torch.sigmoid(mask_raw)
            pattern = torch.sigmoid(pattern_raw)
            # (K, per, C, H, W) -> (K*per, C, H, W)
            stamped = (1 - mask[:, None]) * pix[None] + (mask * pattern)[:, None]
            x = ((stamped - m) / s).reshape(k * per, c, h, w)
            ce = F.cross_entropy(model(x), target, reduction="none").reshape(k, per).mean(1)
            l1 = mask.reshape(k, -1).sum(1)
            loss = (ce + config.l1_weight * l1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report((step + 1) / max(config.steps, 1) * 0.95)
        with torch.no_grad():
            mask = torch.sigmoid(mask_raw).detach()
            pattern = torch.sigmoid(pattern_raw).detach()
            norms = mask.reshape(k, -1).sum(1)
            # Success rate on (up to) 256 images, per class
            probe = images[: min(n, 256)]
            success = []
            for j, cls in enumerate(classes):
                stamped = apply_trigger(probe, mask[j], pattern[j], mean=mean, std=std)
                success.append(float((predict(model, stamped) == cls).float().mean()))
    anomaly = _mad_anomaly(norms.cpu())
    best = int(torch.argmax(anomaly))
    report(1.0)
    return TriggerInversionResult(
        classes=classes,
        masks=mask,
        patterns=pattern,
        mask_norms=norms.cpu().tolist(),
        success=success,
        anomaly_indices=anomaly.tolist(),
        anomaly_index=float(anomaly[best]),
        suspected_target=classes[best],
    )


def _summarise(
    kind: str,
    model: nn.Module,
    images: Tensor,
    proxies: Tensor,
    clean_pred: Tensor,
    num_classes: int,
) -> ProxySet:
    adv = predict(model, proxies)
    flipped = adv != clean_pred
    hist = class_histogram(adv[flipped], num_classes)
    n_flip = int(flipped.sum())
    top = int(torch.tensor(hist).argmax()) if n_flip else 0
    return ProxySet(
        kind=kind,
        images=proxies,
        labels=clean_pred,
        adv_pred=adv,
        histogram=hist,
        suspected_target=top,
        share=hist[top] / n_flip if n_flip else 0.0,
        flip_rate=n_flip / max(images.shape[0], 1),
    )


def _pgd_proxies(
    model: nn.Module,
    images: Tensor,
    config: ProxyConfig,
    mean: Norm,
    std: Norm,
    num_classes: int,
    gen: torch.Generator,
    progress: ProgressFn | None,
    stage: str,
) -> ProxySet:
    clean = predict(model, images)
    adv = pgd_attack(
        model,
        images,
        config.pgd,
        mean=mean,
        std=std,
        labels=clean,
        generator=gen,
        progress=progress,
        stage=stage,
    )
    return _summarise("pgd", model, images, adv, clean, num_classes)


def _universal_proxies(
    model: nn.Module,
    images: Tensor,
    config: ProxyConfig,
    mean: Norm,
    std: Norm,
    num_classes: int,
    gen: torch.Generator,
    progress: ProgressFn | None,
    stage: str,
) -> ProxySet:
    clean = predict(model, images)
    delta = universal_perturbation(
        model,
        images,
        config.universal,
        mean=mean,
        std=std,
        labels=clean,
        generator=gen,
        progress=progress,
        stage=stage,
    )
    lo, hi = normalisation_bounds(mean, std, images.shape[1], images.device)
    adv = torch.max(torch.min(images + delta, hi), lo)
    out = _summarise("universal", model, images, adv, clean, num_classes)
    out.universal = delta
    return out


def proxies_from_inversion(
    model: nn.Module,
    images: Tensor,
    inversion: TriggerInversionResult,
    *,
    use: str = "suspected",
    anomaly_threshold: float = 2.0,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
) -> ProxySet:
    """Stamp inverted triggers on ``images``; labels are ``model``'s clean predictions.

    ``use`` picks the triggers (see :class:`TriggerInversionConfig`); with several, each image
    gets one at random.
    """
    chosen = chosen_triggers(inversion, use, anomaly_threshold)
    if num_classes is None:
        num_classes = _num_outputs(model, images)
    clean = predict(model, images)
    pick = torch.tensor(chosen)[
        torch.randint(0, len(chosen), (images.shape[0],), generator=generator)
    ].to(images.device)
    masks = inversion.masks.to(images.device)[pick]
    patterns = inversion.patterns.to(images.device)[pick]
    proxies = apply_trigger(images, masks, patterns, mean=mean, std=std)
    out = _summarise("trigger_inversion", model, images, proxies, clean, num_classes)
    out.inversion = inversion
    # The detection signal of this kind is the inversion itself, not the flip histogram
    out.suspected_target = inversion.suspected_target
    return out


def chosen_triggers(
    inversion: TriggerInversionResult, use: str = "suspected", anomaly_threshold: float = 2.0
) -> list[int]:
    """Indices (into ``inversion.classes``) of the triggers ``use`` selects."""
    if use == "all":
        return list(range(len(inversion.classes)))
    if use == "anomalous":
        return [j for j, a in enumerate(inversion.anomaly_indices) if a > anomaly_threshold] or [
            inversion.classes.index(inversion.suspected_target)
        ]
    if use == "suspected":
        return [inversion.classes.index(inversion.suspected_target)]
    raise ValueError(f"unknown inversion use {use!r}")


def trigger_stamp(
    masks: Tensor, patterns: Tensor, *, mean: Norm = 0.0, std: Norm = 1.0
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """A ``stamp(images, generator)`` function putting one of ``K`` triggers on each image.

    ``masks`` ``(K, 1, H, W)`` and ``patterns`` ``(K, C, H, W)`` in pixel units; each image
    gets a trigger drawn at random (with ``generator``).
    """
    masks, patterns = masks.detach(), patterns.detach()

    def stamp(images: Tensor, generator: torch.Generator) -> Tensor:
        pick = torch.randint(0, masks.shape[0], (images.shape[0],), generator=generator)
        pick = pick.to(masks.device)
        return apply_trigger(
            images,
            masks[pick].to(images.device),
            patterns[pick].to(images.device),
            mean=mean,
            std=std,
        )

    return stamp


@torch.no_grad()
def mean_difference_pattern(
    model: nn.Module, images: Tensor, target: int, *, mean: Norm = 0.0, std: Norm = 1.0
) -> Tensor | None:
    """A blend-trigger estimate from synthetic images: the pixel-space mean of the images
    ``model`` assigns to ``target`` minus the mean of the rest, min-max scaled to [0, 1].

    ZeroQ images carry the trigger (they match BN statistics of poisoned training data, and
    the backdoored model assigns ~2x the natural share of them to the target,
    explore-purify.md 3), so what the target's images have in common beyond the other
    classes' is partly the trigger. ``(C, H, W)``, or None when either group is empty.
    """
    pred = predict(model, images)
    c = images.shape[1]
    pix = images * to_tensor_stats(std, c, images.device) + to_tensor_stats(mean, c, images.device)
    inside, outside = pix[pred == target], pix[pred != target]
    if not inside.shape[0] or not outside.shape[0]:
        return None
    d = inside.mean(0) - outside.mean(0)
    return (d - d.min()) / (d.max() - d.min()).clamp_min(1e-12)


def blend_triggers(patterns: Tensor, alpha: float, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Masks and patterns (for :func:`trigger_stamp`) blending each of ``patterns``
    ``(K, C, H, W)`` over the whole image at opacity ``alpha``: ``x' = (1 - a) x + a p``."""
    masks = torch.full((patterns.shape[0], 1, *size), float(alpha), device=patterns.device)
    return masks, patterns


def perturbation_stamp(
    delta: Tensor, *, mean: Norm = 0.0, std: Norm = 1.0
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """A ``stamp`` adding a universal perturbation (normalised units), clamped to pixels."""

    def stamp(images: Tensor, generator: torch.Generator) -> Tensor:
        lo, hi = normalisation_bounds(mean, std, images.shape[1], images.device)
        return torch.max(torch.min(images + delta.to(images.device), hi), lo)

    return stamp


def mixed_stamp(
    stamps: list[Callable[[Tensor, torch.Generator], Tensor]],
) -> Callable[[Tensor, torch.Generator], Tensor]:
    """A ``stamp`` giving each image one of ``stamps``, drawn uniformly (so a family of
    one inverted trigger weighs as much as a family of several blend patterns)."""
    if len(stamps) == 1:
        return stamps[0]

    def stamp(images: Tensor, generator: torch.Generator) -> Tensor:
        pick = torch.randint(0, len(stamps), (images.shape[0],), generator=generator)
        out = images.clone()
        for j, fn in enumerate(stamps):
            idx = torch.nonzero(pick == j).flatten().to(images.device)
            if idx.numel():
                out[idx] = fn(images[idx], generator)
        return out

    return stamp


@torch.no_grad()
def _num_outputs(model: nn.Module, images: Tensor) -> int:
    was = model.training
    model.eval()
    try:
        return int(model(images[:1]).shape[1])
    finally:
        model.train(was)


def _inversion_proxies(
    model: nn.Module,
    images: Tensor,
    config: ProxyConfig,
    mean: Norm,
    std: Norm,
    num_classes: int,
    gen: torch.Generator,
    progress: ProgressFn | None,
    stage: str,
) -> ProxySet:
    inv_cfg = config.inversion
    if inv_cfg.use not in INVERSION_USES:
        raise ValueError(f"unknown inversion use {inv_cfg.use!r}")
    inv = trigger_inversion(
        model,
        images,
        inv_cfg,
        mean=mean,
        std=std,
        num_classes=num_classes,
        generator=gen,
        progress=progress,
        stage=stage,
    )
    return proxies_from_inversion(
        model,
        images,
        inv,
        use=inv_cfg.use,
        anomaly_threshold=inv_cfg.anomaly_threshold,
        mean=mean,
        std=std,
        num_classes=num_classes,
        generator=gen,
    )


ProxyBuilder = Callable[
    [nn.Module, Tensor, ProxyConfig, Norm, Norm, int, torch.Generator, ProgressFn | None, str],
    ProxySet,
]

#: Registry of proxy kinds: name -> builder.
PROXY_KINDS: dict[str, ProxyBuilder] = {
    "pgd": _pgd_proxies,
    "universal": _universal_proxies,
    "trigger_inversion": _inversion_proxies,
}


def make_proxies(
    model: nn.Module,
    images: Tensor,
    config: ProxyConfig,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    num_classes: int | None = None,
    progress: ProgressFn | None = None,
    stage: str = "proxies",
) -> ProxySet:
    """Build proxy images of ``config.kind`` from synthetic ``images`` against ``model``.

    ``model`` is not changed (eval mode during the attack; mode restored). Labels are the
    model's predictions on the clean sources.
    """
    if config.kind not in PROXY_KINDS:
        raise ValueError(f"unknown proxy kind {config.kind!r}; one of {sorted(PROXY_KINDS)}")
    if num_classes is None:
        with torch.no_grad():
            was = model.training
            model.eval()
            num_classes = int(model(images[:1]).shape[1])
            model.train(was)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    return PROXY_KINDS[config.kind](
        model, images, config, mean, std, num_classes, gen, progress, stage
    )


def adversarial_histogram(
    model: nn.Module,
    images: Tensor,
    config: PGDConfig | None = None,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stage: str = "detect",
) -> tuple[list[int], int, float]:
    """Data-free detection signal: class histogram of PGD predictions on synthetic images.

    Returns ``(histogram, top class, share of flipped images in the top class)``.
    """
    cfg = ProxyConfig(kind="pgd", pgd=config or PGDConfig(), seed=seed)
    ps = make_proxies(model, images, cfg, mean=mean, std=std, progress=progress, stage=stage)
    return ps.histogram, ps.suspected_target, ps.share
