"""Singular-value scaling rules (Phan et al., ECCV 2024, steps 2-3).

Each layer's singular values are first normalised to the same range, ``s / max(s)``
(the paper's footnote: "sigma_norm ... normalizes the sing. values of all layers to same
range"). A rule then maps the normalised values to per-component factors in ``(0, 1]``
that multiply the matching rows of the Tucker-2 core. The paper's exact formula is open
(method.md step 3); every reading is registered here and chosen by measurement.

A rule is ``f(s_norm, t_scale) -> factors`` on a 1-D float64 tensor sorted descending.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cnc_core.registry import Registry

ScalingRule = Callable[[Tensor, float], Tensor]
SCALING_RULES: Registry[ScalingRule] = Registry("scaling rule")


def normalise(s: Tensor) -> Tensor:
    """``s / max(s)``; an all-zero spectrum stays zero."""
    top = s.max() if s.numel() else s.new_tensor(0.0)
    return s / top if float(top) > 0 else torch.zeros_like(s)


@SCALING_RULES.register("none")
def no_scaling(s_norm: Tensor, t_scale: float) -> Tensor:
    """Leave the spectrum as it is (compression only)."""
    return torch.ones_like(s_norm)


@SCALING_RULES.register("literal")
def literal_rule(s_norm: Tensor, t_scale: float) -> Tensor:
    """``min(T * s_norm / r, 1)`` as the poster prints it, ``r`` the 1-based component index.

    Reading (a) of method.md; likely garbled in print, kept for comparison.
    """
    r = torch.arange(1, s_norm.numel() + 1, dtype=s_norm.dtype, device=s_norm.device)
    return _positive(torch.clamp(t_scale * s_norm / r, max=1.0))


@SCALING_RULES.register("proportional")
def proportional_rule(s_norm: Tensor, t_scale: float) -> Tensor:
    """``min(T * s_norm, 1)``: components whose normalised value is below ``1/T`` shrink."""
    return _positive(torch.clamp(t_scale * s_norm, max=1.0))


@SCALING_RULES.register("clip")
def clip_rule(s_norm: Tensor, t_scale: float) -> Tensor:
    """``min(T / s_norm, 1)``: cap the normalised singular values at ``T``.

    Damps the dominant directions, which the paper links to trigger sensitivity (Fig. 1).
    """
    safe = torch.where(s_norm > 0, s_norm, torch.ones_like(s_norm))
    return torch.clamp(t_scale / safe, max=1.0)


def _positive(f: Tensor) -> Tensor:
    # A zero factor would make a kept component dead weight; keep it tiny instead.
    return torch.clamp(f, min=1e-6)


def scaling_factors(s: Tensor, rule: str, t_scale: float) -> Tensor:
    """Factors for raw singular values ``s`` under ``rule`` (normalising first)."""
    if t_scale <= 0:
        raise ValueError(f"t_scale must be positive, got {t_scale}")
    return SCALING_RULES.get(rule)(normalise(s), t_scale)
