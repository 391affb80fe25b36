"""Compression: Tucker-2 / SVD of every eligible layer, spectrum scaling, rank pruning.

Phan et al., "Clean & Compact", ECCV 2024, steps 1-5 (see ``shared/method.md``). The
function walks the module tree, so it works on post- and pre-activation nets and on user
models outside the registry; it never needs to know the architecture.

Layer kinds decided by the walk:

- ``tucker2``: ``nn.Conv2d`` with ``groups == 1`` and a spatial kernel -> Tucker2Conv2d.
- ``svd``: ``nn.Linear`` and 1x1 ``nn.Conv2d`` -> two-layer truncated SVD (for these the
  two Tucker-2 modes share one spectrum).
- ``dense``: eligible but kept dense, because the factorised form would not be smaller at
  the allotted ranks, or because it is the image stem (``in_channels <= 4``: 64x3x3x3
  needs 2,466 params factorised vs 1,728 dense), which is only scaled.
- ``skipped``: depthwise / grouped convs (Tucker-2 does not apply) and the classifier (the
  last Conv2d/Linear registered), left exactly as they are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from cnc_core.allocation import ALLOCATORS, Spectrum, bisect_theta
from cnc_core.decompose import SVDFactors, Tucker2Factors, matrix_svd, tucker2_hosvd
from cnc_core.layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d, replace_module
from cnc_core.metrics import count_macs
from cnc_core.progress import ProgressFn, StagePlan
from cnc_core.scaling import SCALING_RULES, normalise, scaling_factors

STEM_MAX_IN_CHANNELS = 4


class CompressionError(ValueError):
    """The requested compression cannot be done (e.g. the ratio cannot be met)."""


#: ``CompressConfig.mac_allocation`` choices.
MAC_ALLOCATIONS = ("tilted", "shared")


@dataclass(frozen=True)
class CompressConfig:
    """How to compress.

    Give ``ratio`` (whole-model parameters, original / compact, >= 1) or
    ``param_budget`` (the most parameters the compact model may have), not both. With
    ``allocation="full"`` every rank is kept and no budget applies (scaling only).
    ``mac_ratio`` adds a second budget, on multiply-accumulates per image (original /
    compact): the allocation keeps the fewer ranks of the two budgets, and ``compress``
    then needs the input shape.
    """

    ratio: float | None = 3.0
    param_budget: int | None = None
    # Also hold MACs to at most original / mac_ratio (None: parameters only). Parameters
    # and MACs part ways where a layer runs at high resolution with few channels: the cnc
    # preset's response allocation keeps those dense, 25.1M MACs at 3x parameters against
    # 12.5M for one keep ratio everywhere (original 35.0M; explore-purify.md 4m).
    mac_ratio: float | None = None
    # How the MAC budget is met when it binds before the parameter one. "tilted": ranks
    # move from layers that run at high resolution (many MACs per parameter) to those at low
    # resolution, until the parameter budget is spent within the MAC budget (see
    # ``compress``). "shared": one allocation setting for both budgets, the fewer ranks of
    # the two (the parameter budget then goes partly unspent).
    mac_allocation: str = "tilted"
    allocation: str = "keep_ratio"  # see cnc_core.allocation.ALLOCATORS
    scaling: str = "none"  # see cnc_core.scaling.SCALING_RULES
    t_scale: float = 1.0  # the rule's threshold T_scale
    scale_stem: bool = True  # scale (never factorise) the image stem when scaling != none
    decompose_linear: bool = True  # truncated SVD of hidden Linear layers
    keep_dense_if_larger: bool = True  # False forces factorisation (exactness tests)
    # Layers holding less than this fraction of the largest layer's weights stay dense: they
    # save few parameters, and (few channels at high resolution) their factorised form is
    # memory-bound and often slower than the dense conv. Chosen by bench/compress.py.
    min_layer_share: float = 0.0
    # Round every kept rank up to a multiple of this (capped at the full rank): CPU conv
    # kernels (oneDNN) vectorise over channel blocks of 8/16, so a rank of 27 runs at the
    # speed of 32 anyway; the bisection then spends the budget on fewer, aligned layers.
    rank_multiple: int = 1
    exclude: tuple[str, ...] = ()  # module names to leave alone

    def validate(self) -> None:
        if self.allocation != "full" and (self.ratio is None) == (self.param_budget is None):
            raise CompressionError("give exactly one of ratio and param_budget")
        if self.ratio is not None and (not math.isfinite(self.ratio) or self.ratio < 1.0):
            raise CompressionError(
                f"ratio must be a number >= 1 (original / compact parameters), got {self.ratio}"
            )
        if self.param_budget is not None and self.param_budget <= 0:
            raise CompressionError(f"param_budget must be positive, got {self.param_budget}")
        if self.mac_ratio is not None:
            if not math.isfinite(self.mac_ratio) or self.mac_ratio < 1.0:
                raise CompressionError(
                    f"mac_ratio must be a number >= 1 (original / compact MACs), "
                    f"got {self.mac_ratio}"
                )
            if self.allocation == "full":
                raise CompressionError("mac_ratio needs a rank allocation, not 'full'")
        if self.mac_allocation not in MAC_ALLOCATIONS:
            raise CompressionError(
                f"mac_allocation must be one of {', '.join(MAC_ALLOCATIONS)}, "
                f"got {self.mac_allocation!r}"
            )
        ALLOCATORS.get(self.allocation)
        SCALING_RULES.get(self.scaling)
        if self.t_scale <= 0:
            raise CompressionError(f"t_scale must be positive, got {self.t_scale}")
        if not 0.0 <= self.min_layer_share < 1.0:
            raise CompressionError(f"min_layer_share must be in [0, 1), got {self.min_layer_share}")
        if not 1 <= self.rank_multiple <= 1024:
            raise CompressionError(f"rank_multiple must be in [1, 1024], got {self.rank_multiple}")


#: The :class:`CompressConfig` fields that are flat knobs: all but ``ratio`` and
#: ``param_budget`` (the caller sets the target).
COMPRESS_KNOBS = frozenset(f.name for f in fields(CompressConfig)) - {"ratio", "param_budget"}


def split_compress_knobs(knobs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split flat knobs into :class:`CompressConfig` keyword arguments (names in
    :data:`COMPRESS_KNOBS`) and the rest; a JSON list for ``exclude`` becomes the tuple the
    frozen config needs.
    """
    cc = {k: v for k, v in knobs.items() if k in COMPRESS_KNOBS}
    if "exclude" in cc:
        cc["exclude"] = tuple(cc["exclude"])
    return cc, {k: v for k, v in knobs.items() if k not in COMPRESS_KNOBS}


@dataclass
class LayerDecision:
    """What was done to one layer, with the spectra behind the decision."""

    name: str
    kind: str  # tucker2 | svd | dense | skipped
    module_type: str  # Conv2d | Linear
    weight_shape: tuple[int, ...]
    reason: str = ""
    full_ranks: tuple[int, int] = (0, 0)
    ranks: tuple[int, int] = (0, 0)
    params_before: int = 0  # weight + bias
    params_after: int = 0
    scaled: bool = False
    s_out: list[float] = field(default_factory=list)  # normalised, descending
    s_in: list[float] = field(default_factory=list)
    f_out: list[float] = field(default_factory=list)  # scaling factors applied
    f_in: list[float] = field(default_factory=list)

    def surgery(self) -> dict[str, Any]:
        """The replayable record (no spectra) stored in ``manifest.json``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "module_type": self.module_type,
            "weight_shape": list(self.weight_shape),
            "ranks": list(self.ranks),
            "full_ranks": list(self.full_ranks),
            "scaled": self.scaled,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "reason": self.reason,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressResult:
    """The compact model (a new module; the input is unchanged) and every decision."""

    model: nn.Module
    decisions: list[LayerDecision]
    params_before: int
    params_after: int
    target_params: int | None
    theta: float
    config: CompressConfig
    # what the allocator read: "weight" spectra, or "given" ones (``compress(spectra=...)``;
    # the purification pipeline names them, e.g. "response")
    spectra: str = "weight"
    # multiply-accumulates per image, where ``compress`` was given the input shape
    macs_before: int | None = None
    macs_after: int | None = None
    target_macs: int | None = None
    # the MAC tilt the allocation used (0: none; ``CompressConfig.mac_allocation``)
    mac_tilt: float = 0.0

    @property
    def achieved_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def surgery_record(self) -> list[dict[str, Any]]:
        return [d.surgery() for d in self.decisions if d.kind in ("tucker2", "svd")]

    def summary(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "target_params": self.target_params,
            "achieved_ratio": self.achieved_ratio,
            "theta": self.theta,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "target_macs": self.target_macs,
            "mac_tilt": self.mac_tilt,
            "config": asdict(self.config),
            "spectra": self.spectra,
            "layers": {
                k: sum(d.kind == k for d in self.decisions)
                for k in ("tucker2", "svd", "dense", "skipped")
            },
        }


@dataclass
class _Candidate:
    name: str
    module: nn.Conv2d | nn.Linear
    kind: str  # tucker2 | svd | stem
    factors: Tucker2Factors | SVDFactors
    f_out: Tensor
    f_in: Tensor
    # positions per image the layer reads and writes (H*W of a conv; 1 for a Linear on
    # (N, features)), filled when ``compress`` is given the input shape
    in_positions: int = 1
    out_positions: int = 1

    @property
    def spectrum(self) -> Spectrum:
        if isinstance(self.factors, Tucker2Factors):
            return Spectrum(self.factors.s_out, self.factors.s_in)
        return Spectrum(self.factors.s, self.factors.s)

    def weight_params(self, ranks: tuple[int, int]) -> int:
        """Weight parameters of the factorised form at ``ranks``."""
        w = self.module.weight
        if self.kind == "svd":
            return ranks[0] * (w.shape[0] + w.shape[1])
        c_out, c_in = w.shape[0], w.shape[1]
        k = int(w[0, 0].numel())
        return c_in * ranks[1] + ranks[0] * ranks[1] * k + ranks[0] * c_out

    def macs(self, kind: str, ranks: tuple[int, int]) -> int:
        """Multiply-accumulates per image of the layer as ``kind`` at ``ranks``, counted as
        :func:`cnc_core.metrics.count_macs` counts the built modules (biases excluded)."""
        w = self.module.weight
        c_out, c_in = w.shape[0], w.shape[1]
        k = int(w[0, 0].numel()) if w.dim() > 2 else 1
        if kind == "svd":  # both factors at the output positions (a 1x1 keeps its stride)
            return self.out_positions * ranks[0] * (c_in + c_out)
        if kind == "tucker2":
            r_out, r_in = ranks
            return self.in_positions * c_in * r_in + self.out_positions * (
                r_in * r_out * k + r_out * c_out
            )
        return self.out_positions * c_out * c_in * k  # dense (groups == 1)


def _mac_tilt(
    total: Callable[[float, float], int],
    total_macs: Callable[[float, float], int],
    target: int | None,
    mac_target: int,
    config: CompressConfig,
    theta: float,
) -> tuple[float, float]:
    """``(beta, theta)`` meeting both budgets once the MAC budget binds at ``theta``.

    ``"tilted"``: the smallest tilt ``beta`` (bisection) at which the allocation that spends
    the parameter budget, ``theta = max{t : total(t, beta) <= target}``, also fits
    ``mac_target``. Where no tilt up to ``2 ** 6`` does (or with ``"shared"``, or no
    parameter target), the plain allocation at the largest ``theta`` within both budgets.
    """

    def spend(beta: float) -> float:
        assert target is not None
        return bisect_theta(lambda t: total(t, beta), target, iterations=30)

    if config.mac_allocation == "tilted" and target is not None:
        hi = 1.0
        while hi <= 64 and total_macs(spend(hi), hi) > mac_target:
            hi *= 2
        if hi <= 64:
            lo = 0.0
            for _ in range(16):
                mid = (lo + hi) / 2
                if total_macs(spend(mid), mid) <= mac_target:
                    hi = mid
                else:
                    lo = mid
            return hi, spend(hi)
    return 0.0, min(theta, bisect_theta(lambda t: total_macs(t, 0.0), mac_target))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _positions(
    model: nn.Module, names: list[str], input_shape: Sequence[int]
) -> dict[str, tuple[int, int]]:
    """``{name: (input positions, output positions)}`` per image, from one eval forward."""
    seen: dict[str, tuple[int, int]] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            inp = args[0]
            conv = isinstance(module, nn.Conv2d)
            width_in = module.in_channels if conv else module.in_features
            width_out = module.out_channels if conv else module.out_features
            n = inp.shape[0]
            seen[name] = (inp.numel() // (n * width_in), out.numel() // (n * width_out))

        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    was = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return seen


def find_candidates(
    model: nn.Module, config: CompressConfig
) -> tuple[list[tuple[str, nn.Module, str]], list[tuple[str, nn.Module, str]]]:
    """Walk the model: ``(eligible, skipped)`` lists of ``(name, module, kind_or_reason)``."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    classifier = layers[-1][0] if layers else None
    eligible: list[tuple[str, nn.Module, str]] = []
    skipped: list[tuple[str, nn.Module, str]] = []
    for name, module in layers:
        if name in config.exclude:
            skipped.append((name, module, "excluded by config"))
        elif name == classifier:
            skipped.append((name, module, "classifier (produces the logits)"))
        elif isinstance(module, nn.Linear):
            if config.decompose_linear:
                eligible.append((name, module, "svd"))
            else:
                skipped.append((name, module, "Linear decomposition disabled"))
        elif module.groups != 1:
            skipped.append((name, module, f"grouped conv (groups={module.groups})"))
        elif module.kernel_size == (1, 1):
            eligible.append((name, module, "svd"))
        elif module.in_channels <= STEM_MAX_IN_CHANNELS:
            if config.scale_stem and config.scaling != "none":
                eligible.append((name, module, "stem"))
            else:
                skipped.append((name, module, "image stem (Tucker-2 does not shrink it)"))
        else:
            eligible.append((name, module, "tucker2"))
    return eligible, skipped


def compressible_layers(model: nn.Module, config: CompressConfig) -> list[str]:
    """Names of the layers ``compress`` may factorise (Tucker-2 convs, SVD 1x1 convs and
    Linear layers): the ones whose spectra steer the allocation."""
    eligible, _ = find_candidates(model, config)
    return [name for name, _, kind in eligible if kind in ("tucker2", "svd")]


def compress(
    model: nn.Module,
    config: CompressConfig,
    progress: ProgressFn | None = None,
    *,
    spectra: Mapping[str, Spectrum] | None = None,
    input_shape: Sequence[int] | None = None,
) -> CompressResult:
    """Decompose, scale and prune ``model`` to the budget in ``config``.

    The input model is not changed; the result holds a new module on the same device.
    Raises :class:`CompressionError` when the budget cannot be met, naming the best
    ratio that can. ``spectra`` (by layer name) replaces the weight spectra the allocator
    sees, e.g. response spectra on synthetic images
    (:func:`cnc_core.purify.refit.activation_spectra`); the factors are still the weights'.
    ``input_shape`` (``(C, H, W)``, no batch axis) gives the MAC counts, and is required
    with ``config.mac_ratio``.
    """
    config.validate()
    if config.mac_ratio is not None and input_shape is None:
        raise CompressionError(
            "mac_ratio needs the input shape: compress(..., input_shape=(C, H, W))"
        )
    plan = StagePlan([("decompose", 3.0), ("allocate", 1.0), ("build", 1.0)], progress)
    params_before = count_params(model)
    eligible, skipped = find_candidates(model, config)

    candidates: list[_Candidate] = []
    with plan.stage("decompose") as report:
        for i, (name, module, kind) in enumerate(eligible):
            candidates.append(_decompose(name, module, kind, config))  # type: ignore[arg-type]
            report((i + 1) / max(len(eligible), 1))

    eligible_dense = sum(_layer_params(c.module) for c in candidates)
    fixed = params_before - eligible_dense
    macs_before = mac_target = None
    fixed_macs = 0
    if input_shape is not None:
        positions = _positions(model, [c.name for c in candidates], input_shape)
        for c in candidates:
            c.in_positions, c.out_positions = positions.get(c.name, (0, 0))
        macs_before = count_macs(model, input_shape)
        fixed_macs = macs_before - sum(c.macs("dense", (0, 0)) for c in candidates)
        if config.mac_ratio is not None:
            mac_target = int(math.floor(macs_before / config.mac_ratio))
    if config.allocation == "full":
        target = None
    elif config.param_budget is not None:
        target = config.param_budget
    else:
        target = int(math.floor(params_before / float(config.ratio or 1.0)))
    rule = ALLOCATORS.get(config.allocation)

    largest = max((c.module.weight.numel() for c in candidates), default=0)
    small = {
        c.name for c in candidates if c.module.weight.numel() < config.min_layer_share * largest
    }

    # MAC tilt: layer l allocates at theta ** (1 + beta * z_l), z_l = log2 of its output
    # positions over the fewest any candidate has (0 without an input shape), so beta > 0
    # takes ranks from high-resolution layers first; beta = 0 is the plain allocation
    least = min((c.out_positions for c in candidates), default=1)
    z = {c.name: math.log2(max(c.out_positions, 1) / max(least, 1)) for c in candidates}

    def choose(c: _Candidate, theta: float, beta: float = 0.0) -> tuple[str, tuple[int, int], int]:
        full = c.factors.ranks if isinstance(c.factors, Tucker2Factors) else (c.factors.rank,) * 2
        if c.kind == "stem" or c.name in small:
            return "dense", full, _layer_params(c.module)
        theta_l = theta ** (1.0 + beta * z[c.name]) if beta > 0 else theta
        ranks = rule(spectra[c.name] if spectra and c.name in spectra else c.spectrum, theta_l)
        if config.rank_multiple > 1:
            m = config.rank_multiple
            ranks = (
                min(full[0], -(-ranks[0] // m) * m),
                min(full[1], -(-ranks[1] // m) * m),
            )
        if c.kind == "svd":
            ranks = (min(ranks), min(ranks))
        bias = c.module.bias.numel() if c.module.bias is not None else 0
        factorised = c.weight_params(ranks) + bias
        dense = _layer_params(c.module)
        if config.keep_dense_if_larger and factorised >= dense:
            return "dense", full, dense
        return c.kind, ranks, factorised

    def total(theta: float, beta: float = 0.0) -> int:
        return fixed + sum(choose(c, theta, beta)[2] for c in candidates)

    def total_macs(theta: float, beta: float = 0.0) -> int:
        return fixed_macs + sum(c.macs(*choose(c, theta, beta)[:2]) for c in candidates)

    beta = 0.0
    with plan.stage("allocate"):
        smallest = total(0.0)
        if target is None:
            theta = 1.0
        elif smallest > target:
            asked = config.ratio if config.ratio is not None else params_before / max(target, 1)
            raise CompressionError(
                f"cannot reach {asked:.2f}x "
                f"({target:,} parameters): the smallest model this allocation can make has "
                f"{smallest:,} parameters ({params_before / smallest:.2f}x); "
                f"{fixed:,} parameters sit in layers that are not decomposed"
            )
        else:
            theta = bisect_theta(total, target)
        if mac_target is not None and macs_before is not None:
            fewest = total_macs(0.0)
            if fewest > mac_target:
                kept = fixed_macs + sum(
                    c.macs("dense", (0, 0)) for c in candidates if c.name in small
                )
                raise CompressionError(
                    f"cannot reach {config.mac_ratio:.2f}x in MACs ({mac_target:,}): the "
                    f"cheapest model this allocation can make needs {fewest:,} MACs "
                    f"({macs_before / fewest:.2f}x); layers that are not decomposed, or kept "
                    f"dense by min_layer_share={config.min_layer_share:g}, need "
                    f"{kept:,}"
                )
            if total_macs(theta) > mac_target:
                beta, theta = _mac_tilt(total, total_macs, target, mac_target, config, theta)

    compact = copy.deepcopy(model)
    decisions: list[LayerDecision] = []
    with plan.stage("build") as report:
        for i, c in enumerate(candidates):
            kind, ranks, params_after = choose(c, theta, beta)
            decisions.append(_apply(compact, c, kind, ranks, params_after, config, small))
            report((i + 1) / max(len(candidates), 1))
    for name, module, reason in skipped:
        decisions.append(
            LayerDecision(
                name=name,
                kind="skipped",
                module_type=type(module).__name__,
                weight_shape=tuple(module.weight.shape),  # type: ignore[arg-type]
                reason=reason,
                params_before=_layer_params(module),
                params_after=_layer_params(module),
            )
        )
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    decisions.sort(key=lambda d: order.get(d.name, 0))
    return CompressResult(
        model=compact,
        decisions=decisions,
        params_before=params_before,
        params_after=count_params(compact),
        target_params=target,
        theta=theta,
        config=config,
        spectra="given" if spectra else "weight",
        macs_before=macs_before,
        macs_after=count_macs(compact, input_shape) if input_shape is not None else None,
        target_macs=mac_target,
        mac_tilt=beta,
    )


def _layer_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _decompose(
    name: str, module: nn.Conv2d | nn.Linear, kind: str, config: CompressConfig
) -> _Candidate:
    factors: Tucker2Factors | SVDFactors
    if kind == "svd":
        factors = matrix_svd(module.weight)
        f = scaling_factors(factors.s, config.scaling, config.t_scale)
        return _Candidate(name, module, kind, factors, f, f)
    factors = tucker2_hosvd(module.weight)
    f_out = scaling_factors(factors.s_out, config.scaling, config.t_scale)
    f_in = scaling_factors(factors.s_in, config.scaling, config.t_scale)
    return _Candidate(name, module, kind, factors, f_out, f_in)


def _apply(
    model: nn.Module,
    c: _Candidate,
    kind: str,
    ranks: tuple[int, int],
    params_after: int,
    config: CompressConfig,
    small_names: set[str],
) -> LayerDecision:
    """Replace (or rescale in place) layer ``c.name`` inside ``model``."""
    scaled = config.scaling != "none"
    target = model.get_submodule(c.name)
    if not isinstance(target, nn.Conv2d | nn.Linear):
        raise TypeError(f"{c.name} is a {type(target).__name__}, expected Conv2d or Linear")
    factors: Tucker2Factors | SVDFactors
    if isinstance(c.factors, Tucker2Factors):
        factors = c.factors.scale(c.f_out, c.f_in)
        full = c.factors.ranks
    else:
        factors = c.factors.scale(c.f_out)
        full = (c.factors.rank, c.factors.rank)
    new: nn.Module | None = None
    if kind == "tucker2" and isinstance(factors, Tucker2Factors) and isinstance(target, nn.Conv2d):
        new = Tucker2Conv2d.from_conv(target, factors.truncate(*ranks))
    elif kind == "svd" and isinstance(factors, SVDFactors):
        low = factors.truncate(ranks[0])
        if isinstance(target, nn.Linear):
            new = LowRankLinear.from_linear(target, low)
        else:
            new = LowRankConv1x1.from_conv(target, low)
    elif scaled:
        # kept dense, but the spectrum is still scaled: write back the full-rank product
        with torch.no_grad():
            w = factors.reconstruct().reshape(target.weight.shape)
            target.weight.copy_(w.to(target.weight.dtype))
    if new is not None:
        replace_module(model, c.name, new)
    if kind == "tucker2":
        reason = "Tucker-2 factorised"
    elif kind == "svd":
        reason = "truncated SVD"
    elif c.kind == "stem":
        reason = "image stem: scaled only"
    elif ranks == full and params_after == _layer_params(c.module) and c.name in small_names:
        reason = "small layer (min_layer_share): kept dense"
    else:
        reason = "factorised form would not be smaller"
    return LayerDecision(
        name=c.name,
        kind=kind,
        module_type=type(c.module).__name__,
        weight_shape=tuple(c.module.weight.shape),
        reason=reason,
        full_ranks=full,
        ranks=ranks,
        params_before=_layer_params(c.module),
        params_after=params_after,
        scaled=scaled,
        s_out=normalise(c.spectrum.s_out).tolist(),
        s_in=normalise(c.spectrum.s_in).tolist(),
        f_out=c.f_out.tolist(),
        f_in=c.f_in.tolist(),
    )


def apply_surgery(model: nn.Module, record: list[dict[str, Any]]) -> nn.Module:
    """Replay a surgery record on an uncompressed skeleton (in place), with empty weights.

    Used by :func:`cnc_core.export.load_compact`: the weights come from safetensors next.
    """
    for entry in record:
        name, kind, ranks = entry["name"], entry["kind"], tuple(entry["ranks"])
        target = model.get_submodule(name)
        if not isinstance(target, nn.Conv2d | nn.Linear):
            raise ValueError(f"surgery record names {name}, which is not a Conv2d or Linear")
        shape = tuple(entry["weight_shape"])
        if tuple(target.weight.shape) != shape:
            raise ValueError(
                f"surgery record does not fit the model: {name} has weight "
                f"{tuple(target.weight.shape)}, the record says {shape}"
            )
        new: nn.Module
        if kind == "tucker2" and isinstance(target, nn.Conv2d):
            new = Tucker2Conv2d(target, (ranks[0], ranks[1]))
        elif kind == "svd" and isinstance(target, nn.Linear):
            new = LowRankLinear(target, ranks[0])
        elif kind == "svd" and isinstance(target, nn.Conv2d):
            new = LowRankConv1x1(target, ranks[0])
        else:
            raise ValueError(f"unknown surgery {kind!r} on {type(target).__name__} {name}")
        replace_module(model, name, new)
    return model
