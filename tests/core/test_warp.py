"""Warp trigger inversion finds a planted warping (WaNet-style) backdoor's target class."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from cnc_core.backdoors.wanet import WaNet
from cnc_core.purify.proxies import predict
from cnc_core.purify.warp import (
    WarpInversionConfig,
    WarpInversionResult,
    apply_warp,
    warp_field,
    warp_inversion,
    warp_stamp,
)
from tests.core.test_proxies import NUM_CLASSES, _stats, make_task, poisoned_tiny
from tests.core.test_synthesis import MEAN, STD

#: A WaNet field on the tiny task's 8x8 images, strong enough (about a pixel) for a tiny net
WARP = WaNet(image_size=8, s=1.0, seed=3)
CFG = WarpInversionConfig(max_shift=1.5, steps=40, images=16)


@functools.cache
def warp_tiny(poison: bool = True) -> nn.Module:
    """20% of samples warped and relabelled 0 (all-to-one), or none."""
    return poisoned_tiny(
        lambda y: torch.zeros_like(y), share=0.2 if poison else 0.0, steps=800, trigger=WARP.apply
    )


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    m, s = _stats()
    x, _ = make_task(192, seed=7)
    return (x - m) / s


@pytest.fixture(scope="module")
def found(images: torch.Tensor) -> WarpInversionResult:
    return warp_inversion(warp_tiny(), images, CFG, mean=MEAN, std=STD)


def test_the_planted_warp_works_on_the_tiny_model() -> None:
    m, s = _stats()
    x, y = make_task(300, seed=99)
    net = warp_tiny()
    assert (predict(net, (x - m) / s) == y).float().mean() > 0.9
    assert (predict(net, (WARP.apply(x[y != 0]) - m) / s) == 0).float().mean() > 0.9


def test_finds_the_warp_target_and_its_warp_works_on_held_out_images(
    found: WarpInversionResult,
) -> None:
    assert found.suspected == 0 and found.success[0] > 0.9
    assert found.anomaly_index > 10 and len(found.success) == NUM_CLASSES
    assert found.fields.shape == (NUM_CLASSES, 8, 8, 2)
    # sub-pixel to a pixel: no control point moves more than max_shift pixels
    assert float(found.fields.abs().max()) * (8 - 1) / 2 <= CFG.max_shift * 1.05
    m, s = _stats()
    x, y = make_task(300, seed=99)
    held_out = (x[y != 0] - m) / s
    stamp = warp_stamp(found.fields[0], mean=MEAN, std=STD)
    assert (predict(warp_tiny(), stamp(held_out, torch.Generator())) == 0).float().mean() > 0.8


def test_a_clean_model_needs_more_than_the_bound_and_the_search_is_seeded(
    images: torch.Tensor,
) -> None:
    clean = warp_inversion(warp_tiny(poison=False), images, CFG, mean=MEAN, std=STD)
    assert max(clean.success) < 0.8
    again = warp_inversion(warp_tiny(poison=False), images, CFG, mean=MEAN, std=STD)
    assert torch.equal(clean.fields, again.fields) and clean.success == again.success


def test_a_zero_field_is_the_identity() -> None:
    x = torch.rand(4, 3, 8, 8)
    field = warp_field(torch.zeros(1, 2, 4, 4), (8, 8), max_shift=1.0)[0]
    assert torch.count_nonzero(field) == 0
    assert torch.allclose(apply_warp(x, field), x, atol=1e-5)
