"""Scaling rules and rank allocators: values, monotonicity, registry errors."""

from __future__ import annotations

import pytest
import torch

from cnc_core.allocation import ALLOCATORS, Spectrum, bisect_theta
from cnc_core.scaling import SCALING_RULES, normalise, scaling_factors

S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)


def test_normalise_to_unit_max() -> None:
    assert torch.allclose(normalise(S), S / 10)
    assert torch.equal(normalise(torch.zeros(3)), torch.zeros(3))


def test_rules_by_formula() -> None:
    s = S / 10
    assert torch.equal(scaling_factors(S, "none", 0.5), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(scaling_factors(S, "proportional", 4.0), torch.clamp(4 * s, max=1))
    assert torch.allclose(scaling_factors(S, "clip", 0.3), torch.clamp(0.3 / s, max=1))
    r = torch.arange(1, 6, dtype=torch.float64)
    assert torch.allclose(scaling_factors(S, "literal", 2.0), torch.clamp(2 * s / r, max=1))


def test_clip_caps_normalised_values_at_t() -> None:
    scaled = normalise(S) * scaling_factors(S, "clip", 0.3)
    assert float(scaled.max()) == pytest.approx(0.3)
    assert torch.allclose(scaled[2:], normalise(S)[2:])  # below T: untouched


@pytest.mark.parametrize("rule", SCALING_RULES.names())
def test_every_rule_gives_factors_in_unit_interval(rule: str) -> None:
    f = scaling_factors(S, rule, 0.7)
    assert f.shape == S.shape and float(f.min()) > 0 and float(f.max()) <= 1


def test_unknown_rule_and_bad_t_are_errors() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        scaling_factors(S, "nope", 1.0)
    with pytest.raises(ValueError, match="positive"):
        scaling_factors(S, "clip", 0.0)


@pytest.mark.parametrize("name", [n for n in ALLOCATORS.names() if n != "full"])
def test_allocators_are_monotone_and_bounded(name: str) -> None:
    spectrum = Spectrum(S, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    rule = ALLOCATORS.get(name)
    previous = (0, 0)
    for theta in torch.linspace(0, 1, 21).tolist():
        r = rule(spectrum, theta)
        assert 1 <= r[0] <= 5 and 1 <= r[1] <= 3
        assert r[0] >= previous[0] and r[1] >= previous[1]
        previous = r
    assert rule(spectrum, 1.0) == (5, 3)


def test_energy_keeps_enough_energy() -> None:
    r, _ = ALLOCATORS.get("energy")(Spectrum(S, S), 0.9)
    energy = (S**2).cumsum(0) / (S**2).sum()
    assert energy[r - 1] >= 0.9 and (r == 1 or energy[r - 2] < 0.9)


def test_bisection_finds_largest_feasible_theta() -> None:
    theta = bisect_theta(lambda t: int(t * 1000), 400)
    assert 0.399 <= theta <= 0.401
    assert bisect_theta(lambda t: 5, 10) == 1.0
