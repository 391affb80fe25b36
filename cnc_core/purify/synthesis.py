"""Data-free synthetic images from a model's BatchNorm statistics (ZeroQ).

ZeroQ (Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020) distils
"what the training data looked like" out of the running mean/variance every BatchNorm layer
stores: start from random images and optimise the pixels so that the statistics of each BN
layer's input match that layer's running statistics.

Space: the images returned here live in the model's **normalised input space** (what the model
takes: ``(pixel - mean) / std``). With ``clamp=True`` they are kept inside the valid pixel range
[0, 1] mapped through the normalisation, so they are also real images.

Statistics are taken on each BN layer's INPUT through forward pre-hooks, so pre-activation nets
(BN before conv) are handled the same way as post-activation nets.

An optional class-balanced term (DeepInversion, Yin et al., CVPR 2020; GDFQ, Xu et al.,
ECCV 2020) adds a cross-entropy loss pushing image ``i`` to class ``i mod C`` (in a seeded
permutation), which spreads the synthetic set over all classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_core.progress import ProgressFn

__all__ = [
    "SynthesisConfig",
    "batch_statistics_loss_autograd",
    "bn_statistics_loss",
    "cpu_channels_last",
    "normalisation_bounds",
    "synthesize",
    "to_tensor_stats",
]


@dataclass(frozen=True)
class SynthesisConfig:
    """How to synthesise images. Defaults follow the ZeroQ code (Adam, lr 0.5, 500 steps)."""

    num_images: int = 1024
    batch_size: int = 128
    image_shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W)
    iterations: int = 500  # Adam steps per batch
    lr: float = 0.5
    seed: int = 0
    # "batch": statistics of the whole batch per channel (DeepInversion); "sample": each image
    # matches the running statistics on its own (the ZeroQ code). Batch matching leaves each
    # image freer, hence more diverse.
    statistics: str = "batch"
    clamp: bool = True  # keep pixels in the valid [0, 1] range (through mean/std)
    # Class-balanced variant: weight of a CE term towards an assigned class (0 = plain ZeroQ).
    class_weight: float = 0.0
    num_classes: int | None = None  # needed when class_weight > 0; inferred from a forward pass
    plateau_patience: int = 50  # ReduceLROnPlateau patience, in steps
    min_lr: float = 1e-4
    input_weight: float = 1.0  # ZeroQ also matches the input's own mean 0 / std 1
    # DeepInversion's image prior (Yin et al., CVPR 2020): weight of the total variation
    # (mean squared difference of neighbouring pixels, normalised space). 0 = plain ZeroQ.
    tv_weight: float = 0.0
    # On CPU, optimise the pixels in channels-last memory (:func:`cpu_channels_last`): the
    # same images to float rounding, 1.4x faster a step. ``purify`` also keeps its synthetic
    # images in that layout for every later stage when this is on.
    channels_last: bool = True


def to_tensor_stats(
    values: float | tuple[float, ...] | list[float] | Tensor, channels: int, device: torch.device
) -> Tensor:
    """Normalisation mean or std as a ``(1, C, 1, 1)`` tensor (one value broadcasts)."""
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"expected 1 or {channels} normalisation values, got {t.numel()}")
    return t.reshape(1, channels, 1, 1).clone()


def cpu_channels_last(images: Tensor, enabled: bool = True) -> Tensor:
    """``images`` in channels-last memory on CPU (unchanged on other devices or shapes, or
    when not ``enabled``).

    oneDNN runs convolutions on channels-last inputs 1.4x faster a synthesis step (forward +
    input gradient) on a width-16 ResNet-18 on 2 cores (``bench/results/synthesis-step-s12.md``),
    and the layout carries through every op that follows (activations, slices, indexing,
    stamping), so the images are converted once and the models are left as they are. The
    values are the same; results differ from NCHW only by float rounding.
    """
    if not enabled or images.device.type != "cpu" or images.dim() != 4:
        return images
    return images.contiguous(memory_format=torch.channels_last)


def normalisation_bounds(
    mean: float | tuple[float, ...] | Tensor,
    std: float | tuple[float, ...] | Tensor,
    channels: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds, in normalised space, of the pixel range [0, 1]."""
    m = to_tensor_stats(mean, channels, device)
    s = to_tensor_stats(std, channels, device)
    return (0.0 - m) / s, (1.0 - m) / s


def batch_statistics_loss_autograd(x: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """The batch-statistics term of ``bn``'s input ``x`` in plain autograd ops: the definition
    the fused :class:`_BatchStatisticsLoss` is checked and timed against."""
    assert bn.running_mean is not None and bn.running_var is not None
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    var, mu = torch.var_mean(flat, dim=(0, 2), unbiased=False)
    sigma = torch.sqrt(var + bn.eps)
    return torch.linalg.vector_norm(mu - bn.running_mean) + torch.linalg.vector_norm(
        sigma - torch.sqrt(bn.running_var + bn.eps)
    )


class _BatchStatisticsLoss(torch.autograd.Function):
    """``||mu - running_mean|| + ||sigma - running_sigma||`` over a batch, with a fused gradient.

    ``mu`` and ``sigma`` are the per-channel mean and standard deviation of ``x`` over batch
    and space (DeepInversion's batch matching). Autograd would run the reduction's backward
    as a chain of full-size elementwise ops; the gradient is affine in ``x`` per channel,

        dL/dx = a_c / M + g_c / (sigma_c M) * (x - mu_c),

    with ``a = (mu - rm) / ||mu - rm||``, ``g = (sigma - ts) / ||sigma - ts||`` and ``M`` the
    values per channel, so one ``addcmul`` gives it. Same loss and gradient to float
    rounding (``tests/core/test_synthesis.py``); about half the time on the large
    early-layer inputs of a ResNet on CPU (``bench/results/synthesis-step.md``).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, run_mean: Tensor, target_sigma: Tensor, eps: float) -> Tensor:
        # the training-mode batch norm kernel gives mu and 1 / sqrt(var + eps) in one pass,
        # 2.5x (NCHW) to 7x (channels-last) faster on CPU than var_mean over (N, spatial)
        _, mu, inv_sigma = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        sigma = inv_sigma.reciprocal()
        d_mu, d_sigma = mu - run_mean, sigma - target_sigma
        n_mu, n_sigma = torch.linalg.vector_norm(d_mu), torch.linalg.vector_norm(d_sigma)
        count = x.numel() // x.shape[1]
        # the norm's gradient at 0 is taken as 0, as autograd does (no host sync on CUDA)
        a = torch.where(n_mu > 0, d_mu / n_mu, torch.zeros_like(d_mu))
        g = torch.where(n_sigma > 0, d_sigma / n_sigma, torch.zeros_like(d_sigma))
        slope = g / (sigma * count)
        offset = a / count - slope * mu
        ctx.save_for_backward(x, slope, offset)
        return n_mu + n_sigma

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        x, slope, offset = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        grad = torch.addcmul((grad_out * offset).view(shape), x, (grad_out * slope).view(shape))
        return grad, None, None, None


class _BNInputRecorder:
    """Forward pre-hooks collecting the per-channel statistics of every BN layer's input."""

    def __init__(self, model: nn.Module, per_sample: bool) -> None:
        self.per_sample = per_sample
        self.terms: list[Tensor] = []
        self._handles = []
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.running_mean is not None and module.running_var is not None
            ):
                self._handles.append(module.register_forward_pre_hook(self._hook))

    @property
    def num_layers(self) -> int:
        return len(self._handles)

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0]
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        run_mean = module.running_mean
        run_var = module.running_var
        assert run_mean is not None and run_var is not None
        flat = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, spatial): a view, no copy
        target_sigma = torch.sqrt(run_var + module.eps)
        if self.per_sample:
            var, mu = torch.var_mean(flat, dim=2, unbiased=False)  # (N, C)
            sigma = torch.sqrt(var + module.eps)
            # ZeroQ: squared 2-norm over channels, averaged over samples
            loss = ((mu - run_mean).pow(2).sum(1) + (sigma - target_sigma).pow(2).sum(1)).mean()
        else:
            loss = _BatchStatisticsLoss.apply(x, run_mean, target_sigma, module.eps)
        self.terms.append(loss)

    def pop(self) -> Tensor:
        total = torch.stack(self.terms).sum() if self.terms else torch.zeros(())
        self.terms = []
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _input_loss(x: Tensor, per_sample: bool) -> Tensor:
    """ZeroQ's extra term: the (normalised) input itself should have mean 0 and std 1."""
    flat = x.transpose(0, 1).reshape(x.shape[1], x.shape[0], -1)
    if per_sample:
        mu, sigma = flat.mean(2), flat.std(2)
        return (mu.pow(2).sum(0) + (sigma - 1).pow(2).sum(0)).mean()
    flat2 = flat.reshape(x.shape[1], -1)
    return torch.linalg.vector_norm(flat2.mean(1)) + torch.linalg.vector_norm(flat2.std(1) - 1)


def total_variation(x: Tensor) -> Tensor:
    """Mean squared difference between vertically and horizontally neighbouring pixels."""
    vertical = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()
    horizontal = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean()
    return vertical + horizontal


@torch.no_grad()
def bn_statistics_loss(
    model: nn.Module, images: Tensor, *, per_sample: bool = False, batch_size: int = 256
) -> float:
    """Mean BN-statistics mismatch of ``images`` (normalised space) under ``model`` (eval).

    The figure ZeroQ minimises, summed over BN layers and averaged over batches; useful to
    check synthetic data quality. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    rec = _BNInputRecorder(model, per_sample)
    try:
        total, batches = 0.0, 0
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size])
            total += float(rec.pop())
            batches += 1
    finally:
        rec.remove()
        model.train(was_training)
    return total / max(batches, 1)


def synthesize(
    model: nn.Module,
    config: SynthesisConfig,
    *,
    mean: float | tuple[float, ...] = 0.0,
    std: float | tuple[float, ...] = 1.0,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    stage: str = "synthesis",
    labels_out: list[Tensor] | None = None,
    classes: Tensor | None = None,
) -> Tensor:
    """Synthesise ``config.num_images`` images from ``model``'s BN statistics (ZeroQ).

    Parameters
    ----------
    model : nn.Module
        The ORIGINAL model (before any surgery). Not changed: it is run in eval mode and its
        mode and ``requires_grad`` flags are restored.
    config : SynthesisConfig
    mean, std : float or per-channel tuple
        The input normalisation the model expects, in [0, 1] pixel units.
    device : torch.device or str
    progress : callable, optional
        ``progress(stage, fraction)``, called once per Adam step; raising ``Cancelled`` stops.
    labels_out : list, optional
        When given and ``class_weight > 0``, the assigned class of every image is appended.
    classes : Tensor, optional
        ``(num_images,)`` class indices to push the images towards (with weight
        ``class_weight > 0``) instead of the balanced seeded assignment: class-conditional
        synthesis, e.g. of one class (``PurifyConfig.target_images``).

    Returns
    -------
    Tensor
        ``(num_images, C, H, W)`` float32 on ``device``, in normalised input space.
    """
    device = torch.device(device)
    c, h, w = config.image_shape
    if config.statistics not in ("batch", "sample"):
        raise ValueError(f"statistics must be 'batch' or 'sample', not {config.statistics!r}")
    per_sample = config.statistics == "sample"
    if classes is not None:
        if config.class_weight <= 0:
            raise ValueError("classes needs class_weight > 0")
        if tuple(classes.shape) != (config.num_images,):
            raise ValueError(
                f"classes must hold one class per image ({config.num_images}), "
                f"got shape {tuple(classes.shape)}"
            )
    lo, hi = normalisation_bounds(mean, std, c, device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    recorder = _BNInputRecorder(model, per_sample)
    if recorder.num_layers == 0:
        recorder.remove()
        raise ValueError("model has no BatchNorm layer with running statistics: ZeroQ needs one")

    num_classes = config.num_classes
    assigned: Tensor | None = None
    if classes is not None:
        assigned = classes.to(device=device, dtype=torch.long)
        if labels_out is not None:
            labels_out.append(assigned.clone())
    elif config.class_weight > 0:
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(model(torch.zeros(1, c, h, w, device=device)).shape[1])
            recorder.pop()
        order = torch.randperm(config.num_images, generator=gen)
        assigned = (order % num_classes).to(device)
        if labels_out is not None:
            labels_out.append(assigned.clone())

    n_batches = -(-config.num_images // config.batch_size)
    total_steps = max(n_batches * config.iterations, 1)
    report: Callable[[float], None] = (
        (lambda f: progress(stage, f)) if progress is not None else (lambda f: None)
    )
    out: list[Tensor] = []
    try:
        step = 0
        for b in range(n_batches):
            start = b * config.batch_size
            n = min(config.batch_size, config.num_images - start)
            x = torch.randn(n, c, h, w, generator=gen).to(device)
            if config.clamp:
                x = torch.max(torch.min(x, hi), lo)
            x = cpu_channels_last(x, config.channels_last).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=config.lr)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, patience=config.plateau_patience, min_lr=config.min_lr
            )
            for _ in range(config.iterations):
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = recorder.pop()
                if config.input_weight > 0:
                    loss = loss + config.input_weight * _input_loss(x, per_sample)
                if config.tv_weight > 0:
                    loss = loss + config.tv_weight * total_variation(x)
                if assigned is not None:
                    loss = loss + config.class_weight * F.cross_entropy(
                        logits, assigned[start : start + n]
                    )
                loss.backward()
                opt.step()
                sched.step(float(loss.detach()))
                if config.clamp:
                    with torch.no_grad():
                        x.data.clamp_(lo, hi)
                step += 1
                report(step / total_steps)
            out.append(x.detach().contiguous())
    finally:
        recorder.remove()
        model.train(was_training)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    if config.iterations == 0:
        report(1.0)
    return torch.cat(out, 0)
