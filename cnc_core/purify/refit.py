"""Activation-aware refit of a compact model's factors, on synthetic images.

Plain truncation (``cnc_core.compress``) keeps, per layer, the Tucker-2 / SVD subspaces with
the most *weight* energy. What the rest of the network sees is the layer's *response* on the
inputs it actually gets, and on the short-trained width-16 zoo models plain truncation at 3x
leaves ~10% accuracy (``bench/results/explore-purify.md`` section 2), so fine-tuning on
synthetic images has to win back ~60 points. Choosing the subspaces that best keep the
responses is the classic fix: response reconstruction with a generalised SVD (Zhang, Zou, He
and Sun, "Accelerating Very Deep Convolutional Networks for Classification and Detection",
TPAMI 2016) and, for matrices, truncation-aware whitening (Wang et al., "SVD-LLM", ICLR 2025).
The inputs come data-free: the model's own activations on the ZeroQ images.

For a conv ``W (Cout, Cin, K, K)`` with input channel second moment ``C_in = E[x x^T]`` and
output second moment ``C_out = E[y y^T]`` (per pixel, over the synthetic images), with
``L L^T = C_in + damping`` and ``D = diag(1 / rms(y))`` (each output channel counts the same,
as the BN after it normalises them):

1. output subspace: ``U`` = the top ``R1`` eigenvectors of ``D C_out D``;
2. input subspace: ``V`` = the top ``R2`` left singular vectors of the mode-2 unfolding of
   ``(U^T D W) x2 L^T`` (the output-projected weight seen by whitened inputs);
3. factors: ``u_out = D^-1 U``, ``core = (U^T D W) x2 (L V)^T``, ``u_in = L^-T V``, so the
   layer computes ``D^-1 U U^T D W L V V^T L^-1 x``: the same ranks, the same
   :class:`~cnc_core.layers.Tucker2Conv2d` layout, the same parameter count.

Step 2 is exact for spatially uncorrelated inputs given step 1; 1x1 convs and Linear layers
get the closed form ``D^-1 [D W L]_R L^-1`` (truncated SVD of the weighted matrix). The
factors are no longer orthonormal, so singular-value scaling does not apply to them: refit
and ``CompressConfig.scaling`` are exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnc_core.allocation import Spectrum
from cnc_core.compress import CompressResult
from cnc_core.decompose import SVDFactors, Tucker2Factors
from cnc_core.layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d, replace_module
from cnc_core.progress import ProgressFn
from cnc_core.purify.finetune import forward_batches

__all__ = [
    "REFIT_WEIGHTINGS",
    "RefitConfig",
    "activation_spectra",
    "layer_moments",
    "refit_compact",
    "refit_svd",
    "refit_tucker2",
]


#: ``RefitConfig.output_weighting`` choices.
REFIT_WEIGHTINGS = ("rms", "none")


@dataclass(frozen=True)
class RefitConfig:
    """Settings of the activation-aware refit."""

    # Ridge added to the input second moment, as a share of its mean eigenvalue: keeps the
    # whitening invertible where channels are dead (ReLU) and blends towards plain SVD.
    damping: float = 0.01
    # Weight each output channel by 1 / its RMS ("rms"), as the BN that follows normalises
    # them, or take the raw responses ("none").
    output_weighting: str = "rms"
    batch_size: int = 128


@dataclass
class _Moments:
    """Running second moments of one layer's input and output channels (float64)."""

    c_in: Tensor
    c_out: Tensor
    n_in: int = 0
    n_out: int = 0


def _rows(t: Tensor) -> Tensor:
    """Channel vectors of an activation: ``(N, C, H, W) -> (N*H*W, C)``, ``(N, C) -> same``."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def layer_moments(
    model: nn.Module,
    names: list[str],
    images: Tensor,
    *,
    batch_size: int = 128,
    progress: ProgressFn | None = None,
    stage: str = "refit",
) -> dict[str, _Moments]:
    """Per-pixel channel second moments ``E[x x^T]`` of the input and ``E[y y^T]`` of the
    output of each layer in ``names`` (Conv2d or Linear) over ``images``; eval mode.

    A strided 1x1 conv sees only every ``stride``-th pixel, so only those are counted.
    """
    moments: dict[str, _Moments] = {}
    handles = []

    def hook(name: str, module: nn.Module):
        def fn(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0]
            if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
                sh, sw = module.stride
                x = x[:, :, ::sh, ::sw]
            xr = _rows(x).to(torch.float64)
            yr = _rows(output).to(torch.float64)
            m = moments.get(name)
            if m is None:
                m = moments[name] = _Moments(
                    torch.zeros(xr.shape[1], xr.shape[1], dtype=torch.float64, device=x.device),
                    torch.zeros(yr.shape[1], yr.shape[1], dtype=torch.float64, device=x.device),
                )
            m.c_in += xr.T @ xr
            m.c_out += yr.T @ yr
            m.n_in += xr.shape[0]
            m.n_out += yr.shape[0]

        return fn

    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(hook(name, module)))
    was = model.training
    model.eval()
    try:
        forward_batches(model, images, batch_size, progress, stage, share=0.8)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    for m in moments.values():
        m.c_in /= max(m.n_in, 1)
        m.c_out /= max(m.n_out, 1)
    return moments


def _whitener(c_in: Tensor, damping: float) -> Tensor:
    """Lower-triangular ``L`` with ``L L^T = C_in + damping * mean eigenvalue * I``."""
    n = c_in.shape[0]
    ridge = damping * float(torch.trace(c_in)) / n
    ridge = max(ridge, 1e-12)
    return torch.linalg.cholesky(c_in + ridge * torch.eye(n, dtype=c_in.dtype, device=c_in.device))


def _output_scale(c_out: Tensor, weighting: str) -> Tensor:
    """Per-channel factor ``d`` (``D = diag(d)``) applied to the outputs before the PCA."""
    if weighting == "none":
        return torch.ones(c_out.shape[0], dtype=c_out.dtype, device=c_out.device)
    if weighting not in REFIT_WEIGHTINGS:
        raise ValueError(f"output_weighting must be one of {REFIT_WEIGHTINGS}, got {weighting!r}")
    rms = torch.sqrt(torch.clamp(torch.diagonal(c_out), min=0.0))
    floor = 1e-6 * float(rms.max()) if rms.numel() else 1e-12
    return 1.0 / torch.clamp(rms, min=max(floor, 1e-12))


def refit_tucker2(
    weight: Tensor, moments: _Moments, ranks: tuple[int, int], config: RefitConfig
) -> Tucker2Factors:
    """Activation-aware Tucker-2 factors of a conv ``weight (Cout, Cin, K1, K2)`` at
    ``ranks = (R1, R2)`` (module docstring, steps 1-3); float64."""
    w = weight.detach().to(torch.float64).to(moments.c_in.device)
    r_out, r_in = ranks
    d = _output_scale(moments.c_out, config.output_weighting)  # (Cout,)
    # 1. output subspace: principal directions of the weighted responses
    evals, evecs = torch.linalg.eigh(d[:, None] * moments.c_out * d[None, :])
    order = torch.argsort(evals, descending=True)[:r_out]
    u = evecs[:, order]  # (Cout, R1)
    left = torch.einsum("oa,oikl->aikl", u * d[:, None], w)  # U^T D W: (R1, Cin, K1, K2)
    # 2. input subspace, seen by whitened inputs: (U^T D W) x2 L^T
    low = _whitener(moments.c_in, config.damping)  # (Cin, Cin)
    white = torch.einsum("aikl,ij->ajkl", left, low)  # (R1, Cin, K1, K2)
    unfold = white.transpose(0, 1).reshape(w.shape[1], -1)  # mode-2: (Cin, R1*K1*K2)
    v, s_in, _ = torch.linalg.svd(unfold, full_matrices=False)
    v = v[:, :r_in]  # (Cin, R2)
    # 3. factors of D^-1 U U^T D W L V V^T L^-1
    core = torch.einsum("ajkl,jb->abkl", white, v)  # (R1, R2, K1, K2)
    u_in = torch.linalg.solve_triangular(low.T, v, upper=True)  # L^-T V: (Cin, R2)
    u_out = u / d[:, None]  # D^-1 U: (Cout, R1)
    s_out = torch.sqrt(torch.clamp(evals[order], min=0.0))
    return Tucker2Factors(core.cpu(), u_out.cpu(), u_in.cpu(), s_out.cpu(), s_in[:r_in].cpu())


def refit_svd(weight: Tensor, moments: _Moments, rank: int, config: RefitConfig) -> SVDFactors:
    """Activation-aware rank-``rank`` factors of a Linear / 1x1 conv weight: the truncated
    SVD of ``D W L``, mapped back (``D^-1 [D W L]_R L^-1``); float64."""
    w = weight.detach().to(torch.float64).to(moments.c_in.device).reshape(weight.shape[0], -1)
    d = _output_scale(moments.c_out, config.output_weighting)
    low = _whitener(moments.c_in, config.damping)
    u, s, vh = torch.linalg.svd(d[:, None] * w @ low, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    vh = torch.linalg.solve_triangular(low, vh, upper=False, left=False)  # V^T L^-1
    return SVDFactors((u / d[:, None]).cpu(), s.cpu(), vh.cpu())


def activation_spectra(
    model: nn.Module,
    names: list[str],
    images: Tensor,
    config: RefitConfig | None = None,
    *,
    moments: dict[str, _Moments] | None = None,
    progress: ProgressFn | None = None,
    stage: str = "allocate",
) -> dict[str, Spectrum]:
    """Response spectra of the layers in ``names`` on ``images``, for rank allocation.

    Where the weight spectrum says how much of a layer's *weights* a rank keeps, these say
    how much of its *response* on the (synthetic) inputs it keeps, in the refit's metric:
    the output mode's values are the square roots of the eigenvalues of ``D C_out D``
    (step 1 of the module docstring), the input mode's the singular values of the mode-2
    unfolding of ``(D W) x2 L^T`` (step 2 with every output component); a Linear or 1x1
    conv gets the singular values of ``D W L`` on both modes. Allocating on them
    (``compress(..., spectra=...)``) spends the parameter budget where the responses need it.
    """
    config = config or RefitConfig()
    if moments is None:
        moments = layer_moments(
            model, names, images, batch_size=config.batch_size, progress=progress, stage=stage
        )
    spectra: dict[str, Spectrum] = {}
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise TypeError(f"{name} is a {type(layer).__name__}, not Conv2d/Linear")
        m = moments[name]
        w = layer.weight.detach().to(torch.float64).to(m.c_in.device)
        d = _output_scale(m.c_out, config.output_weighting)
        low = _whitener(m.c_in, config.damping)
        if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
            evals = torch.linalg.eigvalsh(d[:, None] * m.c_out * d[None, :])
            s_out = torch.sqrt(torch.clamp(evals.flip(0), min=0.0))
            white = torch.einsum("oikl,ij->ojkl", d[:, None, None, None] * w, low)
            s_in = torch.linalg.svdvals(white.transpose(0, 1).reshape(w.shape[1], -1))
            spectra[name] = Spectrum(s_out.float().cpu(), s_in.float().cpu())
        else:
            s = torch.linalg.svdvals(d[:, None] * w.reshape(w.shape[0], -1) @ low)
            spectra[name] = Spectrum(s.float().cpu(), s.float().cpu())
    return spectra


def refit_compact(
    original: nn.Module,
    compressed: CompressResult,
    images: Tensor,
    config: RefitConfig | None = None,
    *,
    moments: dict[str, _Moments] | None = None,
    progress: ProgressFn | None = None,
    stage: str = "refit",
) -> list[str]:
    """Replace every factorised layer of ``compressed.model`` (in place) by the
    activation-aware factors of the same ranks, fitted to ``original``'s activations on
    ``images`` (normalised synthetic images). ``original`` is the model that was compressed;
    it is not changed. Returns the names of the layers refitted. ``moments``
    (:func:`layer_moments` of ``original`` on ``images``, covering every factorised layer)
    skips the forward pass that measures them, e.g. when the allocation already did.

    Raises ``ValueError`` when the compression scaled the spectrum (the refit factors are not
    orthonormal, so the scaling would be lost).
    """
    config = config or RefitConfig()
    if compressed.config.scaling != "none":
        raise ValueError("refit cannot keep singular-value scaling: use scaling='none'")
    chosen = [d for d in compressed.decisions if d.kind in ("tucker2", "svd")]
    if not chosen:
        return []
    if moments is None:
        moments = layer_moments(
            original,
            [d.name for d in chosen],
            images,
            batch_size=config.batch_size,
            progress=progress,
            stage=stage,
        )
    model = compressed.model
    for i, decision in enumerate(chosen):
        layer = original.get_submodule(decision.name)
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise TypeError(f"{decision.name} is a {type(layer).__name__}, not Conv2d/Linear")
        new: nn.Module
        if decision.kind == "tucker2" and isinstance(layer, nn.Conv2d):
            factors = refit_tucker2(layer.weight, moments[decision.name], decision.ranks, config)
            new = Tucker2Conv2d.from_conv(layer, factors)
        elif isinstance(layer, nn.Linear):
            svd = refit_svd(layer.weight, moments[decision.name], decision.ranks[0], config)
            new = LowRankLinear.from_linear(layer, svd)
        else:
            svd = refit_svd(layer.weight, moments[decision.name], decision.ranks[0], config)
            new = LowRankConv1x1.from_conv(layer, svd)
        old = model.get_submodule(decision.name)
        new.to(device=next(old.parameters()).device)
        replace_module(model, decision.name, new)
        if progress is not None:
            progress(stage, 0.8 + 0.2 * (i + 1) / len(chosen))
    return [d.name for d in chosen]
