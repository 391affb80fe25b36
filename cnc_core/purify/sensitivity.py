"""Rank-level sensitivity to trigger patterns: find and suppress trigger-responsive ranks.

C&C (Phan et al., ECCV 2024) argues that a backdoor lives in a few rank components of the
Tucker-2 factorised layers, which respond to the trigger far more than to clean inputs. With
no real data, the triggered inputs are proxies (inverted triggers or adversarial
perturbations stamped on synthetic images, :mod:`.proxies`) paired with their clean sources.

For every rank component ``i`` of a factorised layer (the output channels of a
:class:`~cnc_core.layers.Tucker2Conv2d`'s ``core`` are the R1 mode-1 components, the output
channels of its ``first`` 1x1 conv the R2 mode-2 components; ``first`` of the low-rank SVD
layers too) the score is

    score_i = mean |a_i(x') - a_i(x)| / mean |a_i(x)|

over paired proxy ``x'`` and clean ``x`` images and all spatial positions. Components whose
score is an outlier in their layer (above ``median + u * 1.4826 * MAD``) are pruned (their
weights zeroed) or scaled down. Optionally plain conv channels (``include_dense``) are scored
the same way, which is activation-based pruning in the spirit of Fine-Pruning (Liu et al.,
RAID 2018) but driven by proxies instead of clean data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cnc_core.layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from cnc_core.progress import ProgressFn

__all__ = [
    "SENSITIVITY_ACTIONS",
    "SensitivityConfig",
    "SensitivityResult",
    "apply_suppression",
    "rank_components",
    "rank_sensitivity",
    "strongest_first",
    "suppress_sensitive_ranks",
]

#: ``SensitivityConfig.action``: what happens to an outlier component.
SENSITIVITY_ACTIONS = ("prune", "scale")


@dataclass(frozen=True)
class SensitivityConfig:
    """Outlier rule and what to do with the outliers."""

    u: float = 3.0  # outlier threshold in robust standard deviations (MAD)
    max_fraction: float = 0.1  # at most this share of a layer's components is touched
    min_score: float = 0.0  # ignore components whose raw score is below this
    action: str = "prune"  # "prune" (factor 0) | "scale" (factor clean / (clean + delta))
    include_dense: bool = False  # also score output channels of plain Conv2d layers
    batch_size: int = 128


@dataclass
class SensitivityResult:
    """Scores per component and, per component group, the indices suppressed + factors."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    suppressed: dict[str, list[int]] = field(default_factory=dict)
    factors: dict[str, list[float]] = field(default_factory=dict)
    # per suppressed component, how far its score lies above its layer's median in robust
    # standard deviations (MADs): the order in which a partial suppression takes them
    strengths: dict[str, list[float]] = field(default_factory=dict)

    @property
    def num_suppressed(self) -> int:
        return sum(len(v) for v in self.suppressed.values())


def rank_components(model: nn.Module, include_dense: bool = False) -> dict[str, nn.Module]:
    """Component groups: name -> the module whose output channels are the components.

    ``"<layer>.core"`` (mode-1 ranks) and ``"<layer>.first"`` (mode-2 ranks) for Tucker-2
    layers, ``"<layer>.first"`` for low-rank SVD layers, and plain ``nn.Conv2d`` (when
    ``include_dense``) outside factorised layers.
    """
    groups: dict[str, nn.Module] = {}
    inside: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, Tucker2Conv2d):
            groups[f"{name}.core"] = m.core
            groups[f"{name}.first"] = m.first
            inside.update(id(c) for c in m.modules())
        elif isinstance(m, LowRankConv1x1 | LowRankLinear):
            groups[f"{name}.first"] = m.first
            inside.update(id(c) for c in m.modules())
    if include_dense:
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and id(m) not in inside and m.groups == 1:
                groups[name] = m
    return groups


@torch.no_grad()
def rank_sensitivity(
    model: nn.Module,
    clean: Tensor,
    proxies: Tensor,
    config: SensitivityConfig,
    *,
    progress: ProgressFn | None = None,
    stage: str = "sensitivity",
) -> dict[str, Tensor]:
    """Per-component trigger sensitivity score (see module docstring), in eval mode.

    ``clean`` and ``proxies`` are paired: ``proxies[n]`` is ``clean[n]`` with a trigger.
    """
    if clean.shape != proxies.shape:
        raise ValueError("clean and proxy images must be paired (same shape)")
    groups = rank_components(model, config.include_dense)
    sums: dict[str, list[Tensor]] = {}
    current: dict[str, Tensor] = {}
    handles = []

    def hook(name: str):  # noqa: ANN202 - hook factory
        def fn(_m: nn.Module, _i: tuple[Tensor, ...], out: Tensor) -> None:
            current[name] = out.detach()

        return fn

    for name, module in groups.items():
        handles.append(module.register_forward_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        n = clean.shape[0]
        for start in range(0, n, config.batch_size):
            model(clean[start : start + config.batch_size])
            a_clean = dict(current)
            model(proxies[start : start + config.batch_size])
            for name, a in a_clean.items():
                b = current[name]
                dims = [0] + list(range(2, a.dim()))  # all but the channel axis
                mag = a.abs().sum(dims)
                delta = (b - a).abs().sum(dims)
                count = torch.tensor(float(a.numel() // a.shape[1]))
                if name in sums:
                    sums[name][0] += mag
                    sums[name][1] += delta
                    sums[name][2] += count
                else:
                    sums[name] = [mag, delta, count]
            if progress is not None:
                progress(stage, min((start + config.batch_size) / max(n, 1), 1.0) * 0.9)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {
        name: (delta / cnt) / (mag / cnt).clamp_min(1e-8)
        for name, (mag, delta, cnt) in sums.items()
    }


def _outliers(score: Tensor, config: SensitivityConfig) -> tuple[Tensor, Tensor]:
    """The outlier components' indices (sorted) and their strengths in MADs."""
    med = score.median()
    mad = ((score - med).abs().median() * 1.4826).clamp_min(1e-8)
    idx = torch.nonzero((score > med + config.u * mad) & (score > config.min_score)).flatten()
    cap = max(1, int(config.max_fraction * score.numel()))
    if idx.numel() > cap:
        idx = idx[torch.argsort(score[idx], descending=True)[:cap]]
    idx = torch.sort(idx).values
    return idx, (score[idx] - med) / mad


def suppress_sensitive_ranks(
    model: nn.Module,
    clean: Tensor,
    proxies: Tensor,
    config: SensitivityConfig,
    *,
    progress: ProgressFn | None = None,
    stage: str = "sensitivity",
) -> SensitivityResult:
    """Score every rank component and prune/scale the outliers (``model`` changed in place).

    Scaling component ``i`` multiplies the output channel ``i`` of its module (a row of the
    core's mode-1 unfolding, or of ``U2^T``), exactly the per-component scaling of C&C step 3
    but chosen by the proxies' response rather than by the singular value.
    """
    if config.action not in SENSITIVITY_ACTIONS:
        raise ValueError(f"action must be 'prune' or 'scale', not {config.action!r}")
    scores = rank_sensitivity(model, clean, proxies, config, progress=progress, stage=stage)
    result = SensitivityResult()
    with torch.no_grad():
        for name, score in scores.items():
            result.scores[name] = score.tolist()
            idx, strength = _outliers(score, config)
            if idx.numel() == 0:
                continue
            # "scale" shrinks the response to the trigger back towards the clean magnitude
            f = torch.zeros(idx.numel()) if config.action == "prune" else 1.0 / (1.0 + score[idx])
            result.suppressed[name] = idx.tolist()
            result.factors[name] = f.tolist()
            result.strengths[name] = strength.tolist()
    apply_suppression(model, result.suppressed, result.factors, config.include_dense)
    if progress is not None:
        progress(stage, 1.0)
    return result


def strongest_first(result: SensitivityResult) -> list[tuple[str, int, float]]:
    """Every suppressed component of ``result`` as ``(group, index, factor)``, the strongest
    outlier (most MADs above its layer's median) first."""
    items = [
        (strength, name, i, f)
        for name, idx in result.suppressed.items()
        for i, f, strength in zip(idx, result.factors[name], result.strengths[name], strict=True)
    ]
    items.sort(key=lambda t: -t[0])
    return [(name, i, f) for _, name, i, f in items]


@torch.no_grad()
def apply_suppression(
    model: nn.Module,
    suppressed: dict[str, list[int]],
    factors: dict[str, list[float]],
    include_dense: bool,
) -> None:
    """Multiply each listed component's output channel by its factor (``model`` in place)."""
    groups = rank_components(model, include_dense)
    for name, idx_list in suppressed.items():
        if not idx_list:
            continue
        module = groups[name]
        weight = module.weight  # (out, ...)
        assert isinstance(weight, Tensor)
        idx = torch.tensor(idx_list, dtype=torch.long, device=weight.device)
        f = torch.tensor(factors[name], dtype=weight.dtype, device=weight.device)
        weight[idx] *= f.view((-1,) + (1,) * (weight.dim() - 1))
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor):
            bias[idx] *= f.to(bias.dtype)
