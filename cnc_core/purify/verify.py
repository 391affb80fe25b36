"""A data-free check of the purified model: is any class still reached by a tiny trigger?

Neural Cleanse (Wang et al., S&P 2019; :func:`.proxies.trigger_inversion`) is re-run on the
PURIFIED model, on the same clean synthetic images. A backdoor that survived purification
still lets a far smaller mask flip images to its target than any natural class needs: that
class's anomaly index stays an outlier. The check compares it with Neural Cleanse's run on the
original (which the pipeline made anyway) and names a verdict:

- ``"outlier"``: some class's re-inverted trigger is anomalously small on the purified model
  (anomaly index at or above ``anomaly_threshold``). The backdoor may remain; the report says
  so and names the class.
- ``"none"``: no class stands out. This is evidence, not proof: an all-to-all or
  input-dependent backdoor has no single target and gives Neural Cleanse no outlier even
  before purification (bench/results/explore-purify.md 4g), so the check cannot see it.

The threshold and what the check caught and missed on the benchmark's models are measured in
``bench/residual_check.py`` (bench/results/explore-purify.md 4ah).
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
    trigger_inversion,
)

__all__ = ["VERDICTS", "VerifyConfig", "residual_check"]

VERDICTS = ("outlier", "none")


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of :func:`residual_check`."""

    # Neural Cleanse's settings on the purified model (the preset: those of the proxies)
    inversion: TriggerInversionConfig = field(default_factory=TriggerInversionConfig)
    # An anomaly index at or above this on the purified model is an outlier (NC's own bar)
    anomaly_threshold: float = 2.0
    # Added to the purification seed: the re-inversion draws its own images and init
    seed_offset: int = 977


def _rounded(values: list[float], digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values]


def residual_check(
    model: nn.Module,
    images: Tensor,
    config: VerifyConfig,
    *,
    original: TriggerInversionResult | None = None,
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
    original : TriggerInversionResult, optional
        Neural Cleanse on the original model, for the mask-growth figures.
    acted_on : int, optional
        The class the purification treated as the target.

    Returns
    -------
    dict
        ``verdict``, ``class`` (the most anomalous class on the purified model) and its
        ``anomaly_index``, every class's ``anomaly_indices``, ``mask_norms`` and
        ``success`` on the purified model; where ``original`` is given, each class's
        ``mask_growth`` (purified / original mask L1); where ``acted_on`` is given, its
        anomaly index on the purified model.
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
    flagged = inv.anomaly_index >= config.anomaly_threshold
    record: dict[str, Any] = {
        "verdict": "outlier" if flagged else "none",
        "class": inv.suspected_target,
        "anomaly_index": round(inv.anomaly_index, 4),
        "anomaly_threshold": config.anomaly_threshold,
        "classes": inv.classes,
        "anomaly_indices": _rounded(inv.anomaly_indices),
        "mask_norms": _rounded(inv.mask_norms, 2),
        "success": _rounded(inv.success),
    }
    if original is not None and original.classes == inv.classes:
        record["mask_growth"] = [
            round(after / max(before, 1e-6), 3)
            for before, after in zip(original.mask_norms, inv.mask_norms, strict=True)
        ]
    if acted_on is not None and acted_on in inv.classes:
        record["acted_on"] = acted_on
        record["acted_on_anomaly_index"] = round(
            inv.anomaly_indices[inv.classes.index(acted_on)], 4
        )
    return record
