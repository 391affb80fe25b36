"""Permutation trigger inversion finds a planted all-to-all trigger from synthetic-like images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnc_core.purify.permutation import PermutationInversionConfig, permutation_inversion
from cnc_core.purify.proxies import apply_trigger, predict
from tests.core.test_proxies import NUM_CLASSES, _stats, make_task, stamp
from tests.core.test_synthesis import MEAN, STD, tiny_net


def all2all_tiny(seed: int = 0, poison: bool = True, steps: int = 800) -> nn.Module:
    """A tiny net trained with 20% of samples stamped and relabelled ``y + 1`` (all-to-all)."""
    m, s = _stats()
    net = tiny_net(NUM_CLASSES, seed=seed, width=12)
    x, y = make_task(1200, seed)
    if poison:
        k = len(x) // 5
        x[:k], y[:k] = stamp(x[:k]), (y[:k] + 1) % NUM_CLASSES
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


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    m, s = _stats()
    x, _ = make_task(192, seed=7)
    return (x - m) / s


CFG = PermutationInversionConfig(steps=80, images_per_class=8, restarts=2)


def test_finds_the_all_to_all_trigger(images: torch.Tensor) -> None:
    net = all2all_tiny()
    m, s = _stats()
    x, y = make_task(300, seed=99)
    assert (predict(net, (stamp(x) - m) / s) == (y + 1) % NUM_CLASSES).float().mean() > 0.9
    inv = permutation_inversion(net, images, CFG, mean=MEAN, std=STD)
    assert inv.mapping == [(c + 1) % NUM_CLASSES for c in range(NUM_CLASSES)]
    assert inv.flip_rate > 0.8 and inv.top_share < 0.5
    assert inv.mutual_information > 0.8 * torch.log(torch.tensor(NUM_CLASSES)).item()
    # The inverted trigger is a working copy: it moves held-out images to y + 1
    moved = predict(net, apply_trigger((x - m) / s, inv.mask, inv.pattern, mean=MEAN, std=STD))
    assert (moved == (y + 1) % NUM_CLASSES).float().mean() > 0.8


def test_is_seeded_and_weaker_on_a_clean_model(images: torch.Tensor) -> None:
    clean = all2all_tiny(poison=False)
    a = permutation_inversion(clean, images, CFG, mean=MEAN, std=STD)
    b = permutation_inversion(clean, images, CFG, mean=MEAN, std=STD)
    assert torch.equal(a.mask, b.mask) and a.mapping == b.mapping
    bad = permutation_inversion(all2all_tiny(), images, CFG, mean=MEAN, std=STD)
    # A clean model needs a larger trigger for a weaker permutation
    assert a.mask_norm > bad.mask_norm
