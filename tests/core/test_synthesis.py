"""ZeroQ synthesis: lowers the BN-statistics loss, stays in the pixel range, seeded."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnc_core.progress import Cancelled
from cnc_core.purify.synthesis import (
    SynthesisConfig,
    _BNInputRecorder,
    batch_statistics_loss_autograd,
    bn_statistics_loss,
    cpu_channels_last,
    normalisation_bounds,
    synthesize,
)

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def tiny_net(num_classes: int = 4, seed: int = 0, width: int = 8) -> nn.Module:
    """A post-activation conv net with BN, a few thousand parameters, for 3x8x8 inputs."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )
    # Give the BN layers non-trivial running statistics, as a trained net has
    with torch.no_grad():
        net.train()
        for _ in range(5):
            net(torch.randn(32, 3, 8, 8) * 0.7 + 0.4)
    net.eval()
    return net


class PreActNet(nn.Module):
    """BN before conv (pre-activation), so the BN input is not a conv output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.conv(torch.relu(self.bn(h)))
        return self.head(h.mean((2, 3)))


def test_zeroq_lowers_bn_loss_and_respects_pixel_range() -> None:
    net = tiny_net()
    cfg = SynthesisConfig(num_images=16, batch_size=16, image_shape=(3, 8, 8), iterations=60)
    gen = torch.Generator().manual_seed(0)
    lo, hi = normalisation_bounds(MEAN, STD, 3, torch.device("cpu"))
    start = torch.max(torch.min(torch.randn(16, 3, 8, 8, generator=gen), hi), lo)
    images = synthesize(net, cfg, mean=MEAN, std=STD)
    assert images.shape == (16, 3, 8, 8)
    assert bn_statistics_loss(net, images) < 0.5 * bn_statistics_loss(net, start)
    assert (images >= lo - 1e-6).all() and (images <= hi + 1e-6).all()
    assert not any(p.requires_grad is False for p in net.parameters())


def test_total_variation_prior_smooths_the_images() -> None:
    """tv_weight (DeepInversion's image prior) lowers the images' total variation."""
    from cnc_core.purify.synthesis import total_variation

    net = tiny_net()
    cfg = SynthesisConfig(num_images=16, batch_size=16, image_shape=(3, 8, 8), iterations=40)
    plain = synthesize(net, cfg, mean=MEAN, std=STD)
    smooth = synthesize(
        net, SynthesisConfig(**{**cfg.__dict__, "tv_weight": 5.0}), mean=MEAN, std=STD
    )
    assert float(total_variation(smooth)) < 0.7 * float(total_variation(plain))
    flat = torch.ones(2, 3, 4, 4)
    assert float(total_variation(flat)) == 0.0


def test_zeroq_is_seeded_and_handles_preact() -> None:
    net = PreActNet().eval()
    cfg = SynthesisConfig(num_images=6, batch_size=4, image_shape=(3, 8, 8), iterations=5)
    a = synthesize(net, cfg)
    b = synthesize(net, cfg)
    assert torch.equal(a, b) and a.shape == (6, 3, 8, 8)
    c = synthesize(net, SynthesisConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(a, c)


def test_channels_last_synthesis_gives_the_same_images_in_the_standard_layout() -> None:
    """channels_last (the CPU default) changes the memory layout only: the pixels, the loss
    and the pixel range are those of NCHW synthesis to float rounding, the model is left in
    its own layout, and the images come back contiguous."""
    net = tiny_net()
    cfg = SynthesisConfig(num_images=8, batch_size=8, image_shape=(3, 8, 8), iterations=4)
    nchw = synthesize(net, SynthesisConfig(**{**cfg.__dict__, "channels_last": False}))
    fast = synthesize(net, cfg)
    assert fast.is_contiguous() and nchw.is_contiguous()
    assert all(p.is_contiguous() for p in net.parameters())
    assert torch.allclose(fast, nchw, atol=1e-4)
    assert not torch.equal(fast, synthesize(net, SynthesisConfig(**{**cfg.__dict__, "seed": 3})))


def test_cpu_channels_last_only_touches_cpu_image_batches() -> None:
    x = torch.randn(2, 3, 4, 4)
    assert cpu_channels_last(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cpu_channels_last(x), x)
    assert cpu_channels_last(x, enabled=False) is x
    flat = torch.randn(2, 5)
    assert cpu_channels_last(flat) is flat


def test_class_balanced_variant_assigns_and_reaches_classes() -> None:
    net = tiny_net()
    labels: list[torch.Tensor] = []
    cfg = SynthesisConfig(
        num_images=16, batch_size=16, image_shape=(3, 8, 8), iterations=80, class_weight=5.0
    )
    images = synthesize(net, cfg, mean=MEAN, std=STD, labels_out=labels)
    assert torch.bincount(labels[0], minlength=4).tolist() == [4, 4, 4, 4]
    hit = (net(images).argmax(1) == labels[0]).float().mean()
    assert hit > 0.9


def test_explicit_classes_pull_every_image_to_its_class() -> None:
    net = tiny_net()
    cfg = SynthesisConfig(
        num_images=8, batch_size=8, image_shape=(3, 8, 8), iterations=80, class_weight=50.0
    )
    classes = torch.full((8,), 2, dtype=torch.long)
    images = synthesize(net, cfg, mean=MEAN, std=STD, classes=classes)
    assert (net(images).argmax(1) == 2).float().mean() > 0.9
    with pytest.raises(ValueError, match="one class per image"):
        synthesize(net, cfg, mean=MEAN, std=STD, classes=classes[:4])
    with pytest.raises(ValueError, match="class_weight > 0"):
        plain = SynthesisConfig(num_images=8, batch_size=8, image_shape=(3, 8, 8), iterations=1)
        synthesize(net, plain, mean=MEAN, std=STD, classes=classes)
    assert all(p.requires_grad for p in net.parameters())  # refused before any change


def test_synthesis_cancels_within_one_step() -> None:
    net = tiny_net()
    calls: list[float] = []

    def listener(stage: str, fraction: float) -> None:
        calls.append(fraction)
        if len(calls) == 3:
            raise Cancelled

    cfg = SynthesisConfig(num_images=4, batch_size=4, image_shape=(3, 8, 8), iterations=100)
    with pytest.raises(Cancelled):
        synthesize(net, cfg, progress=listener)
    assert len(calls) == 3
    assert all(p.requires_grad for p in net.parameters())


def test_fused_batch_statistics_gradient_matches_autograd() -> None:
    net = tiny_net()
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    recorder = _BNInputRecorder(net, per_sample=False)
    try:
        x = (torch.randn(6, 8, 5, 5, generator=torch.Generator().manual_seed(3)) * 0.8).double()
        net.double()
        x.requires_grad_(True)
        recorder._hook(bn, (x,))
        fused = recorder.pop()
        (2.5 * fused).backward()
        grad_fused = x.grad
        x2 = x.detach().clone().requires_grad_(True)
        reference = batch_statistics_loss_autograd(x2, bn)
        (2.5 * reference).backward()
    finally:
        recorder.remove()
        net.float()
    assert torch.allclose(fused, reference, rtol=1e-12, atol=0)
    assert grad_fused is not None and x2.grad is not None
    assert float(x2.grad.abs().max()) > 0
    assert torch.allclose(grad_fused, x2.grad, rtol=1e-9, atol=1e-12)


def test_fused_batch_statistics_gradient_is_zero_at_a_perfect_match() -> None:
    """At an exact match the norms are 0 and (as autograd) the gradient is 0, not NaN."""
    bn = nn.BatchNorm2d(2)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    # the statistics the loss itself computes (the batch-norm kernel), so the match is exact
    _, mu, inv_sigma = torch.native_batch_norm(x, None, None, None, None, True, 0.0, bn.eps)
    bn.double()
    assert bn.running_mean is not None and bn.running_var is not None
    bn.running_mean.copy_(mu)
    bn.running_var.copy_(inv_sigma.reciprocal().pow(2) - bn.eps)
    recorder = _BNInputRecorder(bn, per_sample=False)
    try:
        x.requires_grad_(True)
        recorder._hook(bn, (x,))
        recorder.pop().backward()
    finally:
        recorder.remove()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(x.grad.abs().max()) < 1e-6
