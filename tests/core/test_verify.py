"""The data-free residual check: Neural Cleanse re-run on a (purified) model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cnc_core.purify.pipeline import purify
from cnc_core.purify.proxies import (
    TriggerInversionConfig,
    TriggerInversionResult,
    trigger_inversion,
)
from cnc_core.purify.verify import VerifyConfig, blend_reach, residual_check
from cnc_core.report_md import render_report
from tests.core.test_proxies import MEAN, STD, _stats, backdoored_tiny, make_task, poisoned_tiny

# The tiny task's target mask is only ~0.8x the other classes' (not ~0.25x as on the zoo's
# BadNet), so a removal grows it ~1.3x the median class's: the bar is lowered to match.
CONFIG = VerifyConfig(
    inversion=TriggerInversionConfig(steps=60, images_per_class=16), min_relative_growth=1.2
)


@pytest.fixture(scope="module")
def backdoored() -> torch.nn.Module:
    """Trained in-test: a patch trigger sends 10% of the samples to class 2."""
    return backdoored_tiny(target=2)


@pytest.fixture(scope="module")
def clean() -> torch.nn.Module:
    """The same task, no poisoned sample."""
    return poisoned_tiny(lambda y: y, share=0.0)


def _images() -> torch.Tensor:
    m, s = _stats()
    x, _ = make_task(128, seed=7)  # stand-in for synthetic images
    return (x - m) / s


def _inversion(net: torch.nn.Module, seed: int = 0) -> TriggerInversionResult:
    gen = torch.Generator().manual_seed(seed)
    return trigger_inversion(net, _images(), CONFIG.inversion, mean=MEAN, std=STD, generator=gen)


def test_a_backdoor_left_in_is_flagged_with_its_target(backdoored: torch.nn.Module) -> None:
    original = _inversion(backdoored)
    assert original.anomaly_indices[2] >= 2.0  # the tiny model's target: NC's outlier
    # "purification" that did nothing: the same model checked against its own NC run
    rec = residual_check(backdoored, _images(), CONFIG, original, acted_on=2, mean=MEAN, std=STD)
    assert rec["verdict"] == "residual" and rec["flagged"] == [2] and rec["class"] == 2
    assert rec["checked"] == [2] and rec["acted_on"] == 2
    assert rec["relative_growth"][2] < CONFIG.min_relative_growth
    assert len(rec["mask_norms"]) == len(rec["anomaly_indices"]) == len(rec["success"]) == 6


def test_a_removed_backdoor_is_cleared(backdoored: torch.nn.Module, clean: torch.nn.Module) -> None:
    """The clean model stands in for a purified one: the target's mask grew past the rest."""
    rec = residual_check(clean, _images(), CONFIG, _inversion(backdoored), mean=MEAN, std=STD)
    assert rec["verdict"] == "cleared" and rec["checked"] == [2] and rec["flagged"] == []
    assert rec["class"] == 2 and rec["relative_growth_of_class"] >= CONFIG.min_relative_growth
    growth = rec["relative_growth"]
    assert max(range(6), key=growth.__getitem__) == 2


def test_nothing_is_checked_where_the_original_had_no_outlier(clean: torch.nn.Module) -> None:
    original = _inversion(clean)
    assert max(original.anomaly_indices) < 2.0
    rec = residual_check(clean, _images(), CONFIG, original, mean=MEAN, std=STD)
    assert rec["verdict"] == "unchecked" and rec["checked"] == [] and rec["flagged"] == []


def test_the_growth_bar_decides_and_new_outliers_are_only_listed(
    backdoored: torch.nn.Module,
) -> None:
    original = _inversion(backdoored)
    lax = VerifyConfig(inversion=CONFIG.inversion, min_relative_growth=0.0)
    assert residual_check(backdoored, _images(), lax, original)["verdict"] == "cleared"
    # class 2 no outlier on the "original": nothing to check, the outlier listed as new
    indices = list(original.anomaly_indices)
    indices[2] = 0.5
    quiet = dataclasses.replace(original, anomaly_indices=indices)
    rec = residual_check(backdoored, _images(), CONFIG, quiet, mean=MEAN, std=STD)
    assert rec["verdict"] == "unchecked" and rec["new_outliers"] == [2]


def test_a_blend_that_still_reaches_the_target_is_flagged(
    backdoored: torch.nn.Module, clean: torch.nn.Module
) -> None:
    """The blend reach, given the original model: its mean-difference blend of the target's
    images, measured on both models; a bar that every share passes flags the class, one that
    none passes leaves the mask's verdict."""
    images, original = _images(), _inversion(backdoored)
    shares = blend_reach(backdoored, clean, images, 2, 0.3, mean=MEAN, std=STD)
    assert shares is not None and all(0.0 <= v <= 1.0 for v in shares)
    keep_all = VerifyConfig(
        inversion=CONFIG.inversion,
        min_relative_growth=CONFIG.min_relative_growth,
        max_blend_kept=0.0,
        min_blend_reach=0.0,
    )
    rec = residual_check(
        clean, images, keep_all, original, original_model=backdoored, mean=MEAN, std=STD
    )
    assert rec["verdict"] == "residual" and rec["reasons"] == {"2": ["blend"]}
    assert rec["blend_reach"]["2"] == [round(v, 4) for v in shares]
    page = render_report({"detection": {"verify": rec}})
    assert "the blend of its images still reaches it" in page and "mean-difference" in page
    never = dataclasses.replace(keep_all, max_blend_kept=1e9)
    rec = residual_check(
        clean, images, never, original, original_model=backdoored, mean=MEAN, std=STD
    )
    assert rec["verdict"] == "cleared" and "2" in rec["blend_reach"]


def test_only_the_treated_class_is_checked_the_other_outliers_listed(
    backdoored: torch.nn.Module,
) -> None:
    original = _inversion(backdoored)
    rec = residual_check(backdoored, _images(), CONFIG, original, acted_on=1, mean=MEAN, std=STD)
    assert rec["verdict"] == "unchecked" and rec["checked"] == []
    assert rec["untreated_outliers"] == [2]
    page = render_report({"detection": {"verify": rec}})
    assert "nothing it can confirm gone" in page and "not the class treated: class 2" in page


def test_the_check_is_seeded_and_leaves_the_model_unchanged(backdoored: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in backdoored.state_dict().items()}
    original = _inversion(backdoored)
    runs = [
        residual_check(backdoored, _images(), CONFIG, original, seed=3, mean=MEAN, std=STD)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert all(torch.equal(before[k], v) for k, v in backdoored.state_dict().items())
    assert not backdoored.training


def test_classes_must_match_the_original(backdoored: torch.nn.Module) -> None:
    original = _inversion(backdoored)
    fewer = dataclasses.replace(original, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="classes"):
        residual_check(backdoored, _images(), CONFIG, fewer)


def test_the_cnc_preset_checks_the_purified_model_and_the_report_says_so() -> None:
    from tests.core.test_purify import _config, _model

    res = purify(_model(), _config("cnc"), mean=0.5, std=0.25, input_shape=(3, 16, 16))
    rec = res.detection["verify"]
    assert rec["verdict"] in ("residual", "cleared", "unchecked")
    assert rec["acted_on"] == res.suspected_target and "verify" in res.timings
    assert "## Residual check" in render_report({"detection": res.detection})
    off = purify(
        _model(), _config("cnc", verify=False), mean=0.5, std=0.25, input_shape=(3, 16, 16)
    )
    assert "verify" not in off.detection and "verify" not in off.timings


def _record(verdict: str, **extra: object) -> dict[str, object]:
    return {
        "verdict": verdict,
        "class": 3,
        "checked": [3],
        "flagged": [3] if verdict == "residual" else [],
        "new_outliers": [],
        "anomaly_threshold": 2.0,
        "min_relative_growth": 1.5,
        "classes": [0, 1, 2, 3],
        "mask_norms": [90.0, 80.0, 85.0, 20.0],
        "mask_growth": [1.0, 1.1, 0.9, 1.05],
        "relative_growth": [1.0, 1.1, 0.9, 1.05],
        "anomaly_indices": [0.1, 0.2, 0.3, 3.4],
        "original_anomaly_indices": [0.1, 0.2, 0.3, 3.5],
        "blend_reach": {},
        "reasons": {"3": ["mask"]} if verdict == "residual" else {},
        "success": [0.9, 0.9, 0.9, 1.0],
        **extra,
    }


def test_the_report_states_each_verdict() -> None:
    page = render_report({"detection": {"verify": _record("residual")}})
    assert "removal unconfirmed" in page and "the backdoor to class 3 may remain" in page
    assert "1.05x the median class's growth (bar 1.5x)" in page
    cleared = render_report({"detection": {"verify": _record("cleared", new_outliers=[1])}})
    assert "## Residual check: cleared" in cleared and "(class 3) no longer stands out" in cleared
    assert "Outliers on the purified model only: class 1" in cleared
    unchecked = render_report({"detection": {"verify": _record("unchecked", checked=[])}})
    assert "nothing to check" in unchecked and "all-to-all" in unchecked
