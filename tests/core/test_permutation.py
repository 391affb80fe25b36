"""Permutation trigger inversion finds a planted all-to-all trigger from synthetic-like images."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from torch import nn

from cnc_core.purify.permutation import (
    PermutationInversionConfig,
    PermutationInversionResult,
    permutation_inversion,
)
from cnc_core.purify.proxies import apply_trigger, predict
from tests.core.test_proxies import NUM_CLASSES, _stats, make_task, poisoned_tiny, stamp
from tests.core.test_synthesis import MEAN, STD


@functools.cache
def all2all_tiny(poison: bool = True) -> nn.Module:
    """20% of samples stamped and relabelled ``y + 1`` (all-to-all), or none. Trained once per
    session (``test_dynamic`` reuses them); the inversions leave them unchanged."""
    relabel = lambda y: (y + 1) % NUM_CLASSES  # noqa: E731
    return poisoned_tiny(relabel, share=0.2 if poison else 0.0, steps=800)


BLEND = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(77))


def blend(x: torch.Tensor) -> torch.Tensor:
    """Blended-style trigger: a fixed noise image blended over the whole image at 0.2."""
    return 0.8 * x + 0.2 * BLEND


@functools.cache
def blend_all2all_tiny() -> nn.Module:
    relabel = lambda y: (y + 1) % NUM_CLASSES  # noqa: E731
    return poisoned_tiny(relabel, share=0.2, steps=800, trigger=blend)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    m, s = _stats()
    x, _ = make_task(192, seed=7)
    return (x - m) / s


CFG = PermutationInversionConfig(steps=80, images_per_class=8, restarts=2)


@pytest.fixture(scope="module")
def a2a_net() -> nn.Module:
    return all2all_tiny()


@pytest.fixture(scope="module")
def a2a_inv(a2a_net: nn.Module, images: torch.Tensor) -> PermutationInversionResult:
    return permutation_inversion(a2a_net, images, CFG, mean=MEAN, std=STD)


def test_finds_the_all_to_all_trigger(
    a2a_net: nn.Module, a2a_inv: PermutationInversionResult
) -> None:
    m, s = _stats()
    x, y = make_task(300, seed=99)
    assert (predict(a2a_net, (stamp(x) - m) / s) == (y + 1) % NUM_CLASSES).float().mean() > 0.9
    inv = a2a_inv
    right = sum(inv.mapping[c] == (c + 1) % NUM_CLASSES for c in range(NUM_CLASSES))
    assert right >= NUM_CLASSES - 1
    assert inv.flip_rate > 0.8 and inv.top_share < 0.5
    assert inv.mutual_information > 0.8 * torch.log(torch.tensor(NUM_CLASSES)).item()
    # The inverted trigger is a working copy: it moves held-out images to y + 1
    stamped = apply_trigger((x - m) / s, inv.mask, inv.pattern, mean=MEAN, std=STD)
    assert (predict(a2a_net, stamped) == (y + 1) % NUM_CLASSES).float().mean() > 0.8


def test_is_seeded_and_weaker_on_a_clean_model(
    images: torch.Tensor, a2a_inv: PermutationInversionResult
) -> None:
    clean = all2all_tiny(poison=False)
    a = permutation_inversion(clean, images, CFG, mean=MEAN, std=STD)
    b = permutation_inversion(clean, images, CFG, mean=MEAN, std=STD)
    assert torch.equal(a.mask, b.mask) and a.mapping == b.mapping
    # A clean model needs a larger trigger for a weaker permutation
    assert a.mask_norm > a2a_inv.mask_norm
    assert a.mutual_information < a2a_inv.mutual_information


def test_every_restart_is_reported_best_objective_first(
    images: torch.Tensor, a2a_inv: PermutationInversionResult
) -> None:
    """``candidates`` holds one result per restart, each with its own hard statistics; the
    returned trigger is the first of them (the best final objective)."""
    inv = a2a_inv
    assert len(inv.candidates) == CFG.restarts
    first = inv.candidates[0]
    assert torch.equal(first.mask, inv.mask) and first.mapping == inv.mapping
    assert first.flip_rate == inv.flip_rate
    assert not torch.equal(inv.candidates[0].pattern, inv.candidates[1].pattern)
    for cand in inv.candidates:
        assert 0.0 <= cand.flip_rate <= 1.0 and len(cand.mapping) == NUM_CLASSES
        assert cand.candidates == []  # no nesting


def test_information_away_from_the_source_also_finds_the_trigger(
    a2a_net: nn.Module, images: torch.Tensor
) -> None:
    """``information="away"`` (the information measured on where images go once they leave)
    recovers the planted y -> y + 1 mapping too; an unknown measure is refused."""
    away = dataclasses.replace(CFG, information="away")
    inv = permutation_inversion(a2a_net, images, away, mean=MEAN, std=STD)
    right = sum(inv.mapping[c] == (c + 1) % NUM_CLASSES for c in range(NUM_CLASSES))
    assert right >= NUM_CLASSES - 1 and inv.flip_rate > 0.8
    with pytest.raises(ValueError, match="information must be one of"):
        permutation_inversion(
            a2a_net, images, dataclasses.replace(CFG, information="x"), mean=MEAN, std=STD
        )


def test_blend_restarts_find_a_whole_image_all_to_all_blend(images: torch.Tensor) -> None:
    """``blend_restarts``: restarts whose mask is a fixed whole-image blend, the pattern
    learned, find an all-to-all blended trigger's mapping; they are reported as blends,
    after the learned-mask restarts in the random draws."""
    net = blend_all2all_tiny()
    m, s = _stats()
    x, y = make_task(300, seed=99)
    assert (predict(net, (blend(x) - m) / s) == (y + 1) % NUM_CLASSES).float().mean() > 0.8
    cfg = dataclasses.replace(CFG, restarts=1, blend_restarts=1)
    inv = permutation_inversion(net, images, cfg, mean=MEAN, std=STD)
    blends = [c for c in inv.candidates if c.blend]
    assert len(blends) == 1 and len(inv.candidates) == 2
    found = blends[0]
    assert torch.allclose(found.mask, torch.full_like(found.mask, 0.2))
    assert found.mask_norm == pytest.approx(0.2 * 8 * 8)
    right = sum(found.mapping[c] == (c + 1) % NUM_CLASSES for c in range(NUM_CLASSES))
    assert right >= NUM_CLASSES - 1 and found.flip_rate > 0.5
    # with no blend restart, every candidate's mask is learned
    plain = permutation_inversion(net, images, dataclasses.replace(CFG, restarts=1))
    assert not any(c.blend for c in plain.candidates)


def test_blend_restarts_can_draw_a_batch_of_their_own(images: torch.Tensor) -> None:
    """``blend_images_per_class``: the blend restarts see their own, larger batch (and still
    find the blend's mapping) while the learned-mask restarts see the very batches they see
    when the blend shares theirs."""
    net = blend_all2all_tiny()
    shared_cfg = dataclasses.replace(CFG, restarts=1, blend_restarts=1)
    apart_cfg = dataclasses.replace(shared_cfg, blend_images_per_class=16)
    shared = permutation_inversion(net, images, shared_cfg, mean=MEAN, std=STD)
    apart = permutation_inversion(net, images, apart_cfg, mean=MEAN, std=STD)

    def one(inv: PermutationInversionResult, is_blend: bool) -> PermutationInversionResult:
        return next(c for c in inv.candidates if c.blend == is_blend)

    assert torch.allclose(one(shared, False).mask, one(apart, False).mask, atol=1e-5)
    assert torch.allclose(one(shared, False).pattern, one(apart, False).pattern, atol=1e-5)
    assert not torch.equal(one(shared, True).pattern, one(apart, True).pattern)
    found = one(apart, True)
    right = sum(found.mapping[c] == (c + 1) % NUM_CLASSES for c in range(NUM_CLASSES))
    assert right >= NUM_CLASSES - 1 and found.flip_rate > 0.5


def test_no_restart_at_all_is_refused_by_name(images: torch.Tensor) -> None:
    config = dataclasses.replace(CFG, restarts=0, blend_restarts=0)
    with pytest.raises(ValueError, match="at least one restart"):
        permutation_inversion(nn.Linear(1, 1), images, config, mean=MEAN, std=STD)
