"""A data-free check of the purified model: has Neural Cleanse's outlier gone?

Neural Cleanse (Wang et al., S&P 2019; :func:`.proxies.trigger_inversion`) finds, per class,
the smallest mask that flips clean synthetic images to that class; a backdoor target needs
an anomalously small one. The pipeline runs it on the original model; this check re-runs it
on the PURIFIED model, on the same images, and asks of the class the purification treated
as the target, where Neural Cleanse set it apart on the original (anomaly index at or above
``anomaly_threshold``): did its mask grow, against the other classes'? A removed backdoor
leaves its target as hard to reach as any class, so the target's mask grows several times
more than the median class's; a backdoor left in keeps it small. Verdicts:

- ``"residual"``: the checked class's mask grew less than ``min_relative_growth`` times
  the median class's growth, or (given the original model) its **blend reach** stayed: the
  mean-difference blend of :func:`.proxies.mean_difference_pattern` (what the original's
  synthetic images of the class have in common beyond the rest, blended in at
  ``blend_alpha``) still sends at least ``max_blend_kept`` of its share on the original to
  the class. A blend trigger's removal does not show in the mask (Neural Cleanse's
  patch-like trigger for it stops working while the blend still does: a width-8 Blended
  all-to-one kept 65% ASR with its target's mask grown 1.85x), it shows in the blend's
  reach (0.74 of it kept there, 0.05-0.36 where a backdoor went). The backdoor may remain;
  the report warns and names the class.
- ``"cleared"``: the checked class passed both.
- ``"unchecked"``: Neural Cleanse did not set the treated class apart on the original (an
  all-to-all or input-dependent backdoor, a warp, a clean model, or a target it missed),
  so there is nothing it can confirm gone. The searches that found such triggers act on
  them all the same; this check cannot vouch for their removal.

Why growth and not the purified model's own anomaly index: on a purified model the classes'
masks sit close together, so the median absolute deviation the index divides by is small and
the index swings with the seed. The purified width-16 BadNet all-to-one (2.8% ASR): its
target's index 2.29, 1.16 and 0.98 on three seeds, its relative growth 3.55, 3.77 and 3.54.
Classes that are outliers on the purified model only (``new_outliers``) are listed, not
flagged, for the same reason. So are the original's outliers other than the treated class
(``untreated_outliers``): Neural Cleanse also sets natural classes apart (the width-16
BadNet all-to-one through the CLI: its target 0 at 6.98, class 6, shirt, at 3.01), and a
natural class fails both tests, since nothing removed it; the check cannot tell a second
target from one. Without ``acted_on`` every outlier of the original is checked. What the
check caught and missed on the benchmark's models: ``bench/residual_check.py``,
bench/results/explore-purify.md 4ah.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnc_core.progress import ProgressFn
from cnc_core.purify.proxies import (
    Norm,
    TriggerInversionConfig,
    TriggerInversionResult,
    apply_trigger,
    blend_triggers,
    mean_difference_pattern,
    predict,
    trigger_inversion,
)

__all__ = ["VERDICTS", "VerifyConfig", "blend_reach", "residual_check"]

VERDICTS = ("residual", "cleared", "unchecked")


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of :func:`residual_check`."""

    # Neural Cleanse's settings on the purified model (the preset: those of the proxies)
    inversion: TriggerInversionConfig = field(default_factory=TriggerInversionConfig)
    # An anomaly index at or above this on the original is an outlier (NC's own bar)
    anomaly_threshold: float = 2.0
    # An outlier whose mask grew less than this multiple of the median class's growth is
    # still there
    min_relative_growth: float = 1.5
    # ... and one whose mean-difference blend (at this opacity) still sends at least this
    # fraction of its share on the original to the class, where that share was at least
    # ``min_blend_reach`` (a blend that does nothing on the original says nothing)
    blend_alpha: float = 0.3
    max_blend_kept: float = 0.5
    min_blend_reach: float = 0.2
    # Added to the purification seed: the re-inversion draws its own images and init
    seed_offset: int = 977


def _rounded(values: list[float], digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values]


def blend_reach(
    original: nn.Module,
    purified: nn.Module,
    images: Tensor,
    target: int,
    alpha: float,
    *,
    mean: Norm = 0.0,
    std: Norm = 1.0,
) -> tuple[float, float] | None:
    """The share of ``images`` (those each model does not already call ``target``) that the
    original's mean-difference blend for ``target`` sends to it, on the original and on the
    purified model; None where the original calls no image, or every image, ``target``."""
    pattern = mean_difference_pattern(original, images, target, mean=mean, std=std)
    if pattern is None:
        return None
    size = (int(images.shape[-2]), int(images.shape[-1]))
    masks, patterns = blend_triggers(pattern[None], alpha, size)
    stamped = apply_trigger(images, masks[0], patterns[0], mean=mean, std=std)
    shares = []
    for net in (original, purified):
        away = predict(net, images) != target
        moved = predict(net, stamped[away]) == target
        shares.append(float(moved.float().mean()) if away.any() else 0.0)
    return shares[0], shares[1]


def residual_check(
    model: nn.Module,
    images: Tensor,
    config: VerifyConfig,
    original: TriggerInversionResult,
    *,
    original_model: nn.Module | None = None,
    acted_on: int | None = None,
    mean: Norm = 0.0,
    std: Norm = 1.0,
    num_classes: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stage: str = "verify",
) -> dict[str, Any]:
    """Re-run Neural Cleanse on the purified ``model`` and name a verdict (module docstring).

    Parameters
    ----------
    model : nn.Module
        The purified model (not changed).
    images : Tensor
        Clean synthetic images, normalised space.
    original : TriggerInversionResult
        Neural Cleanse on the original model, over the same classes.
    original_model : nn.Module, optional
        The original model, for the blend reach (without it, the mask growth alone).
    acted_on : int, optional
        The class the purification treated as the target: the only class checked (where it
        was an outlier on the original). None: every outlier of the original is checked.

    Returns
    -------
    dict
        ``verdict``; ``checked`` (the treated class where it was an outlier on the original,
        or every outlier without ``acted_on``), ``flagged`` (those still there)
        with their ``reasons`` ("mask", "blend"), the ``blend_reach`` of the checked classes
        (original, purified); ``class``, the class the verdict is about (of the flagged, else
        the checked, the one with the largest anomaly index on the original; else the most
        anomalous on the purified model);
        every class's ``mask_growth`` (purified / original mask L1) and
        ``relative_growth`` (over the median class's), ``anomaly_indices``, ``mask_norms``
        and ``success`` on the purified model, the ``original_anomaly_indices``, and the
        ``new_outliers`` (outliers on the purified model only).
    """
    generator = torch.Generator().manual_seed(seed + config.seed_offset)
    inv = trigger_inversion(
        model,
        images,
        config.inversion,
        mean=mean,
        std=std,
        num_classes=num_classes,
        generator=generator,
        progress=progress,
        stage=stage,
    )
    if inv.classes != original.classes:
        raise ValueError(
            f"the original's inversion covers classes {original.classes}, "
            f"the purified model's {inv.classes}"
        )
    bar = config.anomaly_threshold
    growth = torch.tensor(inv.mask_norms) / torch.tensor(original.mask_norms).clamp_min(1e-6)
    # compression rescales every class's mask: each class's growth over the median class's
    relative = dict(zip(inv.classes, (growth / growth.median()).tolist(), strict=True))
    before = dict(zip(inv.classes, original.anomaly_indices, strict=True))
    after = dict(zip(inv.classes, inv.anomaly_indices, strict=True))
    outliers = [k for k in inv.classes if before[k] >= bar]
    # the treated class only, where one is named: a natural class Neural Cleanse also sets
    # apart fails both tests (nothing removed it), so it is listed, not checked
    checked = outliers if acted_on is None else [k for k in outliers if k == acted_on]
    reach: dict[int, tuple[float, float]] = {}
    if original_model is not None:
        for k in checked:
            shares = blend_reach(
                original_model, model, images, k, config.blend_alpha, mean=mean, std=std
            )
            if shares is not None and shares[0] >= config.min_blend_reach:
                reach[k] = shares

    def failed(k: int) -> list[str]:
        """The tests class ``k`` fails: its mask hardly grew, its blend still reaches it."""
        tests = []
        if relative[k] < config.min_relative_growth:
            tests.append("mask")
        if k in reach and reach[k][1] >= config.max_blend_kept * reach[k][0]:
            tests.append("blend")
        return tests

    reasons = {k: failed(k) for k in checked}
    flagged = [k for k in checked if reasons[k]]
    if checked:  # the verdict is about the clearest outlier of the original among them
        shown = max(flagged or checked, key=before.__getitem__)
        verdict = "residual" if flagged else "cleared"
    else:
        shown, verdict = inv.suspected_target, "unchecked"
    record: dict[str, Any] = {
        "verdict": verdict,
        "class": shown,
        "relative_growth_of_class": round(relative[shown], 3),
        "anomaly_index": round(after[shown], 4),
        "checked": checked,
        "flagged": flagged,
        "reasons": {str(k): reasons[k] for k in flagged},
        "blend_reach": {str(k): [round(a, 4), round(b, 4)] for k, (a, b) in reach.items()},
        "new_outliers": [k for k in inv.classes if after[k] >= bar and before[k] < bar],
        "untreated_outliers": [k for k in outliers if k not in checked],
        "anomaly_threshold": bar,
        "min_relative_growth": config.min_relative_growth,
        "blend_alpha": config.blend_alpha,
        "max_blend_kept": config.max_blend_kept,
        "classes": inv.classes,
        "mask_growth": _rounded(growth.tolist(), 3),
        "relative_growth": _rounded(list(relative.values()), 3),
        "anomaly_indices": _rounded(inv.anomaly_indices),
        "original_anomaly_indices": _rounded(original.anomaly_indices),
        "mask_norms": _rounded(inv.mask_norms, 2),
        "success": _rounded(inv.success),
    }
    if acted_on is not None:
        record["acted_on"] = acted_on
    return record
