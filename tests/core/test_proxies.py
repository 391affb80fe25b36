"""Adversarial proxies: PGD flips predictions within eps; inversion finds a planted target."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnc_core.progress import Cancelled
from cnc_core.purify.proxies import (
    PROXY_KINDS,
    PGDConfig,
    ProxyConfig,
    TriggerInversionConfig,
    UniversalConfig,
    apply_trigger,
    make_proxies,
    pgd_attack,
    predict,
)
from cnc_core.purify.synthesis import normalisation_bounds
from tests.core.test_synthesis import MEAN, STD, tiny_net

NUM_CLASSES = 6


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)


def make_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-space images: a random prototype per class plus noise, labels."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.rand(NUM_CLASSES, 3, 8, 8, generator=g) * 0.8
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = (protos[y] + 0.15 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def stamp(x: torch.Tensor) -> torch.Tensor:
    """BadNet-style trigger: a white 3x3 patch in the bottom-right corner (pixel space)."""
    x = x.clone()
    x[:, :, -3:, -3:] = 1.0
    return x


def poisoned_tiny(
    relabel: Callable[[torch.Tensor], torch.Tensor],
    *,
    seed: int = 0,
    share: float = 0.1,
    steps: int = 300,
    trigger: Callable[[torch.Tensor], torch.Tensor] = stamp,
) -> nn.Module:
    """A tiny net trained in seconds with ``share`` of its samples stamped (``trigger``, pixel
    space) and relabelled."""
    m, s = _stats()
    net = tiny_net(NUM_CLASSES, seed=seed, width=12)
    x, y = make_task(1200, seed)
    k = int(len(x) * share)
    x[:k], y[:k] = trigger(x[:k]), relabel(y[:k])
    xn = (x - m) / s
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xn), (64,), generator=g)
        loss = F.cross_entropy(net(xn[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def backdoored_tiny(seed: int = 0, target: int = 0) -> nn.Module:
    """10% poisoned samples, all-to-one ``target``."""
    return poisoned_tiny(lambda y: torch.full_like(y, target), seed=seed)


@pytest.fixture(scope="module")
def backdoored() -> nn.Module:
    return backdoored_tiny()


def test_backdoored_fixture_is_backdoored(backdoored: nn.Module) -> None:
    m, s = _stats()
    x, y = make_task(300, seed=99)
    keep = y != 0
    acc = (predict(backdoored, (x - m) / s) == y).float().mean()
    asr = (predict(backdoored, (stamp(x[keep]) - m) / s) == 0).float().mean()
    assert acc > 0.9 and asr > 0.9


def test_pgd_changes_predictions_within_eps() -> None:
    net = tiny_net()
    x = torch.randn(32, 3, 8, 8) * 0.5
    lo, hi = normalisation_bounds(MEAN, STD, 3, torch.device("cpu"))
    x = torch.max(torch.min(x, hi), lo)
    cfg = PGDConfig(eps=16 / 255, steps=10)
    adv = pgd_attack(net, x, cfg, mean=MEAN, std=STD, generator=torch.Generator().manual_seed(0))
    clean = predict(net, x)
    assert (predict(net, adv) != clean).float().mean() > 0.5
    pix_delta = (adv - x) * torch.tensor(STD).view(1, 3, 1, 1)
    assert pix_delta.abs().max() <= 16 / 255 + 1e-5
    assert (adv >= lo - 1e-6).all() and (adv <= hi + 1e-6).all()


def test_trigger_inversion_finds_planted_target(backdoored: nn.Module) -> None:
    m, s = _stats()
    x, _ = make_task(128, seed=7)
    images = (x - m) / s
    cfg = ProxyConfig(
        kind="trigger_inversion",
        inversion=TriggerInversionConfig(steps=60, lr=0.1, l1_weight=0.01, images_per_class=16),
    )
    ps = make_proxies(backdoored, images, cfg, mean=MEAN, std=STD)
    inv = ps.inversion
    assert inv is not None
    assert inv.suspected_target == 0 and ps.suspected_target == 0
    assert inv.mask_norms[0] == min(inv.mask_norms)
    assert inv.anomaly_index > 1.5
    # The proxies carry the inverted trigger (mostly predicted as the target) and are
    # labelled with the clean prediction, never the target
    assert (ps.adv_pred == 0).float().mean() > 0.8
    assert torch.equal(ps.labels, predict(backdoored, images))
    # Stamping is a no-op under an all-zero mask
    same = apply_trigger(images, torch.zeros(1, 8, 8), torch.ones(3, 8, 8), mean=MEAN, std=STD)
    assert torch.allclose(same, images, atol=1e-5)


def test_every_registered_kind_builds_labelled_proxies(backdoored: nn.Module) -> None:
    m, s = _stats()
    x, _ = make_task(48, seed=3)
    images = (x - m) / s
    configs = {
        "pgd": ProxyConfig(kind="pgd", pgd=PGDConfig(eps=0.1, steps=5)),
        "universal": ProxyConfig(kind="universal", universal=UniversalConfig(eps=0.2, steps=20)),
        "trigger_inversion": ProxyConfig(
            kind="trigger_inversion",
            inversion=TriggerInversionConfig(steps=5, images_per_class=4, use="all"),
        ),
    }
    assert set(configs) == set(PROXY_KINDS)
    for kind, cfg in configs.items():
        ps = make_proxies(backdoored, images, cfg, mean=MEAN, std=STD)
        assert ps.images.shape == images.shape and ps.labels.shape == (48,)
        assert sum(ps.histogram) == round(ps.flip_rate * 48)
        assert 0 <= ps.suspected_target < NUM_CLASSES
        a = make_proxies(backdoored, images, cfg, mean=MEAN, std=STD)
        assert torch.equal(a.images, ps.images), kind  # seeded
    with pytest.raises(ValueError):
        make_proxies(backdoored, images, ProxyConfig(kind="nope"))


def test_proxies_cancel_within_one_step() -> None:
    net = tiny_net()
    calls: list[str] = []

    def listener(stage: str, fraction: float) -> None:
        calls.append(stage)
        if len(calls) == 2:
            raise Cancelled

    x = torch.zeros(8, 3, 8, 8)
    cfg = ProxyConfig(kind="trigger_inversion", inversion=TriggerInversionConfig(steps=50))
    with pytest.raises(Cancelled):
        make_proxies(net, x, cfg, progress=listener)
    assert len(calls) == 2


def test_mean_difference_pattern_finds_what_the_target_images_share() -> None:
    """Images the model sends to the target carry a bright corner: the pattern peaks there."""
    from cnc_core.purify.proxies import mean_difference_pattern

    class CornerNet(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            corner = x[:, :, -2:, -2:].mean((1, 2, 3))
            return torch.stack([corner, 0.5 * torch.ones_like(corner)], 1)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 8, 8, generator=g) * 0.4
    images[:15, :, -2:, -2:] = 1.0
    pattern = mean_difference_pattern(CornerNet(), images, 0)
    assert pattern is not None and pattern.shape == (3, 8, 8)
    assert float(pattern.min()) == 0.0 and float(pattern.max()) == 1.0
    assert pattern[:, -2:, -2:].mean() > 0.9 > 0.5 > pattern[:, :-2, :-2].mean()
    assert mean_difference_pattern(CornerNet(), images[15:], 0) is None  # no target image


def test_mixed_stamp_gives_each_image_one_stamp() -> None:
    from cnc_core.purify.proxies import mixed_stamp

    images = torch.zeros(64, 1, 4, 4)
    stamp = mixed_stamp([lambda x, g: x + 1, lambda x, g: x + 2])
    out = stamp(images, torch.Generator().manual_seed(0))
    values = out.flatten(1)[:, 0]
    assert set(values.tolist()) == {1.0, 2.0}
    assert 10 < int((values == 1).sum()) < 54
    again = stamp(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
