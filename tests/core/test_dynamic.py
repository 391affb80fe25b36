"""Dynamic (generator) trigger inversion: finds an all-to-all trigger, not a clean model's."""

from __future__ import annotations

import pytest
import torch

from cnc_core.purify.dynamic import (
    DynamicInversionConfig,
    TriggerGenerator,
    dynamic_inversion,
    dynamic_stamp,
    stamp_dynamic,
)
from cnc_core.purify.proxies import predict
from tests.core.test_permutation import all2all_tiny
from tests.core.test_proxies import NUM_CLASSES, _stats, make_task
from tests.core.test_synthesis import MEAN, STD

CFG = DynamicInversionConfig(steps=80, images_per_class=8)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    m, s = _stats()
    x, _ = make_task(192, seed=7)
    return (x - m) / s


def test_generator_outputs_a_mask_and_pattern_per_image() -> None:
    net = TriggerGenerator(3, 8, mask_bias=-3.0)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        mask, pattern = net(x)
    assert mask.shape == (5, 1, 8, 8) and pattern.shape == (5, 3, 8, 8)
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert float(pattern.min()) >= 0 and float(pattern.max()) <= 1
    # the initial mask covers about sigmoid(-3) = 5% of each pixel
    assert 0.01 < float(mask.mean()) < 0.2
    m, s = _stats()
    with torch.no_grad():
        stamped = stamp_dynamic((x - m) / s, net, mean=MEAN, std=STD) * s + m
    assert float(stamped.min()) >= -1e-5 and float(stamped.max()) <= 1 + 1e-5
    # the stamp function wraps the same trigger, without gradients
    same = dynamic_stamp(net, mean=MEAN, std=STD)((x - m) / s, torch.Generator())
    assert torch.allclose(same * s + m, stamped) and not same.requires_grad


def test_finds_the_all_to_all_trigger_and_not_a_clean_models(images: torch.Tensor) -> None:
    m, s = _stats()
    x, y = make_task(300, seed=99)
    poisoned = dynamic_inversion(all2all_tiny(), images, CFG, mean=MEAN, std=STD)
    right = sum(poisoned.mapping[c] == (c + 1) % NUM_CLASSES for c in range(NUM_CLASSES))
    assert right == NUM_CLASSES and poisoned.flip_rate > 0.8 and poisoned.top_share < 0.5
    # a working copy of the trigger: held-out images go to y + 1
    stamped = stamp_dynamic((x - m) / s, poisoned.generator, mean=MEAN, std=STD)
    assert (predict(all2all_tiny(), stamped) == (y + 1) % NUM_CLASSES).float().mean() > 0.8
    clean = dynamic_inversion(all2all_tiny(poison=False), images, CFG, mean=MEAN, std=STD)
    # on a clean model it needs a larger mask and collapses onto a few attractor classes
    assert clean.mask_norm > 2 * poisoned.mask_norm
    assert len({t for t in clean.mapping if t >= 0}) <= NUM_CLASSES // 2
    assert clean.mutual_information < poisoned.mutual_information


def test_is_seeded_and_the_spread_term_is_what_finds_the_permutation(
    images: torch.Tensor,
) -> None:
    net = all2all_tiny()
    a = dynamic_inversion(net, images, CFG, mean=MEAN, std=STD)
    b = dynamic_inversion(net, images, CFG, mean=MEAN, std=STD)
    assert a.mapping == b.mapping and a.mask_norm == b.mask_norm
    # a mask penalty far above the flip gain: the trigger shrinks to nothing
    none = dynamic_inversion(
        net,
        images,
        DynamicInversionConfig(steps=80, images_per_class=8, l1_weight=1.0),
        mean=MEAN,
        std=STD,
    )
    assert none.flip_rate < 0.05 and none.mask_norm < 1.0
