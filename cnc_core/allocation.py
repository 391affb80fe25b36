"""Rank allocation: how many rank components each layer keeps to meet a parameter budget.

Phan et al. (ECCV 2024) compress ResNet-18 2x-4x in whole-model parameters but do not say
how ranks are spread across layers (method.md step 5, open). Every strategy here is a
monotone family ``ranks(layer, theta)`` for ``theta`` in ``[0, 1]``: larger ``theta`` keeps
more. :func:`cnc_core.compress.compress` finds the largest ``theta`` that meets the budget
by bisection, so one knob serves every strategy and the achieved ratio is exact.

- ``keep_ratio``: one global fraction of each mode's full rank (the natural reading).
- ``threshold``: one global threshold ``1 - theta`` on *normalised* singular values; layers
  whose spectrum decays fast lose more.
- ``energy``: each layer keeps the fewest components holding a fraction ``theta`` of its
  spectral energy (sum of squared singular values).
- ``full``: keep every rank (scaling only; no compression).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cnc_core.registry import Registry
from cnc_core.scaling import normalise


@dataclass(frozen=True)
class Spectrum:
    """What an allocator sees of one layer: its singular values per mode (descending).

    For a truncated-SVD layer both modes are the same spectrum.
    """

    s_out: Tensor
    s_in: Tensor


RankRule = Callable[[Spectrum, float], tuple[int, int]]
ALLOCATORS: Registry[RankRule] = Registry("rank allocation")


def _keep(values: Tensor, theta: float) -> int:
    return max(1, min(values.numel(), math.ceil(theta * values.numel() - 1e-9)))


@ALLOCATORS.register("keep_ratio")
def keep_ratio(spectrum: Spectrum, theta: float) -> tuple[int, int]:
    """``ceil(theta * full_rank)`` per mode (at least 1)."""
    return _keep(spectrum.s_out, theta), _keep(spectrum.s_in, theta)


def _above(s: Tensor, threshold: float) -> int:
    return max(1, int((normalise(s) >= threshold - 1e-12).sum()))


@ALLOCATORS.register("threshold")
def threshold(spectrum: Spectrum, theta: float) -> tuple[int, int]:
    """Keep components whose normalised singular value is at least ``1 - theta``."""
    return _above(spectrum.s_out, 1.0 - theta), _above(spectrum.s_in, 1.0 - theta)


def _energy_rank(s: Tensor, theta: float) -> int:
    energy = torch.cumsum(s.double() ** 2, 0)
    total = float(energy[-1]) if energy.numel() else 0.0
    if total <= 0:
        return 1
    needed = int((energy / total < theta - 1e-12).sum()) + 1
    return max(1, min(s.numel(), needed))


@ALLOCATORS.register("energy")
def energy(spectrum: Spectrum, theta: float) -> tuple[int, int]:
    """Fewest leading components holding ``theta`` of the spectral energy, per mode."""
    return _energy_rank(spectrum.s_out, theta), _energy_rank(spectrum.s_in, theta)


@ALLOCATORS.register("full")
def full(spectrum: Spectrum, theta: float) -> tuple[int, int]:
    """Every component (use with a scaling rule for purification without compression)."""
    return int(spectrum.s_out.numel()), int(spectrum.s_in.numel())


def bisect_theta(total_params: Callable[[float], int], budget: int, iterations: int = 50) -> float:
    """Largest ``theta`` in ``[0, 1]`` with ``total_params(theta) <= budget``.

    ``total_params`` must be non-decreasing in ``theta``; the caller checks that
    ``total_params(0) <= budget`` first.
    """
    if total_params(1.0) <= budget:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if total_params(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
